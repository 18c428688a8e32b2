"""`data=lerobot data.root=DIR` alone: the cameras, the state and action sizes and the action layout
come from the dataset (drifting_vla/data/lerobot_features.py), on LeRobot's own fixture, on
datasets in the hub's ALOHA and PushT layouts (drifting_vla/data/lerobot_fixtures.py) and on our
Meta-World export; given values win and are checked; the raw layout trains and acts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from drifting_vla.data.lerobot_dataset import LeRobotDataset
from drifting_vla.data.lerobot_fixtures import HUB_LAYOUTS, write_hub_layout
from drifting_vla.data.lerobot_writer import export_metaworld_store
from drifting_vla.data.normalization import Normalizer, dataset_stats
from drifting_vla.data.registry import build_dataset, complete_data_config
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.logging.visualizations import (
    PANELS,
    MetricHistory,
    PanelInputs,
    dimension_names,
    end_effector_dims,
)
from drifting_vla.models.action_decoder import ActionDecoder
from drifting_vla.specs import METAWORLD_ACTION_SPEC, ActionSpec
from tests.helpers import FIXTURE, metaworld_store

ROOT = Path(__file__).resolve().parents[1]


def lerobot_config(root: Path | None, **keys) -> dict:
    """configs/data/lerobot.yaml with `data.root=root` and `keys`, as the command line sets them."""
    cfg = yaml.safe_load((ROOT / "drifting_vla" / "configs" / "data" / "lerobot.yaml").read_text())
    return {**cfg, "root": None if root is None else str(root), **keys}


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict[str, Path]:
    """The ALOHA layout (video), and PushT's with its camera as video and as PNG images."""
    base = tmp_path_factory.mktemp("hub")
    return {name: write_hub_layout(base / name, name.split("_")[0], image=name.split("_")[1])
            for name in ("aloha_video", "pusht_video", "pusht_image")}


# --- what is read when nothing is set -------------------------------------------------------------


@pytest.mark.parametrize("name,camera,dim", [("aloha_video", "observation.images.top", 14),
                                             ("pusht_video", "observation.image", 2), ("pusht_image", "observation.image", 2)])
def test_hub_layouts_need_only_the_root(hub, name, camera, dim):
    keys = complete_data_config(lerobot_config(hub[name]))
    assert keys == {"cameras": [camera], "proprio_dim": dim,
                    "action_spec": {"components": [{"name": "action", "kind": "raw", "dim": dim}]}}
    dataset = build_dataset({**lerobot_config(hub[name]), **keys}, "train")
    item = dataset[13]  # episode 1, frame 5
    expected_state = 100 + 5 + np.arange(dim) / 100
    np.testing.assert_allclose(item["proprio"].numpy(), expected_state, rtol=0, atol=1e-4)
    np.testing.assert_allclose(item["actions"][0].numpy(), -expected_state, rtol=0, atol=1e-4)
    assert item["images"].shape == (1, 3, 64, 64) and item["instruction"] == HUB_LAYOUTS[name.split("_")[0]].task
    mean = item["images"][0].double().mean((1, 2)).numpy()
    colours = np.array([[10 + 9 * t, 245 - 9 * t, 20] for t in range(8)])  # of frames 0..7 of episode 1
    if name.endswith("image"):
        np.testing.assert_array_equal(mean, colours[5])
    else:  # AV1 is lossy (up to 3/255 off here): the nearest colour is frame 5's
        assert np.abs(colours - mean).sum(1).argmin() == 5, mean


