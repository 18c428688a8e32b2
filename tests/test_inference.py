"""Inference: DriftingPolicy from a checkpoint, closed-loop execution modes, parallel rollouts, RLBench env."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from drifting_vla.data.normalization import Normalizer, compute_stats
from drifting_vla.data.rlbench_dataset import POSE_ACTION_SPEC
from drifting_vla.data.transforms import canonical_quaternion
from drifting_vla.envs import env_import_path, make_env, rlbench_env
from drifting_vla.envs.seeds import evaluation_seeds
from drifting_vla.evaluation.results import (
    EpisodeRecord,
    EvalSummary,
    EvaluationError,
    check_evaluated,
    read_episodes,
    wilson_interval,
)
from drifting_vla.evaluation.rollout import evaluate
from drifting_vla.formats.checkpoint import seal_checkpoint
from drifting_vla.formats.validation import training_config
from drifting_vla.formats.weights import DamagedCheckpointError
from drifting_vla.inference.policy import DriftingPolicy, ensemble_actions
from drifting_vla.logging.trajectory_video import PLOT_HEIGHT_PX, TITLE_HEIGHT_PX
from drifting_vla.models.drifting_vla import build_model
from drifting_vla.objectives.methods import OBJECTIVES, build_objective
from drifting_vla.serving import ChunkedPolicy
from drifting_vla.specs import RLBENCH_ACTION_SPEC, ActionSpec, default_execute_steps
from tests.fake_envs import FakeRLBench
from tests.helpers import (
    TASK,
    CountingGenerator,
    env_batch,
    observation_batch,
    run_simulate_eval,
    tiny_cfg,
    tiny_policy,
    write_checkpoint,
)

# ----------------------------------------------------------------------------------------------
# Policy


def test_from_checkpoint_loads_the_ema_weights_and_the_normalization(checkpoint):
    path, _, ema, normalizer = checkpoint
    policy = DriftingPolicy.from_checkpoint(path)
    weights = policy.model.state_dict()
    for name, value in ema.shadow.items():
        torch.testing.assert_close(weights[name], value)
    torch.testing.assert_close(policy.normalizer.actions_scale, normalizer.actions_scale)
    assert policy.checkpoint == path


def test_from_checkpoint_accepts_a_run_directory(checkpoint):
    path = checkpoint[0]
    assert DriftingPolicy.from_checkpoint(path.parent.parent).checkpoint == path


def test_from_checkpoint_refuses_normalization_for_another_action_spec(checkpoint):
    path = checkpoint[0]
    saved = json.loads((path / "normalization.json").read_text())
    saved["action_spec"]["components"][0]["dim"] = 2
    saved["action_spec"]["components"].append({"name": "extra", "kind": "raw", "dim": 1})
    (path / "normalization.json").write_text(json.dumps(saved))
    seal_checkpoint(path)
    with pytest.raises(ValueError, match="action spec"):
        DriftingPolicy.from_checkpoint(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "abc"])
def test_normalization_stats_that_are_not_finite_numbers_are_refused_naming_the_file(checkpoint, value):
    # min/max scaling turns a NaN or an infinity in the statistics into every action the policy outputs
    path = checkpoint[0]
    saved = json.loads((path / "normalization.json").read_text())
    saved["stats"]["actions"]["max"][0] = value
    (path / "normalization.json").write_text(json.dumps(saved))
    seal_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match=r"normalization.json .*stats\['actions'\]\['max'\] are not all finite"):
        DriftingPolicy.from_checkpoint(path)


@pytest.mark.parametrize("key, value, message", [
    ("cameras", "front", "config key data.cameras='front' must be a list"),  # not a list of 5 characters
    ("image_size", -1, "config key data.image_size=-1 must be >= 1"),
])
def test_a_checkpoint_config_is_checked_like_a_runs_naming_the_file(checkpoint, key, value, message):
    path = checkpoint[0]
    saved = json.loads((path / "config.json").read_text())
    saved["config"]["data"][key] = value
    (path / "config.json").write_text(json.dumps(saved))
    seal_checkpoint(path)
    with pytest.raises(ValueError, match=re.escape(f"{path / 'config.json'}: {message}")):
        DriftingPolicy.from_checkpoint(path)


def test_a_damaged_or_foreign_checkpoint_file_is_named_when_a_policy_loads(checkpoint):
    path = checkpoint[0]
    (path / "normalization.json").write_text(json.dumps({"actions": {"min": [0.0]}}))  # another layout
    with pytest.raises(FileNotFoundError, match="normalization.json.*marker says.*Copy it again"):
        DriftingPolicy.from_checkpoint(path)
    seal_checkpoint(path)
    with pytest.raises(DamagedCheckpointError, match="normalization.json.*not 'stats' and 'action_spec'"):
        DriftingPolicy.from_checkpoint(path)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_policy_chunk_is_the_objectives_own_sample_in_raw_units(objective):
    # The guard against evaluating something other than what was trained: the policy's chunk is
    # objective.sample on the same random draws, only unnormalized.
    policy = tiny_policy(objective=objective)
    obs = observation_batch()
    chunk = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    assert chunk.shape == (2, 4, 4) and chunk.dtype == np.float32
    with torch.no_grad():
        condition = policy.model.encode_condition({**obs, "proprio": policy.normalizer.normalize("proprio", obs["proprio"])})
        own = policy.objective.sample(policy.model, condition, 1, policy.nfe, policy.sampler, torch.Generator().manual_seed(5))[:, 0]
    np.testing.assert_allclose(chunk, policy.normalizer.unnormalize("actions", own).numpy(), rtol=1e-5, atol=1e-6)
    again = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(5))
    np.testing.assert_array_equal(chunk, again)


def test_regression_policy_is_deterministic_and_sees_the_zeros_it_was_trained_on():
    policy = tiny_policy(objective="regression")
    obs = observation_batch()
    first, second = policy.predict_action_chunk(obs), policy.predict_action_chunk(obs)
    np.testing.assert_array_equal(first, second)
    with torch.no_grad():
        normalized_obs = {**obs, "proprio": policy.normalizer.normalize("proprio", obs["proprio"])}
        zeros = torch.zeros(2, 1, 4, policy.model.noise_dim)
        trained_on = policy.normalizer.unnormalize("actions", policy.model(normalized_obs, zeros)[:, 0])
    np.testing.assert_allclose(first, trained_on.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("objective, nfe", [("drifting", 10), ("regression", 2)])
def test_one_step_objectives_refuse_another_nfe_naming_the_objective(objective, nfe):
    with pytest.raises(ValueError, match=f"{objective} objective"):
        tiny_policy(objective=objective, nfe=nfe)


def test_sampler_is_checked_against_the_objective():
    assert tiny_policy(objective="diffusion", sampler="ddpm", nfe=100).sampler == "ddpm"
    with pytest.raises(ValueError, match="sampler='ddpm' is not valid for the flow_matching objective"):
        tiny_policy(objective="flow_matching", sampler="ddpm")


def test_one_unbatched_observation_gives_one_action():
    policy = tiny_policy()
    obs = observation_batch(batch=1)
    single = {"images": obs["images"][0], "proprio": obs["proprio"][0], "instruction": obs["instruction"][0]}
    assert policy.predict_action_chunk(single).shape == (4, 4)
    assert policy.select_action(single).shape == (4,)
    with pytest.raises(ValueError, match=r"images \[V, 3, H, W\]"):
        policy.select_action({**single, "images": obs["images"]})






def test_chunk_queue_replans_exactly_every_execute_steps():
    policy = tiny_policy(horizon=8, execution="chunk", execute_steps=3)
    policy.predict_action_chunk = generator = CountingGenerator(8)
    executed = [policy.select_action(env_batch([0, 1]))[:, 0] for _ in range(7)]
    assert generator.calls == 3  # steps 0, 3, 6
    assert [a[0] for a in executed] == [0, 1, 2, 100, 101, 102, 200]
    assert [a[1] for a in executed] == [10, 11, 12, 110, 111, 112, 210]


def test_chunk_queue_replans_only_the_envs_whose_queue_is_empty():
    policy = tiny_policy(horizon=8, execution="chunk", execute_steps=2)
    policy.predict_action_chunk = generator = CountingGenerator(8)
    policy.select_action(env_batch([0, 1]))
    policy.reset(1)
    policy.select_action(env_batch([0, 1]))  # env 1 replans, env 0 executes its queue
    assert generator.batch_sizes == [2, 1]
    policy.select_action(env_batch([0, 1]))  # env 0 replans, env 1 does not
    assert generator.batch_sizes == [2, 1, 1]


def test_policies_name_the_envs_that_drew_a_new_chunk_for_the_trajectory_videos():
    policy = tiny_policy(horizon=8, execution="chunk", execute_steps=2)
    policy.predict_action_chunk = CountingGenerator(8)
    chunked = ChunkedPolicy(lambda obs, seed: np.zeros((8, 4), np.float32), horizon=8, execute_steps=2)
    for queue in (policy, chunked):
        queue.select_action(env_batch([0, 1]))
        assert queue.replanned == [0, 1]
        queue.reset(1)
        queue.select_action(env_batch([0, 1]))
        assert queue.replanned == [1]
        queue.select_action(env_batch([0, 1]))
        assert queue.replanned == [0]
    ensemble = tiny_policy(horizon=3, execution="ensemble")
    ensemble.predict_action_chunk = CountingGenerator(3)
    ensemble.select_action(env_batch([0, 1]))
    assert ensemble.replanned == [0, 1]


def test_temporal_ensembling_matches_the_hand_computed_weighted_average():
    decay = 0.5
    policy = tiny_policy(horizon=3, execution="ensemble", ensemble_decay=decay)
    policy.predict_action_chunk = CountingGenerator(3)
    actions = [policy.select_action(env_batch([0]))[0, 0] for _ in range(4)]
    w = [math.exp(-decay * i) for i in range(3)]
    assert actions[0] == pytest.approx(0.0)
    assert actions[1] == pytest.approx((w[0] * 1 + w[1] * 100) / (w[0] + w[1]))
    # step 2: chunks from steps 0, 1, 2 cover it at their indices 2, 1, 0 (oldest weighted w0)
    assert actions[2] == pytest.approx((w[0] * 2 + w[1] * 101 + w[2] * 200) / sum(w))
    # step 3: the chunk from step 0 (horizon 3) no longer covers it
    assert actions[3] == pytest.approx((w[0] * 102 + w[1] * 201 + w[2] * 300) / sum(w))


def test_reset_of_one_env_restarts_only_its_ensemble():
    policy = tiny_policy(horizon=3, execution="ensemble", ensemble_decay=0.0)
    policy.predict_action_chunk = CountingGenerator(3)
    policy.select_action(env_batch([0, 1]))
    policy.reset(0)
    actions = policy.select_action(env_batch([0, 1]))[:, 0]
    assert actions[0] == pytest.approx(100)  # env 0: a fresh start, only the new chunk
    assert actions[1] == pytest.approx((11 + 110) / 2)  # env 1 keeps its history


def test_ensembling_q_and_minus_q_gives_that_rotation_where_component_means_cancel():
    q = np.array([np.cos(np.radians(15)), np.sin(np.radians(15)), 0.0, 0.0])  # top-down grasp: qw = 0
    candidates = np.stack([np.r_[0.1, 0.2, 0.3, q, 1.0, 0.0], np.r_[0.3, 0.2, 0.3, -q, 1.0, 1.0]])
    out = ensemble_actions(candidates, np.array([1.0, 0.6]), RLBENCH_ACTION_SPEC)
    np.testing.assert_allclose(out[:3], [(0.1 + 0.6 * 0.3) / 1.6, 0.2, 0.3])
    assert abs(out[3:7] @ q) == pytest.approx(1.0, abs=1e-6)  # the same rotation (a component mean: 0.25 q)
    assert out[7:].tolist() == [1.0, 0.0]  # the flag: weighted vote 0.6 / 1.6 < 0.5


def test_temporal_ensembling_of_rlbench_chunks_gives_unit_quaternions_and_binary_flags():
    torch.manual_seed(0)
    cfg = rlbench_cfg()
    policy = DriftingPolicy(build_model(cfg), rlbench_normalizer(), build_objective(training_config(cfg.training)),
                            execution="ensemble", ensemble_decay=0.1)
    rng = np.random.default_rng(0)
    top_down = np.array([np.cos(np.radians(15)), np.sin(np.radians(15)), 0.0, 0.0])

    def predict(obs):
        """Chunks around a top-down grasp as the normalizer returns them (unit, qw >= 0): a tiny
        tilt either way flips the whole quaternion's sign from one chunk to the next."""
        q = canonical_quaternion(top_down + rng.normal(scale=0.01, size=(1, 4, 4)))
        return np.concatenate([rng.uniform(0, 1, (1, 4, 3)), q, rng.uniform(0, 1, (1, 4, 2))], -1).astype(np.float32)

    policy.predict_action_chunk = predict
    obs = {"images": np.zeros((1, 1, 3, 32, 32), np.uint8), "proprio": np.zeros((1, 8), np.float32), "instruction": ["close jar"]}
    for _ in range(6):
        action = policy.select_action(obs)[0]
        assert np.linalg.norm(action[3:7]) == pytest.approx(1.0, abs=1e-5) and abs(action[3:7] @ top_down) > 0.999
        assert set(action[7:].tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------------
# Rollouts


def test_wilson_interval_matches_the_textbook_values():
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == (pytest.approx(0.4902, abs=1e-4), pytest.approx(0.9433, abs=1e-4))
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0


def test_evaluation_seeds_come_from_eval_seeds_and_never_from_training_seeds():
    data = tiny_cfg().data
    assert evaluation_seeds(data, 3) == [100000, 100001, 100002]
    data.eval_seeds.start = 10
    with pytest.raises(ValueError, match="training seeds"):
        evaluation_seeds(data, 3)


def test_summary_dict_and_table_report_rates_per_task():
    summary = EvalSummary(
        [EpisodeRecord("a", 0, True, 5, 1.0), EpisodeRecord("a", 1, False, 9, 1.0, error="boom"), EpisodeRecord("b", 0, True, 3, 1.0)],
        seconds=3.0,
    )
    d = summary.to_dict()
    assert d["success_rate"] == pytest.approx(2 / 3) and d["episodes"] == 3
    assert d["per_task"] == {"a": 0.5, "b": 1.0} and d["errors"] == 1
    assert "overall" in summary.format_table() and "b" in summary.format_table()
    assert "stages" not in d


def test_summary_reports_how_far_a_staged_reward_got():
    names = ["touched", "lifted", "transfer attempted", "transferred"]
    records = [EpisodeRecord("transfer_cube", seed, stage == 4, 400, 1.0, stage=stage, stage_names=names)
               for seed, stage in enumerate([0, 1, 2, 2, 4])]
    summary = EvalSummary(records)
    assert summary.to_dict()["stages"] == {"transfer_cube": {"touched": 0.8, "lifted": 0.6, "transfer attempted": 0.2, "transferred": 0.2}}
    assert "stages reached (transfer_cube): touched 80%, lifted 60%, transfer attempted 20%, transferred 20%" in summary.format_table()


def test_rollout_reports_simulator_errors_and_dead_workers_as_failed_episodes(tmp_path):
    policy = tiny_policy(execution="chunk", execute_steps=2)
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "scripted"
    assert env_import_path(data) == "tests.fake_envs:ScriptedEnv"
    summary = evaluate(
        policy, data, tasks=[TASK], seeds=[0, 1, 2, 3, 4], num_workers=2, output_dir=tmp_path,
        videos_per_task=1, max_episode_steps=6, progress=False,
    )
    by_seed = {r.seed: r for r in summary.records}
    assert sorted(by_seed) == [0, 1, 2, 3, 4]
    assert by_seed[0].success and by_seed[0].steps == 3 and by_seed[4].success
    assert not by_seed[1].success and "simulated InvalidActionError" in by_seed[1].error
    assert not by_seed[2].success and "died" in by_seed[2].error
    assert not by_seed[3].success and by_seed[3].error is None and by_seed[3].steps == 6
    records = read_episodes(tmp_path)
    assert len(records) == 5 and {r["seed"] for r in records} == {0, 1, 2, 3, 4}
    assert summary.to_dict()["success_rate"] == pytest.approx(0.4)
    assert (by_seed[0].stage, by_seed[3].stage, list(by_seed[3].stage_names)) == (3, 2, ["moved", "moved twice", "succeeded"])
    assert by_seed[1].stage == 1  # the furthest stage before the simulator raised
    assert summary.to_dict()["stages"][TASK] == {"moved": 1.0, "moved twice": 0.6, "succeeded": 0.4}
    assert by_seed[0].video and (tmp_path / "videos" / f"{TASK}_seed0.mp4").stat().st_size > 0


def no_workers(monkeypatch):
    """Fail the test if an evaluation starts a simulator worker."""
    from drifting_vla.evaluation import rollout

    monkeypatch.setattr(rollout, "Worker", lambda *a, **k: pytest.fail("a simulator worker was started"))


def test_an_evaluation_without_workers_is_refused_not_reported_as_zero(monkeypatch):
    no_workers(monkeypatch)
    with pytest.raises(ValueError, match="num_workers=0: an evaluation needs at least one simulator worker"):
        evaluate(tiny_policy(), tiny_cfg().data, seeds=[0], num_workers=0, progress=False)


def test_a_second_evaluation_into_the_same_output_is_refused_and_leaves_the_first_ones_records(monkeypatch, tmp_path):
    from drifting_vla.formats.files import FileLock, LockHeld

    no_workers(monkeypatch)
    (tmp_path / "episodes.jsonl").write_text('{"task": "a", "seed": 0}\n')  # the first evaluation's, so far
    with FileLock(tmp_path / ".lock", "the first evaluation", ""):
        with pytest.raises(LockHeld, match=rf"evaluation output {tmp_path} is in use by process .*output="):
            evaluate(tiny_policy(), tiny_cfg().data, seeds=[0], output_dir=tmp_path, progress=False)
    assert read_episodes(tmp_path) == [{"task": "a", "seed": 0}]


def test_unknown_tasks_are_refused_before_any_worker_starts(monkeypatch):
    no_workers(monkeypatch)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['reach-v9'\] for the simulator 'metaworld'.*'reach-v3'"):
        evaluate(tiny_policy(), tiny_cfg().data, tasks=[TASK, "reach-v9"], seeds=[0], progress=False)
    with pytest.raises(ValueError, match=r"tasks must be a list of task names, e.g. \[reach-v3\]"):
        evaluate(tiny_policy(), tiny_cfg().data, tasks=TASK, seeds=[0], progress=False)


def test_a_summary_of_fewer_episodes_than_queued_is_an_error():
    summary = EvalSummary([EpisodeRecord("a", 0, False, 5, 1.0)])
    with pytest.raises(EvaluationError, match="1 of the 2 queued episodes ran"):
        check_evaluated(summary, expected=2)
    with pytest.raises(EvaluationError, match="0 of the 1 queued episodes ran"):
        check_evaluated(EvalSummary([]), expected=1)


def test_rlbench_tasks_are_the_installed_rlbench_task_files(tmp_path, monkeypatch):
    from drifting_vla.envs.rlbench_env import RLBenchEnv

    monkeypatch.delitem(sys.modules, "rlbench", raising=False)
    (tmp_path / "rlbench" / "tasks").mkdir(parents=True)
    for name in ("__init__", "open_drawer", "close_jar"):
        (tmp_path / "rlbench" / "tasks" / f"{name}.py").touch()
    (tmp_path / "rlbench" / "__init__.py").touch()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert RLBenchEnv.known_tasks() == {"open_drawer", "close_jar"}


def test_episodes_with_a_video_also_get_a_trajectory_video_one_frame_per_observation(tmp_path):
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "scripted"
    summary = evaluate(
        tiny_policy(execution="chunk", execute_steps=2), data, tasks=[TASK], seeds=[0, 3, 4], num_workers=2,
        output_dir=tmp_path, videos_per_task=2, max_episode_steps=6, progress=False,
    )
    by_seed = {r.seed: r for r in summary.records}
    expected = {0: tmp_path / "videos" / f"{TASK}_seed0_trajectory.mp4", 3: tmp_path / "videos" / f"{TASK}_seed3_trajectory.mp4"}
    assert {seed: by_seed[seed].trajectory_video for seed in expected} == {seed: str(p) for seed, p in expected.items()}
    assert by_seed[4].trajectory_video is None and sorted(summary.to_dict()["trajectory_videos"]) == sorted(map(str, expected.values()))
    for seed, path in expected.items():
        frames = imageio.mimread(path, memtest=False)
        assert len(frames) == by_seed[seed].steps + 1  # the reset frame, then one per step
        assert frames[0].shape == (TITLE_HEIGHT_PX + PLOT_HEIGHT_PX, 32 + 2 * PLOT_HEIGHT_PX, 3)
        assert np.abs(frames[-1].astype(int) - frames[0].astype(int)).mean() > 1
    records = read_episodes(tmp_path)
    assert {r["seed"]: r["trajectory_video"] for r in records}[0] == str(expected[0])


def test_a_task_whose_every_episode_errored_raises_after_writing_the_summary(tmp_path):
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "scripted"
    with pytest.raises(EvaluationError, match=r"\['unbuildable'\].*cannot be built.*__main__") as raised:
        evaluate(tiny_policy(), data, tasks=["unbuildable", TASK], seeds=[0, 4], num_workers=1, output_dir=tmp_path, progress=False)
    errors = {r.task: r.error for r in raised.value.summary.records}
    assert "cannot be built" in errors["unbuildable"] and errors[TASK] is None
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["per_task_errors"] == {"unbuildable": 2, TASK: 0} and summary["errors"] == 2


def test_a_script_without_a_main_guard_fails_loudly_naming_the_pitfall(tmp_path):
    # Spawned workers re-import the calling script; unguarded, each one dies starting its own
    # evaluation. That once reported success 0.00 and exited 0.
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from omegaconf import OmegaConf\n"
        "import tests.fake_envs\n"
        "from tests.helpers import tiny_cfg, tiny_policy\n"
        "from drifting_vla.evaluation.rollout import evaluate\n"
        "data = OmegaConf.to_container(tiny_cfg().data)\n"
        "data['name'] = 'scripted'\n"
        "evaluate(tiny_policy(), data, seeds=[0], num_workers=1, progress=False, step_timeout_s=60)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=root, env=env)
    assert result.returncode != 0
    assert "EvaluationError" in result.stderr and 'if __name__ == "__main__":' in result.stderr


def test_metaworld_rollout_with_two_workers_writes_episodes_summary_and_video(tmp_path):
    policy = tiny_policy(execution="ensemble")
    data = tiny_cfg().data
    summary = evaluate(
        policy, data, episodes=2, num_workers=2, output_dir=tmp_path, videos_per_task=1,
        max_episode_steps=10, progress=False,
    )
    d = summary.to_dict()
    assert d["episodes"] == 2 and set(d["per_task"]) == {TASK} and 0.0 <= d["success_rate"] <= 1.0
    assert d["errors"] == 0, [r.error for r in summary.records]
    records = read_episodes(tmp_path)
    assert {r["seed"] for r in records} == {100000, 100001}
    assert all(set(r) >= {"task", "seed", "success", "steps", "seconds", "error"} for r in records)
    video = tmp_path / "videos" / f"{TASK}_seed100000.mp4"
    assert video.stat().st_size > 1000 and not (tmp_path / "videos" / f"{TASK}_seed100001.mp4").exists()
    trajectory = imageio.mimread(tmp_path / "videos" / f"{TASK}_seed100000_trajectory.mp4", memtest=False)
    steps = next(r["steps"] for r in records if r["seed"] == 100000)
    assert len(trajectory) == steps + 1 and trajectory[0].shape == (TITLE_HEIGHT_PX + PLOT_HEIGHT_PX, 256 + 2 * PLOT_HEIGHT_PX, 3)


def test_make_env_picks_the_class_by_data_name():
    env = make_env(tiny_cfg().data, TASK)
    try:
        obs = env.reset(100000)
        assert obs["images"].shape == (2, 3, 32, 32) and obs["proprio"].shape == (4,)
    finally:
        env.close()


# ----------------------------------------------------------------------------------------------
# RLBench (no CoppeliaSim here: only what runs without the simulator)


def test_rlbench_env_without_rlbench_names_the_docker_image(monkeypatch):
    import sys

    from drifting_vla.envs.rlbench_env import RLBenchEnv

    monkeypatch.setitem(sys.modules, "rlbench", None)  # importing it now fails, installed or not
    monkeypatch.setitem(sys.modules, "pyrep", None)
    with pytest.raises(ModuleNotFoundError, match="drifting-vla:rlbench") as error:
        make_env({"name": "rlbench", "cameras": ["front"], "image_size": 128, "keyframes": True}, "open_drawer")
    assert "docker/Dockerfile.rlbench" in str(error.value)
    assert env_import_path({"name": "rlbench"}).endswith(RLBenchEnv.__name__)


def test_rlbench_sanitize_makes_a_unit_canonical_quaternion_in_bounds_and_binary_flags():
    from drifting_vla.envs.rlbench_env import sanitize_action

    bounds = ((-0.3, -0.5, 0.6), (0.7, 0.5, 1.6))
    out = sanitize_action([1.0, -2.0, 1.0, 0.0, 0.0, 0.6, -0.8 * 2, 0.51], bounds)
    np.testing.assert_allclose(out[:3], [0.7, -0.5, 1.0])
    assert np.linalg.norm(out[3:7]) == pytest.approx(1.0) and out[6] > 0
    np.testing.assert_allclose(out[3:7], -np.array([0.0, 0.0, 0.6, -1.6]) / np.linalg.norm([0.6, 1.6]))
    assert out[7] == 1.0
    assert sanitize_action([0, 0, 1, 0, 0, 0, 0, 0.49], bounds)[3:].tolist() == [0, 0, 0, 1, 0]
    assert sanitize_action([0, 0, 1, 0, 0, 0, 1, 0.7, 0.51], bounds)[7:].tolist() == [1, 1]  # ignore_collisions
    assert sanitize_action([0, 0, 1, 0, 0, 0, 1, 0.7, 0.49], bounds)[7:].tolist() == [1, 0]
    with pytest.raises(ValueError, match="8 values.*or 9 with ignore_collisions, got 7"):
        sanitize_action([0, 0, 1, 0, 0, 0, 1], bounds)
    with pytest.raises(ValueError, match="non-finite"):
        sanitize_action([np.nan, 0, 1, 0, 0, 0, 1, 1], bounds)


def rlbench_data(**overrides) -> dict:
    return {"name": "rlbench", "cameras": ["front"], "image_size": 32, "keyframes": True, **overrides}


@pytest.mark.parametrize(
    "action, configured, sent",
    [
        ([0.2, 0, 1, 0, 0, 0, 1, 1, 0.8], False, 1.0),  # the predicted flag, not the configured one
        ([0.2, 0, 1, 0, 0, 0, 1, 1, 0.2], True, 0.0),
        ([0.2, 0, 1, 0, 0, 0, 1, 1], True, 1.0),  # an action without the flag: the configured one
        ([0.2, 0, 1, 0, 0, 0, 1, 1], False, 0.0),
    ],
)
def test_rlbench_env_sends_the_predicted_ignore_collisions_else_the_configured_one(monkeypatch, action, configured, sent):
    sim = FakeRLBench(action_size=9)
    monkeypatch.setattr(rlbench_env, "import_rlbench", sim.import_rlbench)
    env = make_env(rlbench_data(ignore_collisions=configured), "close_jar")
    env.reset(0)
    env.step(np.array(action))
    assert sim.commands[-1].tolist() == [0.2, 0, 1, 0, 0, 0, 1, 1, sent]


def test_upstream_rlbench_takes_no_ignore_collisions_flag(monkeypatch):
    sim = FakeRLBench(action_size=8)
    monkeypatch.setattr(rlbench_env, "import_rlbench", sim.import_rlbench)
    env = make_env(rlbench_data(), "close_jar")
    env.reset(0)
    env.step(np.array([0.2, 0, 1, 0, 0, 0, 1, 1, 1]))
    assert sim.commands[-1].tolist() == [0.2, 0, 1, 0, 0, 0, 1, 1]


def rlbench_cfg(action_spec: ActionSpec = RLBENCH_ACTION_SPEC, ignore_collisions: bool = False):
    """The tiny network on RLBench's close_jar with `action_spec` (one camera at 32x32)."""
    return OmegaConf.create({
        "model": OmegaConf.load("drifting_vla/configs/model/tiny.yaml"),
        "data": {**OmegaConf.load("drifting_vla/configs/data/rlbench.yaml"), **rlbench_data(ignore_collisions=ignore_collisions),
                 "tasks": ["close_jar"], "instructions": ["close jar"], "action_spec": action_spec.to_config()},
        "training": {"objective": "drifting"},
    })


def rlbench_normalizer(action_spec: ActionSpec = RLBENCH_ACTION_SPEC) -> Normalizer:
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(0, 1, (64, 3)), rng.normal(size=(64, 4)), rng.integers(0, 2, (64, action_spec.dim - 7))], 1)
    stats = compute_stats({"actions": actions, "proprio": rng.uniform(0, 1, (64, 8))})
    return Normalizer(stats, action_spec, proprio_dim=8)


