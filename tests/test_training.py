"""The trainer: strict configs, exact resume after SIGKILL, NaN handling, DDP == one process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.neighbours import NeighbourIndex
from drifting_vla.data.registry import build_dataset, register_dataset
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.formats.files import LockHeld
from drifting_vla.formats.validation import (
    validate_eval_config,
    validate_run_config,
    validate_serve_config,
    validate_training_config,
)
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.training.trainer import Trainer
from tests.helpers import ROOT, compose_config, free_port, hold_the_lock, overrides_for


@pytest.fixture(scope="module")
def rlbench_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rlbench")
    write_rlbench_fixture(root / "train", episodes=3, steps=12, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=12, seed=1)
    return root






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


@pytest.mark.parametrize("override, message", [
    ("training.grad_clip=-1", "training.grad_clip=-1.0 must be > 0"),
    ("training.learning_rate=0", "training.learning_rate=0.0 must be > 0"),
    ("training.betas=[0.9,1.5]", "training.betas=[0.9, 1.5] must be < 1"),
    ("training.drifting.temperatures=[0.05,-0.2]", "training.drifting.temperatures=[0.05, -0.2] must be > 0"),
    ("training.eval.workers=0", "training.eval.workers=0 must be >= 1"),
    ("training.wandb.visualizations.a1_drifting_field.frequency=-5", "training.wandb.visualizations.a1_drifting_field.frequency=-5 must be >= 0"),
    ("data.horizon=0", "data.horizon=0 must be >= 1"),
    ("data.image_size=2.5", "data.image_size: Value '2.5' of type 'float' could not be converted to Integer"),
    ("data.action_spec.components.0.dim=0", "data.action_spec.components[0].dim=0 must be >= 1"),
    ("+data.eval_seeds={start: 5, count: 0}", "data.eval_seeds.count=0 must be >= 1"),
    ("model.dit.depth=0", "model.dit.depth=0 must be >= 1"),
    ("model.vision.num_stages=-1", "model.vision.num_stages=-1 must be >= 1"),
    ("model.language.dim=0", "model.language.dim=0 must be >= 1"),
    ("seed=-3", "seed=-3 must be >= 0"),
    ("training.learning_rate=inf", "training.learning_rate=inf must be a finite number"),
    ("model.dit.mlp_ratio=inf", "model.dit.mlp_ratio=inf must be a finite number"),
    ("training.betas=[0.9]", "training.betas=[0.9] must hold exactly 2 item(s)"),
    ("training.drifting.temperatures=[]", "training.drifting.temperatures=[] must hold at least 1 item(s)"),
    ("data.cameras=[]", "data.cameras=[] must hold at least 1 item(s)"),
    ("data.cameras=[front,wrist,front]", "data.cameras=['front', 'wrist', 'front'] names ['front'] more than once"),
    ("data.image_size=4096", "data.image_size=4096 must be <= 1024"),
    ("data.tasks=[]", "data.tasks=[] must hold at least 1 item(s)"),
    ("model.dit.num_heads=3", "model.dit.num_heads=3 must divide model.dit.hidden_size=32"),
])
def test_an_out_of_range_setting_of_any_group_fails_at_start_naming_the_key(rlbench_root, tmp_path, override, message):
    # data.root names nothing: the run must fail on the setting before it reads any data
    cfg = compose_config([*overrides_for(rlbench_root, tmp_path, override), f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(ValueError, match=re.escape(f"config key {message}")):
        Trainer(cfg)


def test_a_scalar_where_a_list_belongs_is_an_error_not_a_list_of_characters(rlbench_root, tmp_path):
    cfg = compose_config([*overrides_for(rlbench_root, tmp_path), "data.tasks=close_jar"])
    with pytest.raises(ValueError, match=re.escape("config key data.tasks='close_jar' must be a list, e.g. data.tasks=[close_jar]")):
        Trainer(cfg)


def test_execute_steps_beyond_the_horizon_fails_at_start(rlbench_root, tmp_path):
    cfg = compose_config([*overrides_for(rlbench_root, tmp_path, "training.eval.at_end=true", "training.eval.execute_steps=5"),
                          f"data.root={tmp_path / 'absent'}"])
    with pytest.raises(ValueError, match=re.escape("training.eval.execute_steps=5 must be in [1, data.horizon=4]")):
        Trainer(cfg)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "drifting_vla" / "configs" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes_the_schema(experiment):
    validate_run_config(compose_config([f"experiment={experiment}", "run_dir=/tmp/unused"]))


PLUGIN_DATASET = """
from dataclasses import dataclass