def test_a_hub_repo_id_alone_is_enough(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo, commit = tmp_path / "datasets--lerobot--aloha_sim_insertion_human", "0" * 40  # the hub cache's layout
    write_hub_layout(repo / "snapshots" / commit, "aloha")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # offline (tests/conftest.py): the cached snapshot
    cfg = {**lerobot_config(None), "repo_id": "lerobot/aloha_sim_insertion_human"}
    keys = complete_data_config(cfg)
    assert keys["cameras"] == ["observation.images.top"] and keys["proprio_dim"] == 14
    assert len(build_dataset({**cfg, **keys}, "train")) == 9 * 8


def test_lerobots_own_fixture_gives_every_camera_in_info_json_order_and_its_sizes():
    keys = complete_data_config(lerobot_config(FIXTURE / "dataset"))
    assert keys["cameras"] == ["observation.images.front", "observation.images.wrist", "observation.images.overhead"]
    assert keys["proprio_dim"] == 6 and keys["action_spec"] == {"components": [{"name": "action", "kind": "raw", "dim": 4}]}
    assert LeRobotDataset(FIXTURE / "dataset", None, horizon=4, image_size=16)[0]["images"].shape == (3, 3, 16, 16)


def test_our_export_keeps_the_layout_it_records(tmp_path):
    export = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3"], {"start": 100000, "count": 5})
    assert json.loads((export / "meta" / "drifting_vla.json").read_text())["action_spec"] == METAWORLD_ACTION_SPEC.to_config()
    keys = complete_data_config(lerobot_config(export))
    assert keys == {"cameras": ["observation.images.corner", "observation.images.topview"], "proprio_dim": 4,
                    "action_spec": METAWORLD_ACTION_SPEC.to_config()}


# --- given values win and are checked -------------------------------------------------------------


def test_given_values_win_over_the_datasets(tmp_path):
    export = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3"], {"start": 100000, "count": 5})
    raw = {"components": [{"name": "xyz", "kind": "raw", "dim": 3}, {"name": "grip", "kind": "gripper", "dim": 1}]}
    keys = complete_data_config(lerobot_config(export, cameras=["observation.images.topview"], proprio_dim=4, action_spec=raw))
    assert keys == {"cameras": ["observation.images.topview"], "proprio_dim": 4, "action_spec": raw}


@pytest.mark.parametrize("keys,error,message", [
    ({"proprio_dim": 4}, ValueError, r"data.proprio_dim gives 4 values but feature 'observation.state' has shape \[6\] in .*meta/info.json.*unset"),
    ({"action_spec": {"components": [{"name": "xy", "kind": "raw", "dim": 2}]}}, ValueError,
     r"data.action_spec gives 2 values \(xy: 2\) but feature 'action' has shape \[4\] in .*meta/info.json.*sum to 4"),
    ({"cameras": ["observation.images.top"]}, KeyError, r"data.cameras names feature\(s\) \['observation.images.top'\] that are not in .*info.json"),
    ({"cameras": ["observation.state"]}, ValueError, r"data.cameras must name image or video features .*'observation.images.front'"),
    ({"state_key": "observation.velocity"}, KeyError, r"feature 'observation.velocity' \(data.state_key\) is not in .*info.json"),
    ({"action_key": "observation.images.front"}, ValueError, r"feature 'observation.images.front' \(data.action_key\) .* is video .*not a vector"),
])
def test_given_values_that_disagree_with_the_dataset_name_the_key_and_the_file(keys, error, message):
    with pytest.raises(error, match=message):
        complete_data_config(lerobot_config(FIXTURE / "dataset", **keys))


def test_a_recorded_layout_of_another_size_names_the_export_file(tmp_path):
    export = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3"], {"start": 100000, "count": 5})
    meta = export / "meta" / "drifting_vla.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "action_spec": {"components": [{"name": "a", "kind": "raw", "dim": 3}]}}))
    with pytest.raises(ValueError, match=r"drifting_vla.json records an action_spec of 3 values but feature 'action' has shape \[4\]"):
        complete_data_config(lerobot_config(export))


# --- the raw layout through normalization, decoder, training and the policy ----------------------


def test_raw_layout_is_min_max_scaled_and_decoded_linearly(hub):
    cfg = lerobot_config(hub["aloha_video"])
    cfg.update(complete_data_config(cfg))
    spec = ActionSpec.from_config(cfg["action_spec"])
    dataset = build_dataset(cfg, "train")
    normalizer = Normalizer(dataset_stats(dataset), spec, cfg["proprio_dim"])
    actions = torch.from_numpy(dataset.all_actions())
    normalized = normalizer.normalize("actions", actions)
    assert normalized.shape == (len(actions), 14) and spec.network_dim == 14
    assert normalized.min() >= -1 - 1e-6 and normalized.max() <= 1 + 1e-6  # every dim scaled, none passed through
    torch.testing.assert_close(normalizer.unnormalize("actions", normalized), actions, rtol=0, atol=1e-3)
    decoder = ActionDecoder(spec, dim=8, hidden_size=16)
    outputs = decoder(torch.randn(2, 3, 8))
    assert outputs.shape == (2, 3, 14) and torch.equal(decoder.activate(outputs), outputs)  # no sigmoid, no rotation


def test_panels_label_and_draw_the_raw_layout_without_an_end_effector():
    spec = ActionSpec.from_config({"components": [{"name": "action", "kind": "raw", "dim": 14}]})
    assert dimension_names(spec) == tuple(f"action[{i}]" for i in range(14)) and end_effector_dims(spec) == (None, False)
    generated, expert = torch.randn(2, 4, 16, 14), torch.randn(2, 16, 14)
    inputs = PanelInputs.from_step(generated, expert, torch.randn_like(generated), spec, MetricHistory())
    for name in ("a4_error_radar", "b4_end_effector_trajectory"):
        assert PANELS[name](inputs).ndim == 3


def train_script(data_root: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`python scripts/train.py data=lerobot data.root=DIR` with the tiny model: no other data key."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MUJOCO_GL": "egl"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "data=lerobot", f"data.root={data_root}", "experiment=tiny_cpu",
         "training.max_steps=2", "training.num_threads=1", "training.wandb.mode=disabled", f"hydra.run.dir={run_dir}", *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("name,dim", [("aloha_video", 14), ("pusht_image", 2)])
def test_train_script_trains_on_a_hub_layout_with_only_data_root_and_the_policy_acts_in_raw_units(hub, tmp_path, name, dim):
    result = train_script(hub[name], tmp_path / "run", "training.eval.at_end=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no closed-loop evaluation: the dataset records no simulator" in result.stdout
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]
    assert saved["proprio_dim"] == dim and saved["action_spec"]["components"] == [{"name": "action", "kind": "raw", "dim": dim}]
    policy = DriftingPolicy.from_pretrained(tmp_path / "run")
    sample = build_dataset(saved, "val")[0]
    obs = {"images": sample["images"][None], "proprio": sample["proprio"][None], "instruction": [sample["instruction"]]}
    chunk = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(3))
    assert chunk.shape == (1, saved["horizon"], dim)
    with torch.no_grad():  # what training optimized: the objective's sample, unnormalized by the dataset's statistics
        condition = policy.model.encode_condition({**obs, "proprio": policy.normalizer.normalize("proprio", obs["proprio"])})
        own = policy.objective.sample(policy.model, condition, 1, policy.nfe, policy.sampler, torch.Generator().manual_seed(3))[:, 0]
    np.testing.assert_allclose(chunk, policy.normalizer.unnormalize("actions", own).numpy(), rtol=1e-5, atol=1e-5)
    assert policy.normalizer.stats["actions"]["max"] == json.loads((hub[name] / "meta" / "stats.json").read_text())["action"]["max"]
