"""Observation history (`data.n_obs_steps`): the datasets, the network, the policy in a rollout, the
server and the trainer all see the same window of the last n observations."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from drifting_vla.data.fixtures import write_rlbench_fixture
from drifting_vla.data.metaworld_dataset import MetaWorldDataset, write_task_store
from drifting_vla.data.neighbours import NeighbourIndex, NeighbourPositives
from drifting_vla.data.registry import build_dataset
from drifting_vla.data.rlbench_dataset import RLBenchDataset
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.sampler import SampleKey
from drifting_vla.data.transforms import history_rows
from drifting_vla.evaluation.rollout import evaluate
from drifting_vla.formats.validation import training_config, validate_run_config
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.models.drifting_vla import build_model
from drifting_vla.objectives.methods import build_objective
from drifting_vla.serving import AsyncChunkExecutor, ChunkedPolicy, PolicyClient, ProtocolError
from drifting_vla.serving.protocol import check_observation
from drifting_vla.serving.server import policy_metadata, predict_chunks
from drifting_vla.specs import RLBENCH_ACTION_SPEC
from drifting_vla.training.trainer import Trainer
from tests.helpers import (
    TASK,
    Running,
    compose_config,
    fixture_dataset,
    overrides_for,
    tiny_cfg,
    tiny_normalizer,
    write_checkpoint,
)

CAMERAS = ["corner", "topview"]


def history_cfg(n_obs_steps: int = 2):
    cfg = tiny_cfg()
    cfg.data.n_obs_steps = n_obs_steps
    return cfg


def history_policy(n_obs_steps: int = 2, **kwargs) -> DriftingPolicy:
    torch.manual_seed(0)
    cfg = history_cfg(n_obs_steps)
    policy = DriftingPolicy(build_model(cfg), tiny_normalizer(cfg), build_objective(training_config(cfg.training)), **kwargs)
    policy.cfg, policy.checkpoint = OmegaConf.to_container(cfg, resolve=True), "tiny-history"
    return policy


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Two recorded episodes of 6 steps: every image and proprio value tells its row apart."""
    root = tmp_path_factory.mktemp("store")
    (root / "collection.json").write_text(json.dumps({"cameras": CAMERAS, "image_size": 32}))
    rng = np.random.default_rng(0)
    episodes = [
        {
            "images": rng.integers(0, 256, (6, 2, 3, 32, 32), dtype=np.uint8),
            "proprio": rng.uniform(-0.5, 0.5, (6, 4)).astype(np.float32),
            "state": np.zeros((6, 39), np.float32),
            "actions": rng.uniform(-1, 1, (6, 4)).astype(np.float32),
            "seed": k,
        }
        for k in range(2)
    ]
    write_task_store(root / TASK, episodes, {"instruction": tiny_cfg().data.instructions[0]})
    return root


def steps(store: Path, episode: int) -> list[dict]:
    """The recorded per-step observations of one episode, as an env returns them."""
    images, proprio = np.load(store / TASK / "images.npy"), np.load(store / TASK / "proprio.npy")
    rows = range(6 * episode, 6 * episode + 6)
    return [{"images": images[r], "proprio": proprio[r], "instruction": tiny_cfg().data.instructions[0]} for r in rows]


# ----------------------------------------------------------------------------------------------
# Datasets


def test_history_rows_repeat_the_episodes_first_row_before_its_start():
    assert history_rows(10, 10, 3).tolist() == [10, 10, 10]
    assert history_rows(11, 10, 3).tolist() == [10, 10, 11]
    assert history_rows(13, 10, 3).tolist() == [11, 12, 13]
    assert history_rows(13, 10, 1).tolist() == [13]


def test_metaworld_sample_holds_the_last_n_observations_oldest_first(store):
    single = MetaWorldDataset(store, [TASK], CAMERAS, horizon=4)
    history = MetaWorldDataset(store, [TASK], CAMERAS, horizon=4, n_obs_steps=2)
    assert history[0]["images"].shape == (2, 2, 3, 32, 32) and history[0]["proprio"].shape == (2, 4)
    for i in range(len(single)):
        before = i - 1 if i % 6 else i  # an episode's first step repeats itself
        for key in ("images", "proprio"):
            torch.testing.assert_close(history[i][key][0], single[before][key], rtol=0, atol=0)
            torch.testing.assert_close(history[i][key][1], single[i][key], rtol=0, atol=0)
        torch.testing.assert_close(history[i]["actions"], single[i]["actions"], rtol=0, atol=0)


