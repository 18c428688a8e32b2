"""Weights on disk: safetensors files loaded strictly, and frozen pretrained encoders referenced by
source and content hash instead of stored.

Frozen pretrained encoders (DINOv2-L + CLIP-L text: 427M parameters, 1.7 GB in fp32) never change
and can be fetched again by hub id and revision, so they are referenced, not stored:
`pretrained_weights.json` maps each one's state-dict prefix to its config section, source, the
commit it was loaded at and a sha256 of its tensors. Loading builds the model with those encoders
loaded from their source, loads everything stored strictly, and refuses encoder weights whose hash
differs. Trained encoders (the CNN, task embeddings) and random-init ones (`model.pretrained=false`)
have no source and are stored.

Every file holds FULL (unsharded) state, whatever the training strategy: loading puts a full state
into a plain, DDP or FSDP-sharded model alike, so a checkpoint written by an 8-GPU FSDP run loads
into a CPU policy, and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from drifting_vla.distributed import full_tensor

MODEL_FILE = "model.safetensors"
REFERENCES_FILE = "pretrained_weights.json"


class DamagedCheckpointError(ValueError):
    """A checkpoint or export file that cannot be parsed. In a directory whose hashes passed, that
    means another version wrote it."""


def read_saved_file(file: Path, reader):
    """`reader(file)`, any failure to parse it named with the file and what to do."""
    try:
        return reader(file)
    except Exception as error:
        reason = (str(error).splitlines() or [""])[0]
        raise DamagedCheckpointError(
            f"cannot read {file} ({type(error).__name__}: {reason}): another drifting-vla or torch version wrote "
            "it, or it is damaged. Read it with the version that wrote it, copy it again, or use another checkpoint."
        ) from error


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    return read_saved_file(file, lambda f: load_file(str(f), device="cpu"))


# --------------------------------------------------------------------------------------------
# Frozen pretrained weights: referenced by source and content hash


def pretrained_sources(model: nn.Module) -> dict[str, dict]:
    """{state-dict prefix: weights_source} of every module that loaded pretrained weights from a
    source it can name (`models.frozen.FrozenModule.load_source`)."""
    return {
        name: dict(module.weights_source)
        for name, module in model.named_modules()
        if getattr(module, "weights_source", None) is not None
    }


def weights_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order: equal exactly when the weights
    are (a file format or a load path cannot change it; a cast to another dtype does)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _under(prefix: str, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors below `prefix`, named relative to it (so an encoder's hash does not depend on
    where it sits in the model)."""
    return {k[len(prefix) + 1 :]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def split_referenced(
    weights: Mapping[str, torch.Tensor], sources: Mapping[str, dict]
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(the weights to store, {prefix: source + sha256, parameter count, bytes}) for a full state
    dict whose modules at `sources`' prefixes are referenced instead of stored."""
    stored, references = dict(weights), {}
    for prefix, source in sources.items():
        tensors = _under(prefix, weights)
        for name in tensors:
            del stored[f"{prefix}.{name}"]
        references[prefix] = {
            **source,
            "sha256": weights_sha256(tensors),
            "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        }
    return stored, references


def write_references(directory: Path, references: Mapping[str, dict]) -> None:
    """`pretrained_weights.json`, only when something is referenced (a directory without it stores
    every weight)."""
    if references:
        (directory / REFERENCES_FILE).write_text(json.dumps(dict(references), indent=2))


def read_references(directory: str | os.PathLike) -> dict[str, dict]:
    """What `write_references` wrote, {} when the directory stores every weight."""
    file = Path(directory) / REFERENCES_FILE
    return read_saved_file(file, lambda f: json.loads(f.read_text())) if file.is_file() else {}


def pin_referenced_revisions(cfg: dict, references: Mapping[str, dict]) -> dict:
    """A copy of the resolved config that rebuilds the referenced encoders from their sources, at
    the recorded commits (`model.pretrained=true`), and every other weight at random for a strict
    load (`model.pretrained=false` when nothing is referenced)."""
    cfg = json.loads(json.dumps(cfg))
    cfg["model"]["pretrained"] = bool(references)
    for reference in references.values():
        section = cfg["model"][reference["config_key"].removeprefix("model.")]
        if reference.get("revision"):
            section["revision"] = reference["revision"]
    return cfg


def verify_referenced(model: nn.Module, references: Mapping[str, dict], where: Path) -> None:
    """Refuse referenced encoders whose weights are not the ones the directory was written with
    (collective under FSDP: every rank calls it)."""
    weights = model.state_dict()
    for prefix, reference in references.items():
        actual = weights_sha256({k: full_tensor(v) for k, v in _under(prefix, weights).items()})
        if actual != reference["sha256"]:
            key = reference["config_key"]
            revision = reference.get("revision")
            at = f" at revision {revision}" if revision else ""
            raise ValueError(
                f"the frozen encoder {prefix} ({key}: {reference['source']}{at}) has weights with sha256 "
                f"{actual}, but {where / REFERENCES_FILE} expects {reference['sha256']}: they are not the "
                f"weights this policy was trained with. Point {key}.name_or_path (and {key}.revision) at a "
                f"copy of {reference['source']}{at}, or use a checkpoint that stores the encoder."
            )


def load_weights(model: nn.Module, file: Path, references: Mapping[str, dict] | None = None) -> None:
    """Strictly load a full-state safetensors file into a plain, DDP-wrapped or FSDP-sharded
    model; a mismatch is an error naming the keys. Weights under the prefixes of `references`
    (`read_references`) are not in the file: the model already holds them, and their hash must
    match."""
    references = references or {}
    verify_referenced(model, references, file.parent)
    weights = read_weights(file)
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in references)}
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise KeyError(
            f"{file} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}. Was it "
            "written with the same model config? (For pretrained encoders, model.vision.arch and "
            "model.language.arch must describe the checkpoint's architecture.)"
        )
    options = StateDictOptions(full_state_dict=True, strict=not references)
    set_model_state_dict(model, weights, options=options)
