"""The trainer: strict configs, exact resume after SIGKILL, NaN handling, DDP == one process."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.registry import build_dataset, register_dataset
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.training.config import validate_training_config
from drifting_vla.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rlbench_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rlbench")
    write_rlbench_fixture(root / "train", episodes=3, steps=12, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=12, seed=1)
    return root


def overrides_for(root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=tiny_cpu", "data=rlbench", f"data.root={root}", "data.tasks=[close_jar]",
        "data.cameras=[front,wrist]", "data.image_size=16", "data.cache_dir=null", "data.horizon=4",
        "data.keyframes=false", "data.num_workers=0", f"run_dir={run_dir}", "training.wandb.mode=disabled",
        "training.num_threads=1", *extra,
    ]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "drifting_vla" / "configs"), version_base=None):
        return compose("config", overrides=overrides)


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    with pytest.raises(Exception, match="learning_rat"):
        compose_config(["training.learning_rat=1e-3"])


def test_wrong_type_in_training_config_is_an_error_naming_the_key():
    cfg = compose_config(["training.max_steps=abc", "run_dir=/tmp/x"])
    with pytest.raises(ValueError, match="training.max_steps"):
        validate_training_config(cfg.training)
    cfg = compose_config(["training.nan_policy=ignore", "run_dir=/tmp/x"])
    with pytest.raises(ValueError, match="training.nan_policy"):
        validate_training_config(cfg.training)


def _train_script(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [a for a in overrides_for(root, run_dir, *extra) if not a.startswith("run_dir=")]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


def test_run_killed_with_sigkill_resumes_to_the_same_weights(rlbench_root, tmp_path):
    steps = ["training.max_steps=150", "training.checkpoint_every=10", "training.val_every=50", "training.keep_checkpoints=20"]
    straight = _train_script(rlbench_root, tmp_path / "straight", *steps)
    assert straight.wait(timeout=300) == 0, straight.stderr.read()

    killed_dir = tmp_path / "killed"
    killed = _train_script(rlbench_root, killed_dir, *steps)
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "step_00000030" / "complete").exists():
        assert killed.poll() is None, f"run ended before it could be killed: {killed.stderr.read()}"
        assert time.time() < deadline
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "checkpoints" / "step_00000150").exists(), "the kill came too late to test resume"

    resumed = _train_script(rlbench_root, killed_dir, *steps, "training.resume=auto")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    for name, value in _final_weights(tmp_path / "straight", 150).items():
        torch.testing.assert_close(_final_weights(killed_dir, 150)[name], value, rtol=0, atol=0, msg=name)


def test_nan_loss_stops_the_run_naming_the_step_or_is_skipped_when_configured(rlbench_root, tmp_path, monkeypatch):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path / "nan", "training.max_steps=3"))
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer.normalizer, "actions_offset", torch.full_like(trainer.normalizer.actions_offset, float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss .* at step 0 .*close_jar"):
        trainer.fit()

    cfg = compose_config(overrides_for(rlbench_root, tmp_path / "skip", "training.max_steps=3", "training.nan_policy=skip"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(trainer.normalizer, "actions_offset", torch.full_like(trainer.normalizer.actions_offset, float("nan")))
    trainer.fit()
    assert trainer.skipped_steps == 3
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=f"{name} changed on a skipped step")



def _rank_main(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(compose_config(overrides))
    trainer.fit()
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    torch.save({k: v.detach().clone() for k, v in weights.items()}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy,accum", [("ddp", 1), ("ddp", 2), ("fsdp", 1)])
def test_two_gloo_ranks_stay_identical_and_match_one_process_on_the_global_batch(tmp_path, strategy, accum):
    """One phrasing per episode: each rank draws random phrasings from its own stream, the only
    input a W-rank run does not share with one process on the global batch."""
    root = tmp_path / "data"
    write_rlbench_fixture(root / "train", episodes=3, steps=12, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=12, seed=1)
    for descriptions in root.glob("*/close_jar/all_variations/episodes/*/variation_descriptions.pkl"):
        descriptions.write_bytes(pickle.dumps(["close the jar"]))
    common = ["training.max_steps=6", "training.val_every=3", "training.checkpoint_every=100"]
    common.append(f"training.grad_accum_steps={accum}")
    ranks_run = overrides_for(root, tmp_path / "ranks", *common, f"training.batch_size={4 // accum}", f"training.distributed.strategy={strategy}")
    mp.spawn(_rank_main, args=(2, free_port(), ranks_run, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    single = Trainer(compose_config(overrides_for(root, tmp_path / "single", *common, f"training.batch_size={8 // accum}")))
    single.fit()
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=f"replicas differ at {name}")
        # Reductions sum in another order (~1e-7 relative), and Adam divides a gradient by its own
        # size: on a near-zero gradient that can move a weight by up to the learning rate (3e-4).
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=3e-4, msg=lambda m, name=name: f"{strategy} differs from one process at {name}: {m}")
    logged = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    single_logged = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for ours, theirs in zip(logged, single_logged, strict=True):
        for key in ("train/loss", "train/lambda_V", "train/feature_scale", "val/loss"):
            if key in theirs:
                assert ours[key] == pytest.approx(theirs[key], rel=1e-3), (key, ours["step"])
    assert any(not np.allclose(v.numpy(), 0) for v in ranks[0].values())
    # The checkpoint holds full state whatever the strategy: a single-process policy loads it.
    policy = DriftingPolicy.from_checkpoint(tmp_path / "ranks")
    loaded = policy.model.state_dict()
    for name, value in load_file(tmp_path / "ranks" / "checkpoints" / "step_00000006" / "ema.safetensors").items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_a_resumed_run_continues_the_metric_history_of_the_trend_panels(rlbench_root, tmp_path):
    common = ["training.log_every=1", "training.val_every=0", "training.checkpoint_every=2"]
    Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *common, "training.max_steps=4"))).fit()
    with (tmp_path / "metrics.jsonl").open("a") as f:  # a killed run may have logged past its checkpoint
        f.write(json.dumps({"step": 5, "train/loss": 99.0}) + "\n")
    resumed = Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *common, "training.max_steps=6", "training.resume=auto")))
    steps, losses = resumed.history.series("train/loss")
    assert steps.tolist() == [1, 2, 3, 4] and 99.0 not in losses.tolist()


def _prepare_slowly(cfg) -> None:
    time.sleep(1.0)  # a rank that did not wait would build before this is done
    (Path(str(cfg["root"])) / f"prepared_by_rank{os.environ.get('RANK', 0)}").touch()


@register_dataset("rlbench_prepared", prepare=_prepare_slowly)
def _build_prepared(cfg, split):
    assert list(Path(str(cfg["root"])).glob("prepared_by_rank*")), "built before the data was prepared"
    return build_dataset({**cfg, "name": "rlbench"}, split)


def test_under_two_ranks_rank_zero_alone_prepares_the_data_and_the_other_waits(tmp_path):
    root = tmp_path / "data"
    write_rlbench_fixture(root / "train", episodes=2, steps=12, seed=0)
    run = overrides_for(root, tmp_path / "ranks", "data.name=rlbench_prepared", "training.max_steps=2", "training.val_every=0")
    mp.spawn(_rank_main, args=(2, free_port(), run, str(tmp_path)), nprocs=2, join=True)
    assert sorted(p.name for p in root.glob("prepared_by_rank*")) == ["prepared_by_rank0"]


TINY_DINOV2 = (
    "+model.vision={name: dinov2, name_or_path: random, input_size: 28, arch: {hidden_size: 32, num_hidden_layers: 2, "
    "num_attention_heads: 2, intermediate_size: 64, patch_size: 14, image_size: 28}}"
)


def test_feature_cache_trains_exactly_like_running_the_frozen_backbone(rlbench_root, tmp_path):
    results = []
    for cache in ("false", "true"):
        cfg = compose_config(overrides_for(rlbench_root, tmp_path / cache, "training.max_steps=4", "~model.vision",
                                           TINY_DINOV2, f"training.feature_cache={cache}"))
        trainer = Trainer(cfg)
        trainer.fit()
        results.append(trainer.model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_feature_cache_refuses_a_trainable_backbone(rlbench_root, tmp_path):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.feature_cache=true"))
    with pytest.raises(ValueError, match="frozen vision backbone"):
        Trainer(cfg)


@pytest.mark.parametrize("objective", ["drifting", "regression", "flow_matching", "diffusion"])
def test_validation_measures_the_chunks_the_policy_executes(rlbench_root, tmp_path, objective):
    # val/action_mse must come from the same sampler, nfe and noise as the closed-loop policy:
    # a baseline once looked healthy in validation and failed every rollout.
    cfg = compose_config(overrides_for(rlbench_root, tmp_path / "run", f"training.objective={objective}", "training.max_steps=3"))
    trainer = Trainer(cfg)
    trainer.fit()
    measured = trainer.validate()["val/action_mse"]
    with trainer.ema.applied_to(trainer.model):
        policy = DriftingPolicy(trainer.model, trainer.normalizer, trainer.objective, nfe=trainer.eval_nfe, sampler=trainer.eval_sampler)
        errors = []
        for i, batch in trainer.validation_batches():
            chunk = torch.as_tensor(policy.predict_action_chunk(batch, generator=trainer.validation_generator(i)))
            normalize = trainer.normalizer.normalize
            errors.append(float((normalize("actions", chunk) - normalize("actions", batch["actions"].float())).square().mean()))
    assert len(errors) >= 1
    assert measured == pytest.approx(sum(errors) / len(errors), rel=1e-4)