def test_lerobot_sample_holds_the_last_n_observations_oldest_first():
    single, history = fixture_dataset(), fixture_dataset(n_obs_steps=2)
    for i in (0, 1, 7):
        before = max(i - 1, 0)
        for key in ("images", "proprio"):
            torch.testing.assert_close(history[i][key][0], single[before][key], rtol=0, atol=0)
            torch.testing.assert_close(history[i][key][1], single[i][key], rtol=0, atol=0)


def test_rlbench_history_is_dense_only(tmp_path):
    write_rlbench_fixture(tmp_path, episodes=1, steps=6, seed=0)
    kwargs = dict(tasks=["close_jar"], cameras=["front"], horizon=2, image_size=16)
    single = RLBenchDataset(tmp_path, keyframes=False, **kwargs)
    history = RLBenchDataset(tmp_path, keyframes=False, n_obs_steps=3, **kwargs)
    assert history[1]["images"].shape == (3, 1, 3, 16, 16)
    for step, row in enumerate([0, 0, 1]):
        torch.testing.assert_close(history[1]["images"][step], single[row]["images"], rtol=0, atol=0)
        torch.testing.assert_close(history[1]["proprio"][step], single[row]["proprio"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="keyframe policy observes only on arriving"):
        RLBenchDataset(tmp_path, keyframes=True, n_obs_steps=2, **kwargs)


# ----------------------------------------------------------------------------------------------
# The network


def test_a_config_without_n_obs_steps_builds_the_single_observation_network():
    # Every checkpoint written before histories existed lacks the key.
    old = tiny_cfg()
    del old.data["n_obs_steps"]
    torch.manual_seed(0)
    before = build_model(old).state_dict()
    torch.manual_seed(0)
    after = build_model(history_cfg(1)).state_dict()
    assert list(before) == list(after) and not any("step_embed" in name for name in after)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0)


def test_the_condition_depends_on_every_step_of_the_window():
    model = build_model(history_cfg(2)).eval()
    rng = np.random.default_rng(0)
    obs = {
        "images": torch.from_numpy(rng.integers(0, 256, (1, 2, 2, 3, 32, 32), dtype=np.uint8)),
        "proprio": torch.zeros(1, 2, 4),
        "instruction": [tiny_cfg().data.instructions[0]],
    }
    with torch.no_grad():
        base = model.encode_condition(obs).pooled
        older_frame = model.encode_condition({**obs, "images": obs["images"].flip(1)}).pooled
        older_proprio = model.encode_condition({**obs, "proprio": torch.tensor([[[1.0, 0, 0, 0], [0, 0, 0, 0]]])}).pooled
    assert not torch.allclose(base, older_frame) and not torch.allclose(base, older_proprio)
    with pytest.raises(ValueError, match=r"2 steps \(data.n_obs_steps"):
        model.encode_condition({**obs, "images": obs["images"][:, 1]})


def test_a_checkpoint_carries_its_history_length(tmp_path):
    assert DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "two", history_cfg(2))[0]).n_obs_steps == 2
    old = tiny_cfg()
    del old.data["n_obs_steps"]
    assert DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "old", old)[0]).n_obs_steps == 1


# ----------------------------------------------------------------------------------------------
# The policy


def recording(policy: DriftingPolicy) -> list[dict]:
    """Every network input of `policy` from now on: images and (normalized) proprio."""
    seen, encode = [], policy.model.encode_condition

    def record(obs):
        seen.append({"images": torch.as_tensor(obs["images"]).clone(), "proprio": obs["proprio"].clone()})
        return encode(obs)

    policy.model.encode_condition = record
    return seen


def test_the_policy_in_a_rollout_sees_exactly_the_training_samples_of_a_recorded_episode(store):
    # Evaluate what you trained: replaying a recorded episode in closed loop, the network's input at
    # each planning step is the dataset's training sample of that step (no augmentation, same window).
    policy = history_policy(execution="chunk", execute_steps=2)
    seen = recording(policy)
    data = OmegaConf.to_container(history_cfg(2).data)
    data.update(name="replay", replay_store=str(store), cameras=CAMERAS)
    evaluate(policy, data, tasks=[TASK], seeds=[1], num_workers=1, progress=False)

    dataset = MetaWorldDataset(store, [TASK], CAMERAS, horizon=4, n_obs_steps=2)
    planned = [6 + step for step in range(0, 5, 2)]  # episode 1 acts at steps 0..4, replanning every 2
    assert len(seen) == len(planned)
    for inputs, index in zip(seen, planned, strict=True):
        sample = dataset[index]
        torch.testing.assert_close(inputs["images"][0], sample["images"], rtol=0, atol=0)
        torch.testing.assert_close(inputs["proprio"][0], policy.normalizer.normalize("proprio", sample["proprio"]), rtol=0, atol=0)