def rlbench_checkpoint(run_dir: Path, action_spec: ActionSpec, ignore_collisions: bool) -> Path:
    """A tiny RLBench checkpoint trained with `action_spec`, as an older run (without the flag) or
    a current one saved it."""
    return write_checkpoint(run_dir, rlbench_cfg(action_spec, ignore_collisions), rlbench_normalizer(action_spec))[0]


def test_rlbench_policy_sends_its_predicted_ignore_collisions(tmp_path, monkeypatch):
    policy = DriftingPolicy.from_checkpoint(rlbench_checkpoint(tmp_path, RLBENCH_ACTION_SPEC, ignore_collisions=True))
    with torch.no_grad():  # a policy sure the planner must avoid collisions, against the configured flag
        policy.model.action_decoder.heads["ignore_collisions"][-1].bias.fill_(-30.0)
    sim = FakeRLBench(action_size=9)
    monkeypatch.setattr(rlbench_env, "import_rlbench", sim.import_rlbench)
    env = make_env(policy.cfg["data"], "close_jar")
    action = policy.select_action(env.reset(0))
    env.step(action)
    assert action.shape == (9,) and action[8] < 0.5 and sim.commands[-1][8] == 0.0


def test_a_checkpoint_trained_without_the_flag_still_loads_and_acts_with_the_configured_one(tmp_path, monkeypatch):
    policy = DriftingPolicy.from_checkpoint(rlbench_checkpoint(tmp_path, POSE_ACTION_SPEC, ignore_collisions=True))
    assert policy.action_spec == POSE_ACTION_SPEC
    sim = FakeRLBench(action_size=9)
    monkeypatch.setattr(rlbench_env, "import_rlbench", sim.import_rlbench)
    env = make_env(policy.cfg["data"], "close_jar")
    action = policy.select_action(env.reset(0))
    env.step(action)
    assert action.shape == (8,) and sim.commands[-1][8] == 1.0