from drifting_vla.data.registry import register_dataset
from drifting_vla.formats.config import DataConfig
from drifting_vla.formats.settings import setting


@dataclass(kw_only=True)
class RobotDataConfig(DataConfig):
    root: str = setting()
    episodes_per_file: int = setting(10, ge=1)


@register_dataset("my_robot", schema=RobotDataConfig)
def build_robot(cfg, split="train"):
    raise AssertionError("only the schema is checked here: no run gets as far as building the data")
"""


def test_a_plugin_dataset_declares_the_schema_of_its_own_keys_and_they_are_checked_at_start(tmp_path, monkeypatch):
    import drifting_vla.data.registry as registry
    import drifting_vla.formats.config as config
    from drifting_vla.plugins import load_plugins

    monkeypatch.setitem(config.DATA_SCHEMAS, "my_robot", config.DataConfig)  # the plugin's entry goes with the test
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))
    (tmp_path / "robot_plugin.py").write_text(PLUGIN_DATASET)
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugins(["robot_plugin"])

    def run_config(**data):
        cfg = compose_config(["experiment=tiny_cpu", "run_dir=/tmp/unused"])
        shared = {key: cfg.data[key] for key in ("cameras", "proprio_dim", "horizon", "action_spec")}
        cfg.data = {"name": "my_robot", **shared, **data}
        return cfg

    validate_run_config(run_config(root="/data/robot"))
    with pytest.raises(ValueError, match=re.escape("config key data.episodes_per_file=0 must be >= 1")):
        validate_run_config(run_config(root="/data/robot", episodes_per_file=0))
    with pytest.raises(ValueError, match="data.episodes_per_fil"):
        validate_run_config(run_config(root="/data/robot", episodes_per_fil=3))
    with pytest.raises(ValueError, match="config key data.root is missing"):
        validate_run_config(run_config())
    sys.modules.pop("robot_plugin")


@pytest.mark.parametrize("config, override, message", [
    ("eval", "workers=0", "workers=0 must be >= 1"),
    ("eval", "tasks=close_jar", "tasks='close_jar' must be a list, e.g. tasks=[close_jar]"),
    ("eval", "episodes=-1", "episodes=-1 must be >= 1"),
    ("eval", "ensemble_decay=-0.5", "ensemble_decay=-0.5 must be >= 0"),
    ("serve", "port=70000", "port=70000 must be <= 65535"),
    ("serve", "max_batch=0", "max_batch=0 must be >= 1"),
    ("serve", "max_wait_ms=inf", "max_wait_ms=inf must be a finite number"),
    ("serve", "max_instruction_chars=0", "max_instruction_chars=0 must be >= 1"),
    ("serve", "max_image_pixels=0", "max_image_pixels=0 must be >= 1"),
    ("serve", "instruction_cache=0", "instruction_cache=0 must be >= 1"),
])
def test_evaluation_and_server_settings_are_range_checked_naming_the_key(config, override, message):
    with initialize_config_dir(config_dir=str(ROOT / "drifting_vla" / "configs"), version_base=None):
        overrides = ["checkpoint=runs/x", "output=/tmp/unused", override] if config == "eval" else ["checkpoint=runs/x", override]
        cfg = compose(config, overrides=overrides)
    validate = validate_eval_config if config == "eval" else validate_serve_config
    with pytest.raises(ValueError, match=re.escape(f"config key {message}")):
        validate(cfg)


def test_a_task_the_simulator_does_not_know_fails_before_training(rlbench_root, tmp_path):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.eval.at_end=true", "training.eval.execute_steps=2",
                                       "+data.simulator={name: metaworld, tasks: [reach-v9]}"))
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['reach-v9'\] for the simulator 'metaworld'"):
        Trainer(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_too_few_evaluation_seeds_fail_before_training(rlbench_root, tmp_path):
    simulator = "+data.simulator={name: metaworld, tasks: [reach-v3], eval_seeds: {start: 100, count: 3}}"
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.eval.at_end=true", "training.eval.episodes=25", simulator))
    with pytest.raises(ValueError, match=re.escape("episodes=25 per task, but data.simulator.eval_seeds.count=3")):
        Trainer(cfg)
    assert not (tmp_path / "config.yaml").exists()


def _train_script(root: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [a for a in overrides_for(root, run_dir, *extra) if not a.startswith("run_dir=")]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )


def _final_weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / "model.safetensors")


@pytest.mark.parametrize("workers", [0, 2])
def test_run_killed_with_sigkill_resumes_to_the_same_weights(rlbench_root, tmp_path, workers):
    # The fixture's episodes have three phrasings each, drawn at random per sample: with loader
    # workers they must still come out the same after a resume (drawn from seed, epoch and index).
    steps = ["training.max_steps=150", "training.checkpoint_every=10", "training.val_every=50", "training.keep_checkpoints=20",
             f"data.num_workers={workers}", "training.drifting.positives.source=queue", "training.drifting.positives.k=2"]
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

    cfg = compose_config(overrides_for(rlbench_root, tmp_path / "skip", "training.max_steps=3", "training.nan_policy=skip",
                                       "training.max_skipped_fraction=1"))
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    monkeypatch.setattr(trainer.normalizer, "actions_offset", torch.full_like(trainer.normalizer.actions_offset, float("nan")))
    with pytest.raises(FloatingPointError, match="all 3 steps were skipped .* trained nothing, so no final checkpoint is written"):
        trainer.fit()
    assert trainer.skipped_steps == 3
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=f"{name} changed on a skipped step")
    assert not (tmp_path / "skip" / "checkpoints" / "step_00000003").exists()


def test_a_run_that_skips_more_steps_than_allowed_stops_at_once(rlbench_root, tmp_path, monkeypatch):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.max_steps=20", "training.nan_policy=skip",
                                       "training.max_skipped_fraction=0.1"))
    trainer = Trainer(cfg)
    monkeypatch.setattr(trainer.normalizer, "actions_offset", torch.full_like(trainer.normalizer.actions_offset, float("nan")))
    with pytest.raises(FloatingPointError, match=r"3 of the 3 steps so far were skipped .*training.max_skipped_fraction=0.1 .* allows \(2\)"):
        trainer.fit()
    assert trainer.step == 2 and not (tmp_path / "checkpoints").exists()



class _Crash(Exception):
    """Stands in for a killed process: the run dies right after a checkpoint, losing its memory."""


def _rank_main(rank: int, world: int, port: int, overrides: list[str], out: str, crash_after_step: int = 0) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(compose_config(overrides))
    if crash_after_step:
        save = trainer._save_checkpoint

        def save_then_crash():
            save()
            if trainer.step == crash_after_step:
                raise _Crash(f"rank {rank} crashed after step {trainer.step}")

        trainer._save_checkpoint = save_then_crash
        try:
            trainer.fit()
        except _Crash:
            torch.distributed.destroy_process_group()
            return
    trainer.fit()
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    torch.save({k: v.detach().clone() for k, v in weights.items()}, Path(out) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("strategy,accum", [("ddp", 1), ("ddp", 2), ("fsdp", 1)])
def test_two_gloo_ranks_stay_identical_and_match_one_process_on_the_global_batch(tmp_path, strategy, accum):
    """Three phrasings per episode, drawn at random per sample: from (seed, epoch, index), so
    every rank draws what one process on the global batch draws."""
    root = tmp_path / "data"
    write_rlbench_fixture(root / "train", episodes=3, steps=12, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=12, seed=1)
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
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=3e-4,
                                   msg=lambda m, name=name: f"{strategy} differs from one process at {name}: {m}")
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
    for name, value in load_file(tmp_path / "ranks" / "checkpoints" / "step_00000006" / "model.safetensors").items():
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


@pytest.mark.parametrize("n_obs_steps", [1, 2])
def test_feature_cache_trains_exactly_like_running_the_frozen_backbone(rlbench_root, tmp_path, n_obs_steps):
    results = []
    for cache in ("false", "true"):
        cfg = compose_config(overrides_for(rlbench_root, tmp_path / cache, "training.max_steps=4", "~model.vision",
                                           TINY_DINOV2, f"training.feature_cache={cache}", f"data.n_obs_steps={n_obs_steps}"))
        trainer = Trainer(cfg)
        trainer.fit()
        results.append(trainer.model.state_dict())
    for name, value in results[0].items():
        torch.testing.assert_close(results[1][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_feature_cache_refuses_a_trainable_backbone(rlbench_root, tmp_path):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.feature_cache=true"))
    with pytest.raises(ValueError, match="frozen vision backbone"):
        Trainer(cfg)


def test_feature_cache_with_augmentation_is_refused_before_encoding_anything(rlbench_root, tmp_path):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "~model.vision", TINY_DINOV2, "training.feature_cache=true",
                                       "training.augmentation.random_shift=4"))
    with pytest.raises(ValueError, match="unaugmented images"):
        Trainer(cfg)


@pytest.mark.parametrize("shift", ["4", "0"])
def test_training_batches_are_shifted_when_asked_and_validation_batches_never(rlbench_root, tmp_path, shift):
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.max_steps=2", "training.val_every=2",
                                       f"training.augmentation.random_shift={shift}"))
    trainer = Trainer(cfg)
    loaded, seen = [], []
    to_device, encode = trainer._to_device, trainer.model.vision_encoder.forward
    trainer._to_device = lambda batch: loaded.append(batch["images"].clone()) or to_device(batch)
    trainer.model.vision_encoder.forward = lambda images: seen.append(images.clone()) or encode(images)
    panel_frames, render_panels = [], trainer._render_panels
    trainer._render_panels = lambda last: panel_frames.append(last[0]["images"].clone()) or render_panels(last)
    trainer.fit()
    for step in (0, 1):
        assert seen[step].shape == loaded[step].shape
        assert torch.equal(seen[step], loaded[step]) == (shift == "0")
        assert torch.equal(panel_frames[step], loaded[step])  # the panels draw the frames the policy will see
    assert len(seen) > 2 and all(torch.equal(images, loaded[2]) for images in seen[2:])


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


@pytest.mark.parametrize("source", ["queue", "neighbours"])
def test_two_gloo_ranks_crashed_after_a_checkpoint_resume_to_the_same_weights(rlbench_root, tmp_path, source):
    common = ["training.max_steps=8", "training.checkpoint_every=4", "training.val_every=0", "training.batch_size=2",
              f"training.drifting.positives.source={source}", "training.drifting.positives.k=2"]
    straight = overrides_for(rlbench_root, tmp_path / "straight", *common)
    mp.spawn(_rank_main, args=(2, free_port(), straight, str(tmp_path / "straight")), nprocs=2, join=True)

    crashed = overrides_for(rlbench_root, tmp_path / "crashed", *common)
    mp.spawn(_rank_main, args=(2, free_port(), crashed, str(tmp_path / "crashed"), 4), nprocs=2, join=True)
    assert not (tmp_path / "crashed" / "checkpoints" / "step_00000008").exists()
    resumed = overrides_for(rlbench_root, tmp_path / "crashed", *common, "training.resume=auto")
    mp.spawn(_rank_main, args=(2, free_port(), resumed, str(tmp_path / "crashed")), nprocs=2, join=True)
    for name, value in _final_weights(tmp_path / "straight", 8).items():
        torch.testing.assert_close(_final_weights(tmp_path / "crashed", 8)[name], value, rtol=0, atol=0, msg=name)


def test_a_resumed_run_trains_on_the_checkpointed_neighbours_even_if_a_rebuild_differs(rlbench_root, tmp_path, monkeypatch):
    common = ["training.max_steps=6", "training.checkpoint_every=3", "training.val_every=3",
              "training.drifting.positives.source=neighbours", "training.drifting.positives.k=3"]
    straight = Trainer(compose_config(overrides_for(rlbench_root, tmp_path / "straight", *common)))
    straight.fit()
    crashed = Trainer(compose_config(overrides_for(rlbench_root, tmp_path / "crashed", *common)))
    save = crashed._save_checkpoint

    def save_then_crash():
        save()
        if crashed.step == 3:
            raise _Crash("killed after the checkpoint of step 3")

    crashed._save_checkpoint = save_then_crash
    with pytest.raises(_Crash):
        crashed.fit()
    built = NeighbourIndex.neighbours  # a rebuild on another machine could differ: here every row does
    monkeypatch.setattr(NeighbourIndex, "neighbours", lambda index: built(index).roll(1, dims=0))
    resumed = Trainer(compose_config(overrides_for(rlbench_root, tmp_path / "crashed", *common, "training.resume=auto")))
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_checkpoints_hold_every_ranks_random_state(rlbench_root, tmp_path):
    Trainer(compose_config(overrides_for(rlbench_root, tmp_path, "training.max_steps=2", "training.val_every=0"))).fit()
    checkpoint = next((tmp_path / "checkpoints").glob("step_*"))
    state = torch.load(checkpoint / "training_state.pt", weights_only=True)
    assert len(state["extra"]["ranks"]) == 1 and "rng" in state["extra"]["ranks"][0]


# --- one run per directory, and a refused resume that leaves it as it was ------------------------

def test_a_second_run_on_the_same_directory_is_refused_naming_the_first(rlbench_root, tmp_path):
    holder, _ = hold_the_lock(tmp_path, fork=False)
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "training.max_steps=2", "training.val_every=0"))
    try:
        with pytest.raises(LockHeld, match=rf"run directory .* is in use by process {holder.pid} on .*hydra.run.dir"):
            Trainer(cfg)
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").exists(), "a SIGKILL leaves the lock file behind"
    Trainer(cfg).fit()  # ... which blocks nobody
    assert not (tmp_path / ".lock").exists()


def _directory_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(path.rglob("*"))}


def test_a_refused_resume_changes_nothing_in_the_run_directory(rlbench_root, tmp_path):
    run = ["training.max_steps=2", "training.val_every=0", "training.log_every=1"]
    Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *run))).fit()
    before = _directory_digest(tmp_path)

    deeper = compose_config(overrides_for(rlbench_root, tmp_path, *run, "model.dit.depth=3", "training.resume=auto"))
    with pytest.raises(KeyError, match="does not match the model"):
        Trainer(deeper)
    assert _directory_digest(tmp_path) == before

    other_data = _train_script(rlbench_root, tmp_path, *run, "data.max_episodes_per_task=1", "training.resume=auto")
    assert other_data.wait(timeout=300) != 0
    assert "normalization statistics" in other_data.stderr.read()
    assert _directory_digest(tmp_path) == before  # nor did Hydra write into it


@pytest.mark.parametrize("override, named", [
    ("data.cameras=[wrist,front]", "data.cameras: ['front', 'wrist'] -> ['wrist', 'front']"),  # same shapes, same stats
    ("training.learning_rate=0.01", "training.learning_rate: 0.0003 -> 0.01"),  # the optimizer's state would restore 3e-4
])
def test_a_resume_that_changes_what_is_trained_is_refused_naming_the_key(rlbench_root, tmp_path, override, named):
    run = ["training.max_steps=2", "training.val_every=0", "training.log_every=1"]
    Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *run))).fit()
    before = _directory_digest(tmp_path)
    with pytest.raises(ValueError, match=re.escape(named)):
        Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *run, override, "training.resume=auto")))
    assert _directory_digest(tmp_path) == before
    longer = Trainer(compose_config(overrides_for(rlbench_root, tmp_path, *run, "training.max_steps=3", "data.num_workers=1",
                                                  "training.resume=auto")))
    assert longer.step == 2  # how long, and how fast the data is read, may change


def _weights(run_dir: Path, step: int, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step_{step:08d}" / name)


def test_a_frame_damaged_mid_episode_stops_training_naming_it_or_is_skipped_with_an_exact_resume(tmp_path, caplog):
    root = tmp_path / "data"
    write_rlbench_fixture(root / "train", episodes=3, steps=12, seed=0)
    frame = root / "train" / "close_jar" / "all_variations" / "episodes" / "episode1" / "wrist_rgb" / "6.png"
    frame.write_bytes(frame.read_bytes()[:40])
    run = ["training.max_steps=6", "training.checkpoint_every=3", "training.val_every=0", "training.keep_checkpoints=5"]
    with pytest.raises(CorruptEpisodeError, match="episode1/wrist_rgb/6.png.*data.skip_corrupt=true"):
        Trainer(compose_config(overrides_for(root, tmp_path / "strict", *run))).fit()

    straight = tmp_path / "straight"
    Trainer(compose_config(overrides_for(root, straight, *run, "data.skip_corrupt=true"))).fit()
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    caplog.clear()
    with caplog.at_level("WARNING"):
        Trainer(compose_config(overrides_for(root, resumed, *run, "data.skip_corrupt=true", "training.resume=auto"))).fit()
    assert "wrist_rgb/6.png" in caplog.text, "the resumed steps must meet the damaged frame again"
    for name, value in _weights(straight, 6).items():
        torch.testing.assert_close(_weights(resumed, 6)[name], value, rtol=0, atol=0, msg=name)


def test_a_resume_first_gives_back_the_space_a_failed_checkpoint_write_holds(rlbench_root, tmp_path):
    """Found by a hostile probe: a checkpoint write cut short (a full disk) left its partial directory holding the
    space, and the resumed run failed writing before its first save could clean it."""
    partial = tmp_path / "checkpoints" / ".partial-step_00000020-12345"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)
    trainer = Trainer(compose_config(overrides_for(rlbench_root, tmp_path, "training.resume=auto")))
    trainer.run_lock.release()
    assert not partial.exists()


def test_skip_corrupt_with_an_unreadable_val_split_fails_at_start_naming_the_file_and_the_key(rlbench_root, tmp_path, monkeypatch):
    """Found by a hostile probe: with data.skip_corrupt=true a damaged val split still stopped the run, at its first validation."""
    import drifting_vla.training.trainer as trainer_module
    from drifting_vla.data.skip_corrupt import SkipCorruptSamples

    class DamagedFrames(torch.utils.data.Dataset):
        """The val split as opened (its episodes pass the checks made on opening), every frame damaged."""

        def __init__(self, dataset) -> None:
            self.dataset = dataset

        def __len__(self) -> int:
            return len(self.dataset)

        def __getitem__(self, key):
            raise CorruptEpisodeError(f"{rlbench_root}/val/close_jar/episode0/front_rgb/{int(key)}.png is damaged")

    build = trainer_module.build_dataset

    def damaged_val(cfg, split="train"):
        dataset = build(cfg, split)
        return SkipCorruptSamples(DamagedFrames(dataset.dataset)) if split == "val" else dataset

    monkeypatch.setattr(trainer_module, "build_dataset", damaged_val)
    cfg = compose_config(overrides_for(rlbench_root, tmp_path, "data.skip_corrupt=true", "training.val_every=2"))
    with pytest.raises(CorruptEpisodeError, match=r"val split cannot be read, even with data.skip_corrupt=true: .*front_rgb/"
                                                  r".*stop the run at step 2: .*training.val_every=0"):
        Trainer(cfg)