def test_the_policy_keeps_a_window_per_env_and_reset_starts_one_again(store):
    policy = history_policy(execution="ensemble")  # a network call every step: every window is seen
    seen = recording(policy)
    a, b = steps(store, 0), steps(store, 1)
    for t in range(3):
        policy.select_action(batch([a[t], b[t]]), env_ids=[0, 1])
    policy.reset(0)  # a new episode on env 0
    policy.select_action(batch([a[4]]), env_ids=[0])
    expected = {(0, 0): [a[0], a[0]], (0, 1): [b[0], b[0]], (2, 0): [a[1], a[2]], (2, 1): [b[1], b[2]], (3, 0): [a[4], a[4]]}
    for (call, row), window in expected.items():
        for step, obs in enumerate(window):
            torch.testing.assert_close(seen[call]["images"][row, step], torch.from_numpy(obs["images"]), rtol=0, atol=0)


def batch(observations: list[dict]) -> dict:
    return {"images": np.stack([o["images"] for o in observations]), "proprio": np.stack([o["proprio"] for o in observations]),
            "instruction": [o["instruction"] for o in observations]}


def test_predicting_from_one_step_is_an_error_that_points_to_select_action():
    policy = history_policy()
    obs = {"images": torch.zeros(1, 2, 3, 32, 32, dtype=torch.uint8), "proprio": torch.zeros(1, 4),
           "instruction": [tiny_cfg().data.instructions[0]]}
    with pytest.raises(ValueError, match=r"last 2 observations .* select_action"):
        policy.predict_action_chunk(obs)


# ----------------------------------------------------------------------------------------------
# Serving: the robot side keeps the window and sends it


def test_the_server_answers_a_window_with_the_in_process_chunk_and_refuses_one_step(store):
    policy = history_policy()
    window = steps(store, 0)[:2]
    request = {"images": [step["images"] for step in window], "proprio": np.stack([s["proprio"] for s in window]),
               "instruction": window[1]["instruction"]}
    expected = predict_chunks(policy, [{**request, "images": np.stack(request["images"])}], seed=5)[0]
    server = Running(policy)
    try:
        with PolicyClient(server.url) as client:
            assert client.metadata["n_obs_steps"] == 2
            np.testing.assert_array_equal(client.predict(request, seed=5), expected)
    finally:
        server.stop()
    with pytest.raises(ProtocolError, match="last 2 control steps"):
        check_observation(window[1], policy_metadata(policy))


def test_the_robot_side_executors_send_the_window_of_control_steps(store):
    a = steps(store, 0)
    sent = []

    def predict(obs, seed):
        sent.append(obs)
        return np.zeros((4, 4), np.float32)

    chunked = ChunkedPolicy(predict, horizon=4, execute_steps=2, n_obs_steps=2)
    chunked.reset(0)
    for t in range(3):
        chunked.select_action(batch([a[t]]), env_ids=[0])
    executor = AsyncChunkExecutor(predict, horizon=4, refill_at=2, n_obs_steps=2)
    for t in range(3):  # requests at steps 0 and 2, the second one in the background
        executor.act(a[t])
    deadline = time.time() + 30
    while len(sent) < 4 and time.time() < deadline:
        time.sleep(0.01)
    executor.close()
    for obs, rows in zip(sent, ([0, 0], [1, 2], [0, 0], [1, 2]), strict=True):
        for step, row in enumerate(rows):
            np.testing.assert_array_equal(obs["images"][step], a[row]["images"])
            np.testing.assert_array_equal(obs["proprio"][step], a[row]["proprio"])


# ----------------------------------------------------------------------------------------------
# Training


def test_a_history_run_trains_validates_and_saves_a_policy_with_its_window(tmp_path):
    root = tmp_path / "rlbench"
    write_rlbench_fixture(root / "train", episodes=2, steps=10, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=10, seed=1)
    cfg = compose_config(overrides_for(root, tmp_path / "run", "data.n_obs_steps=2", "training.max_steps=2",
                                       "training.val_every=2"))
    trainer = Trainer(cfg)
    trainer.fit()
    assert "val/action_mse" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert DriftingPolicy.from_checkpoint(tmp_path / "run").n_obs_steps == 2


# ----------------------------------------------------------------------------------------------
# The features that read samples, with a window in each