# ----------------------------------------------------------------------------------------------
# scripts/simulate_eval.py




def payload_checkpoint(tmp_path):
    """A downloaded run whose config names a module shipped inside it (importable: its folder is on
    the path, as a run under the checkout's runs/ is); importing the module creates `marker`."""
    cfg = tiny_cfg()
    cfg.data.name = "payload:Env"
    path = write_checkpoint(tmp_path / "run", cfg)[0]
    marker = tmp_path / "payload_ran"
    (path / "payload.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nclass Env: ...\n")
    return path, marker


def test_evaluating_a_run_never_imports_the_module_its_config_names(tmp_path):
    path, marker = payload_checkpoint(tmp_path)
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={path}", "episodes=1", "workers=1", "progress=false", f"output={tmp_path / 'eval'}",
        env={"PYTHONPATH": str(path)},
    )
    assert result.returncode != 0
    assert "data.name='payload:Env' is not a registered simulator" in result.stderr
    assert "plugins=[your.module]" in result.stderr
    assert not marker.exists()


def test_evaluate_builds_registered_simulators_only(tmp_path, monkeypatch):
    path, marker = payload_checkpoint(tmp_path)
    monkeypatch.syspath_prepend(str(path))
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "payload:Env"
    with pytest.raises(ValueError, match="'payload:Env' is not a registered simulator"):
        evaluate(tiny_policy(), data, seeds=[0], num_workers=1, progress=False)
    with pytest.raises(ValueError, match="'payload:Env' is not a registered simulator"):
        DriftingPolicy.from_checkpoint(path)
    assert not marker.exists()


