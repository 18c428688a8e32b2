"""Atomic checkpoints, resume=auto, pruning, and a resume that is bit-identical on CPU."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from drifting_vla.formats import checkpoint as ckpt
from drifting_vla.formats.checkpoint import find_latest_valid_checkpoint, prune_checkpoints
from drifting_vla.formats.weights import DamagedCheckpointError
from drifting_vla.models.frozen import FrozenModule
from drifting_vla.training import checkpoint as training_checkpoint
from drifting_vla.training.checkpoint import (
    capture_rng_state,
    gather_training_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from drifting_vla.training.ema import EMA
from drifting_vla.training.optimizer import OptimizerConfig, build_optimizer, build_scheduler

CONFIG = {"model": {"hidden": 8}, "training": {"learning_rate": 1e-2}}
NORMALIZATION = {"stats": {"actions": {"min": np.zeros(4, dtype=np.float32), "max": torch.ones(4)}},
                 "action_spec": [{"name": "delta", "kind": "position", "dim": 4}]}
OBJECTIVE = {"name": "drifting", "nfe": 1, "sampler": None, "method": "drifting nfe=1"}


class PretrainedEncoder(FrozenModule):
    """Stands in for DINOv2: frozen weights that come from a named source, the same in every run
    unless `shift` says the source now holds other weights."""

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 4)
        with torch.no_grad():
            self.layer.weight.copy_(torch.eye(4) + shift)
            self.layer.bias.zero_()
        self.weights_source = {"config_key": "model.vision", "source": "org/encoder", "revision": "abc123"}
        self.freeze()

    def forward(self, x):
        return self.layer(x)


class Run:
    """Model, EMA, optimizer and scheduler built the same way a fresh run builds them."""

    def __init__(self, seed: int = 0, encoder: nn.Module | None = None) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 4))
        if encoder is not None:
            self.model.insert(0, encoder)
        self.ema = EMA(self.model, max_decay=0.9)
        cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, max_steps=20)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)

    def train_step(self, step: int) -> None:
        """One step whose inputs come from all three RNGs, so a wrong restore changes the weights."""
        x = torch.randn(16, 4) + float(np.random.rand()) + random.random()
        loss = (self.model(x) - x.flip(1)).pow(2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.ema.update(self.model, step)

    def save(self, directory: Path, step: int) -> Path:
        return save_checkpoint(
            directory,
            step=step,
            state=gather_training_state(self.model, self.ema, self.optimizer),
            objective=OBJECTIVE,
            card=lambda references: f"a test policy referencing {sorted(references)}\n",
            scheduler=self.scheduler,
            config=CONFIG,
            normalization=NORMALIZATION,
            sampler_state={"epoch": 0, "index": step * 16},
        )

    def load(self, path: Path) -> training_checkpoint.ResumeState:
        return load_checkpoint(
            path, model=self.model, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler
        )


def test_checkpoint_directory_holds_every_file_and_the_complete_marker(tmp_path):
    path = Run().save(tmp_path, step=1000)
    assert path.name == "step_00001000"
    names = {p.name for p in path.iterdir()}
    assert names == {
        "config.json",  # the export of the EMA policy ...
        "model.safetensors",
        "normalization.json",
        "README.md",
        "training_model.safetensors",  # ... beside the training state
        "training_state.pt",
        "complete",
    }
    assert json.loads((path / "normalization.json").read_text())["stats"]["actions"]["max"] == [1.0] * 4
    assert json.loads((path / "config.json").read_text())["config"] == CONFIG


def test_the_export_of_a_step_holds_the_ema_weights_and_the_training_state_the_raw_ones(tmp_path):
    run = Run()
    for step in range(3):
        run.train_step(step)
    path = run.save(tmp_path, step=3)
    exported, raw = load_file(str(path / "model.safetensors")), load_file(str(path / "training_model.safetensors"))
    for name, shadow in run.ema.state_dict().items():
        assert torch.equal(exported[name], shadow), name
    for name, weight in run.model.state_dict().items():
        assert torch.equal(raw[name], weight), name
    assert not torch.equal(exported["0.weight"], raw["0.weight"])


def test_resumed_run_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    reference = Run()
    for step in range(6):
        reference.train_step(step)

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    interrupted = Run()
    for step in range(3):
        interrupted.train_step(step)
    path = interrupted.save(tmp_path, step=3)
    for step in range(3, 5):  # work lost to the crash, on a different RNG stream
        interrupted.train_step(step)

    resumed = Run(seed=123)
    state = resumed.load(path)
    assert state.step == 3 and state.sampler_state == {"epoch": 0, "index": 48}
    assert state.config == CONFIG
    for step in range(state.step, 6):
        resumed.train_step(step)

    for (name, a), b in zip(
        reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    for name, a in reference.ema.state_dict().items():
        assert torch.equal(a, resumed.ema.state_dict()[name]), name
    assert resumed.scheduler.get_last_lr() == reference.scheduler.get_last_lr()


def test_rng_round_trip_repeats_the_next_draws():
    state = capture_rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    restore_rng_state(state)
    second = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == second[:3] and torch.equal(first[3], second[3])


def test_crash_mid_write_leaves_the_previous_checkpoint_valid(tmp_path, monkeypatch):
    run = Run()
    good = run.save(tmp_path, step=10)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt, "write_complete_marker", crash)
    with pytest.raises(KeyboardInterrupt):
        run.save(tmp_path, step=20)
    assert not (tmp_path / "step_00000020").exists()
    assert find_latest_valid_checkpoint(tmp_path) == good

    monkeypatch.undo()
    run.save(tmp_path, step=30)
    assert not list(tmp_path.glob(".partial-*")), "the next save cleans up the interrupted write"


def test_find_latest_skips_incomplete_and_truncated_checkpoints_with_a_warning(tmp_path, caplog):
    run = Run()
    good = run.save(tmp_path, step=1)
    truncated = run.save(tmp_path, step=2)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(10)
    unfinished = run.save(tmp_path, step=3)
    (unfinished / "complete").unlink()

    with caplog.at_level("WARNING"):
        assert find_latest_valid_checkpoint(tmp_path) == good
    assert "step_00000003" in caplog.text and "marker" in caplog.text
    assert "step_00000002" in caplog.text and "model.safetensors" in caplog.text
    with pytest.raises(FileNotFoundError, match="find_latest_valid_checkpoint"):
        run.load(unfinished)


def _flip_a_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "training_model.safetensors", "training_state.pt", "config.json",
                                  "normalization.json"])
def test_a_file_damaged_at_the_same_size_is_refused_by_its_hash(tmp_path, caplog, name):
    run = Run()
    good = run.save(tmp_path, step=1)
    damaged = run.save(tmp_path, step=2)
    size = (damaged / name).stat().st_size
    _flip_a_byte(damaged / name, size - 3)
    assert (damaged / name).stat().st_size == size

    with caplog.at_level("WARNING"):
        assert find_latest_valid_checkpoint(tmp_path) == good
    assert "step_00000002" in caplog.text and name in caplog.text and "sha256" in caplog.text
    with pytest.raises(FileNotFoundError, match=f"{name}.*sha256.*damaged"):
        run.load(damaged)
    with pytest.raises(FileNotFoundError, match=f"{name}.*sha256.*Copy it again"):
        ckpt.resolve_checkpoint(damaged)


def test_an_edited_checkpoint_loads_once_sealed(tmp_path):
    run = Run()
    path = run.save(tmp_path, step=1)
    saved = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**saved, "config": {"model": {"hidden": 9}}}))
    assert "config.json" in ckpt.marker_problem(path)
    ckpt.seal_checkpoint(path)
    assert ckpt.marker_problem(path) is None
    assert run.load(path).config == {"model": {"hidden": 9}}


def test_a_checkpoint_of_a_newer_format_asks_for_an_upgrade(tmp_path):
    path = Run().save(tmp_path, step=1)
    marker = json.loads((path / "complete").read_text())
    (path / "complete").write_text(json.dumps({**marker, "format_version": ckpt.FORMAT_VERSION + 1}))
    assert "upgrade drifting-vla" in ckpt.marker_problem(path)


def test_a_checkpoint_of_an_earlier_format_is_refused_naming_the_version(tmp_path):
    path = Run().save(tmp_path, step=1)
    marker = json.loads((path / "complete").read_text())
    sizes = {name: record["bytes"] for name, record in marker["files"].items()}
    (path / "complete").write_text(json.dumps({"step": 1, "files": sizes}))
    assert "format_version None" in ckpt.marker_problem(path)
    (path / "complete").write_text(json.dumps({**marker, "format_version": 2}))
    assert "format_version 2" in ckpt.marker_problem(path) and "save it again" in ckpt.marker_problem(path)


@pytest.mark.parametrize(("name", "content"), [("training_state.pt", b"written by some other program"),
                                             ("normalization.json", b'{"stats": {"min": [0]')])
def test_an_unreadable_file_of_a_whole_checkpoint_is_named_and_nothing_is_restored(tmp_path, name, content):
    run = Run()
    path = run.save(tmp_path, step=1)
    (path / name).write_bytes(content)
    ckpt.seal_checkpoint(path)
    other = Run(seed=1)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(DamagedCheckpointError, match=f"{name}.*another drifting-vla or torch version"):
        other.load(path)
    for name, value in other.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_find_latest_in_an_empty_or_missing_directory_is_none(tmp_path):
    assert find_latest_valid_checkpoint(tmp_path / "nothing") is None


def test_prune_keeps_the_newest_k_whole_checkpoints(tmp_path):
    run = Run()
    paths = [run.save(tmp_path, step=s) for s in (5, 10, 15, 20)]
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(deleted) == paths[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000015", "step_00000020"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    run = Run()
    run.save(tmp_path, step=7)
    run.save(tmp_path, step=7)
    assert find_latest_valid_checkpoint(tmp_path).name == "step_00000007"


def test_loading_into_another_architecture_is_an_error(tmp_path):
    path = Run().save(tmp_path, step=1)
    other = Run()
    other.model[2] = nn.Linear(8, 5)
    with pytest.raises(Exception, match="does not match|size|shape"):
        other.load(path)


def test_resume_loads_every_stored_weight_strictly_and_references_the_frozen_encoder(tmp_path):
    run = Run(encoder=PretrainedEncoder())
    run.train_step(0)
    path = run.save(tmp_path, step=1)
    stored = load_file(str(path / "training_model.safetensors"))
    assert sorted(load_file(str(path / "model.safetensors"))) == sorted(stored) == ["1.bias", "1.weight", "2.bias", "2.weight", "3.bias", "3.weight"]
    reference = json.loads((path / "pretrained_weights.json").read_text())["0"]
    assert reference["source"] == "org/encoder" and reference["revision"] == "abc123" and reference["parameters"] == 20

    resumed = Run(seed=123, encoder=PretrainedEncoder())
    resumed.load(path)
    for (name, a), b in zip(run.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    with pytest.raises(ValueError, match=r"frozen encoder 0 \(model.vision: org/encoder at revision abc123\).*model.vision.revision"):
        Run(encoder=PretrainedEncoder(shift=0.1)).load(path)


def test_a_checkpoint_write_that_fills_the_disk_gives_its_space_back_and_says_so(tmp_path, monkeypatch):
    """Found by a hostile probe: the partial write of a failed checkpoint held the disk it had filled."""
    import errno

    run = Run()
    good = run.save(tmp_path, step=10)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "write_complete_marker", disk_full)
    with pytest.raises(OSError, match=rf"cannot write checkpoint step 20 into {tmp_path} \(No space left on device\) "
                                      r"after \d+ MiB; the partial write was deleted\. .*training.keep_checkpoints"):
        run.save(tmp_path, step=20)
    assert not list(tmp_path.glob(".partial-*"))
    assert find_latest_valid_checkpoint(tmp_path) == good


def test_remove_stale_partials_deletes_what_a_killed_write_left(tmp_path):
    partial = tmp_path / ".partial-step_00000020-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 1024)
    ckpt.remove_stale_partials(tmp_path)
    assert not partial.exists()


@pytest.mark.parametrize("missing", ["model.safetensors", "training_model.safetensors", "training_state.pt"])
def test_an_explicit_step_missing_a_file_is_refused_with_the_reason(tmp_path, missing):
    """Found by a hostile probe: an explicit path to a step without its weights said "no whole checkpoint" and not why."""
    path = Run().save(tmp_path, step=10)
    (path / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {path} is not whole: '{missing}' is missing"):
        ckpt.resolve_checkpoint(path)