def test_a_damaged_frame_in_the_window_replaces_the_sample_by_a_whole_readable_window(tmp_path):
    root = write_rlbench_fixture(tmp_path / "train", episodes=2, steps=6, seed=0)
    (root / "close_jar" / "all_variations" / "episodes" / "episode1" / "front_rgb" / "3.png").write_bytes(b"not a png")
    cfg = {"name": "rlbench", "root": str(tmp_path), "tasks": ["close_jar"], "cameras": ["front"], "horizon": 2,
           "image_size": None, "keyframes": False, "cache_dir": None, "action_spec": RLBENCH_ACTION_SPEC.to_config(), "n_obs_steps": 2}
    strict, skipping = build_dataset(cfg), build_dataset({**cfg, "skip_corrupt": True})
    damaged = (5 + 3, 5 + 4)  # episode 1's steps 3 and 4: both windows hold frame 3 (five samples an episode)
    readable = [strict[j] for j in range(len(strict)) if j not in damaged]
    for i in damaged:
        with pytest.raises(CorruptEpisodeError, match="episode1/front_rgb/3.png"):
            strict[i]
        replacement = skipping[SampleKey(i, draw=7)]
        assert replacement["images"].shape == readable[0]["images"].shape == (2, 1, 3, 16, 16)
        assert any(torch.equal(replacement["images"], r["images"]) and torch.equal(replacement["proprio"], r["proprio"])
                   for r in readable)
        again = build_dataset({**cfg, "skip_corrupt": True})[SampleKey(i, draw=7)]  # a resumed run, another worker
        assert torch.equal(again["images"], replacement["images"])


def test_neighbour_positives_describe_an_observation_by_its_whole_window(store):
    single = NeighbourIndex(MetaWorldDataset(store, [TASK], CAMERAS, horizon=4), k=2)
    data = MetaWorldDataset(store, [TASK], CAMERAS, horizon=4, n_obs_steps=2)
    index = NeighbourIndex(data, k=2)
    assert index.embeddings.shape == (len(data), 2 * single.embeddings.shape[1])
    # Proprio of both steps, oldest first: steps 0 and 1 share the older one (step 0, repeated at the
    # episode's start) and differ in the newer; a sample's positives come from the other episode.
    older, newer = index.embeddings[:, :4], index.embeddings[:, 4:8]
    assert torch.equal(older[1], older[0]) and not torch.equal(newer[1], newer[0])
    assert not torch.equal(older[2], older[1])
    episodes = torch.from_numpy(data.episode_ids())
    assert (episodes[index.neighbours()] != episodes[:, None]).all()
    item = NeighbourPositives(data, index.neighbours(), index.chunks)[3]
    assert item["images"].shape[0] == 2 and item["neighbour_actions"].shape == (2, 4, 4)


def test_a_history_run_with_neighbour_positives_skip_corrupt_and_the_shift(tmp_path):
    root = tmp_path / "rlbench"
    write_rlbench_fixture(root / "train", episodes=2, steps=10, seed=0)
    write_rlbench_fixture(root / "val", episodes=1, steps=10, seed=1)
    cfg = compose_config(overrides_for(root, tmp_path / "run", "data.n_obs_steps=2", "data.skip_corrupt=true",
                                       "training.max_steps=2", "training.val_every=2",
                                       "training.drifting.positives.source=neighbours", "training.drifting.positives.k=3",
                                       "training.augmentation.random_shift=4"))
    trainer = Trainer(cfg)
    assert trainer.random_shift == 4
    assert trainer.train_set[0]["neighbour_actions"].shape[0] == 3 and trainer.train_set[0]["images"].shape[0] == 2
    trainer.fit()
    assert "val/action_mse" in json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])


def test_the_schema_declares_the_history_and_augmentation_keys_with_their_ranges(tmp_path):
    with pytest.raises(ValueError, match="data.n_obs_steps=0 must be >= 1"):
        validate_run_config(compose_config(overrides_for(tmp_path, tmp_path / "run", "data.n_obs_steps=0")))
    with pytest.raises(ValueError, match="training.augmentation.random_shift=-1 must be >= 0"):
        validate_run_config(compose_config(overrides_for(tmp_path, tmp_path / "run", "training.augmentation.random_shift=-1")))
    with pytest.raises(ValueError, match="data.n_obs_steps=2 needs data.keyframes=false"):
        validate_run_config(compose_config(overrides_for(tmp_path, tmp_path / "run", "data.n_obs_steps=2", "data.keyframes=true")))
    validate_run_config(compose_config(overrides_for(tmp_path, tmp_path / "run", "data.n_obs_steps=2")))