def test_simulate_eval_writes_summary_json_and_prints_the_table(checkpoint, tmp_path):
    out = tmp_path / "eval"
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={checkpoint[0].parent.parent}", "episodes=1", "workers=1", "max_episode_steps=4",
        "videos_per_task=0", f"output={out}", "progress=false", "num_threads=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["episodes"] == 1 and set(summary["per_task"]) == {TASK}
    assert isinstance(summary["success_rate"], float) and summary["protocol"] == "metaworld | drifting nfe=1 | chunk 1/4"
    assert "overall" in result.stdout


def test_simulate_eval_logs_the_trajectory_videos_to_wandb_when_asked(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "eval"
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={checkpoint[0]}", "episodes=1", "workers=1", "max_episode_steps=4",
        "videos_per_task=1", f"output={out}", "progress=false", "num_threads=1", "wandb_mode=offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trajectory = out / "videos" / f"{TASK}_seed100000_trajectory.mp4"
    assert json.loads((out / "summary.json").read_text())["trajectory_videos"] == [str(trajectory)]
    assert len(imageio.mimread(trajectory, memtest=False)) == 5
    assert len(list((out / "wandb").rglob("media/videos/eval/trajectory_video_*.mp4"))) == 1


def test_simulate_eval_rejects_an_unknown_key_by_name(checkpoint, tmp_path):
    result = run_simulate_eval(tmp_path, f"checkpoint={checkpoint[0]}", "episdoes=3")
    assert result.returncode != 0 and "episdoes" in result.stderr


def test_predicting_leaves_a_training_model_in_training_mode():
    policy = tiny_policy()
    policy.model.train()
    policy.predict_action_chunk(observation_batch())
    assert policy.model.training


def _rewrite(path: Path, name: str, weights: dict) -> None:
    """Replace one file of a checkpoint, keeping its completeness marker true."""
    from safetensors.torch import save_file

    save_file(weights, str(path / name))
    seal_checkpoint(path)


def test_checkpoint_missing_other_weights_is_an_error_naming_them(checkpoint):
    from safetensors.torch import load_file

    path = checkpoint[0]
    weights = load_file(str(path / "model.safetensors"))
    _rewrite(path, "model.safetensors", {k: v for k, v in weights.items() if not k.startswith("dit.blocks.0.")})
    with pytest.raises(KeyError, match="dit.blocks.0"):
        DriftingPolicy.from_checkpoint(path)


def test_every_path_that_executes_chunks_defaults_to_the_same_horizon():
    # Training's evaluation passes its null setting to DriftingPolicy; simulate_eval and the served
    # client build ChunkedPolicy: one default, so a run is evaluated the way it will be executed.
    from drifting_vla.formats.validation import training_config

    assert training_config({}).eval.execute_steps is None
    assert [default_execute_steps(h) for h in (1, 4, 8, 16)] == [1, 1, 2, 4]
    assert tiny_policy(horizon=8).execute_steps == 2
    assert ChunkedPolicy(lambda obs, seed: np.zeros((8, 4), np.float32), horizon=8).execute_steps == 2
