"""Run logger (metrics.jsonl, PNG panels, mp4 videos, WandB modes) and the ten training panels."""

import json

import imageio.v2 as imageio
import numpy as np
import pytest

from drifting_vla.logging.visualizations import (
    PANELS,
    MetricHistory,
    PanelInputs,
    dimension_names,
    due_panels,
    end_effector_dims,
    kmeans,
)
from drifting_vla.logging.wandb_logger import NullRunLogger, RunLogger, create_run_logger
from drifting_vla.specs import METAWORLD_ACTION_SPEC, RLBENCH_ACTION_SPEC, ActionSpec

SPECS = {"metaworld_4d": METAWORLD_ACTION_SPEC, "rlbench_9d": RLBENCH_ACTION_SPEC}


def step_inputs(spec: ActionSpec, b: int = 6, g: int = 8, t: int = 16) -> PanelInputs:
    """One training step's arrays: smooth expert chunks, noisy samples, a field pointing home."""
    rng = np.random.default_rng(0)
    a = spec.network_dim  # the panels show normalized actions, as the network sees them
    phase = np.linspace(0, 1, t)[None, :, None]
    expert = np.sin(3 * phase + rng.uniform(0, 3, (b, 1, a)))
    generated = expert[:, None] + 0.2 * rng.standard_normal((b, g, t, a))
    drift = 0.5 * (expert[:, None] - generated)
    history = MetricHistory()
    for step in range(0, 300, 10):
        history.record(step, {"train/loss": 3.0, "train/lambda_V": 1.0 / (1 + step)})
        for temperature in ("0.02", "0.05", "0.2"):
            history.record(step, {f"train/raw_drift_norm/{temperature}": 0.5 / (1 + step)})
    return PanelInputs.from_step(generated, expert, drift, spec, history)


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("panel", PANELS)
def test_every_panel_renders_a_fixed_size_rgb_image(panel, spec_name):
    image = PANELS[panel](step_inputs(SPECS[spec_name]))
    assert image.shape == (720, 960, 3) and image.dtype == np.uint8
    assert image.std() > 10, "the panel is not blank"


@pytest.mark.parametrize("panel", ["a2_lambda_v_trend", "a5_loss_and_drift_norms"])
def test_trend_panels_render_before_anything_was_logged(panel):
    inputs = step_inputs(METAWORLD_ACTION_SPEC)
    empty = PanelInputs(inputs.generated, inputs.expert, inputs.drift, inputs.dim_names)
    assert PANELS[panel](empty).shape == (720, 960, 3)


def test_trajectory_panel_renders_a_message_for_a_spec_without_positions():
    spec = ActionSpec.from_config({"components": [{"name": "joints", "kind": "raw", "dim": 7}]})
    assert PANELS["b4_end_effector_trajectory"](step_inputs(spec)).shape == (720, 960, 3)


def test_dimension_names_and_end_effector_come_from_the_action_spec():
    assert dimension_names(RLBENCH_ACTION_SPEC) == (
        "x",
        "y",
        "z",
        "r00",
        "r10",
        "r20",
        "r01",
        "r11",
        "r21",
        "gripper",
        "ignore_collisions",
    )
    assert dimension_names(METAWORLD_ACTION_SPEC) == ("dx", "dy", "dz", "gripper_effort")
    assert end_effector_dims(RLBENCH_ACTION_SPEC) == (slice(0, 3), False)
    assert end_effector_dims(METAWORLD_ACTION_SPEC) == (slice(0, 3), True)


def test_panel_inputs_reject_mismatched_shapes_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"expert must be \[B, T, A\]"):
        PanelInputs(np.zeros((2, 4, 5, 3)), np.zeros((2, 5, 4)), np.zeros((2, 4, 5, 3)), ("a",) * 3)


def test_kmeans_finds_well_separated_modes():
    rng = np.random.default_rng(0)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = np.concatenate([c + 0.1 * rng.standard_normal((20, 2)) for c in centers])
    found, labels = kmeans(points, 3)
    assert len(set(labels[:20])) == len(set(labels[20:40])) == len(set(labels[40:])) == 1
    assert np.allclose(np.sort(found[:, 0]), [0, 0, 10], atol=0.2)


def test_due_panels_follow_the_frequencies_and_zero_turns_a_panel_off():
    config = {"a2_lambda_v_trend": {"frequency": 50}, "c2_mode_coverage": {"frequency": 0}}
    assert due_panels(100, config) == ["a2_lambda_v_trend"]
    assert due_panels(101, config) == []


def test_an_unknown_panel_or_a_bad_frequency_names_the_key():
    with pytest.raises(KeyError, match="a9_typo"):
        due_panels(0, {"a9_typo": {"frequency": 1}})
    with pytest.raises(ValueError, match="a1_drifting_field.frequency"):
        due_panels(0, {"a1_drifting_field": {"frequency": "often"}})


def test_metrics_jsonl_has_one_parseable_object_per_call_with_the_step(tmp_path):
    with RunLogger(tmp_path, mode="disabled") as logger:
        logger.log_metrics({"train/loss": np.float32(3.5), "train/lambda_V": 0.2}, step=1)
        logger.log_metrics({"train/loss": float("nan")}, step=2)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "train/loss": 3.5, "train/lambda_V": 0.2},
        {"step": 2, "train/loss": None},
    ]
    steps, values = logger.history.series("train/loss")
    assert steps.tolist() == [1] and values.tolist() == [3.5]


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_and_the_next_record_starts_its_own_line(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    with caplog.at_level("WARNING"):
        history = MetricHistory.from_jsonl(tmp_path / "metrics.jsonl", up_to_step=10)
    assert history.series("train/loss")[0].tolist() == [1]
    assert "metrics.jsonl line 2 is not JSON" in caplog.text
    with RunLogger(tmp_path, mode="disabled") as logger:
        logger.log_metrics({"train/loss": 1.5}, step=3)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[-1] == '{"step": 3, "train/loss": 1.5}'


def test_panels_and_videos_are_written_to_the_run_directory(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (6, 33, 47, 3), dtype=np.uint8)
    with RunLogger(tmp_path, mode="disabled") as logger:
        panel = logger.log_panel("a2_lambda_v_trend", np.zeros((72, 96, 3), np.uint8), step=500)
        video = logger.log_video("sim/reach-v3", frames, step=500, fps=10)
    assert panel == tmp_path / "panels" / "a2_lambda_v_trend" / "00000500.png"
    assert imageio.imread(panel).shape == (72, 96, 3)
    assert video == tmp_path / "videos" / "sim_reach-v3_00000500.mp4"
    assert len(imageio.mimread(video)) == 6


def test_a_video_that_is_not_uint8_frames_is_refused(tmp_path):
    with RunLogger(tmp_path, mode="disabled") as logger, pytest.raises(ValueError, match="uint8"):
        logger.log_video("episode", np.zeros((4, 8, 8, 3), np.float32), step=0)


def test_offline_wandb_writes_a_local_run_without_an_account(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with RunLogger(tmp_path, mode="offline", config={"training": {"max_steps": 2}}) as logger:
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_panel("a2_lambda_v_trend", np.zeros((8, 8, 3), np.uint8), step=1)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_video_files_are_logged_to_wandb_under_the_given_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    paths = [tmp_path / f"episode{k}_trajectory.mp4" for k in range(2)]
    for k, path in enumerate(paths):
        imageio.mimwrite(path, np.full((3, 16, 16, 3), 100 * k, np.uint8), fps=10, codec="libx264", macro_block_size=2)
    with RunLogger(tmp_path / "run", mode="offline") as logger:
        logger.log_video_files("eval/trajectory_video", paths, step=7)
    logged = list((tmp_path / "run" / "wandb").rglob("media/videos/eval/trajectory_video_*.mp4"))
    assert len(logged) == 2


def test_online_without_an_api_key_falls_back_to_offline_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with caplog.at_level("WARNING"), RunLogger(tmp_path, mode="online") as logger:
        assert logger.mode == "offline"
    assert "WANDB_API_KEY" in caplog.text


def test_an_unknown_mode_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="online"):
        create_run_logger(tmp_path, rank=1, mode="cloud")


def test_ranks_other_than_zero_write_nothing(tmp_path):
    logger = create_run_logger(tmp_path / "run", rank=1, mode="disabled")
    assert isinstance(logger, NullRunLogger)
    with logger:
        logger.log_metrics({"train/loss": 1.0}, step=1)
        logger.log_panel("a1_drifting_field", np.zeros((8, 8, 3), np.uint8), step=1)
    assert not (tmp_path / "run").exists()
