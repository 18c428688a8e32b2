"""LeRobotDataset v3.0 in and out: the reader against a dataset written (and read back) by
LeRobot 0.4.4 itself (tests/fixtures/lerobot_v30, see its README), the writer through the reader,
and a LeRobot export of Meta-World demos evaluating in Meta-World."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from drifting_vla.data.collate import collate_samples
from drifting_vla.data.lerobot_dataset import LeRobotDataset, resolve_root
from drifting_vla.data.lerobot_writer import LeRobotWriter, export_metaworld_store
from drifting_vla.data.metaworld_dataset import MetaWorldDataset
from drifting_vla.data.normalization import STATS, dataset_stats
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.skip_corrupt import SkipCorruptSamples
from drifting_vla.envs import simulation_config
from tests.helpers import FIXTURE, IMAGE, VIDEOS, fixture_dataset, metaworld_store

VIDEO_MEAN_TOLERANCE = 3.0
"""Per-channel image means (0..255) may differ from LeRobot's by this much: AV1 at crf 30 is lossy
and our decode resizes (uniform frames: the mean barely moves); measured at most 2.0."""
PNG_MEAN_TOLERANCE = 0.5




@pytest.fixture
def fixture_copy(tmp_path) -> Path:
    root = tmp_path / "dataset"
    shutil.copytree(FIXTURE / "dataset", root)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


# --- reading what LeRobot wrote -------------------------------------------------------------------


def test_reader_reproduces_lerobots_own_reading_of_its_dataset():
    reference = json.loads((FIXTURE / "reference.json").read_text())
    dataset = fixture_dataset()
    for index, expected in reference.items():
        item = dataset[int(index)]
        np.testing.assert_array_equal(item["proprio"].numpy(), expected["observation.state"]["value"])
        np.testing.assert_array_equal(item["actions"].numpy(), expected["action"]["value"])
        assert (~item["action_mask"]).tolist() == expected["action_is_pad"]["value"]
        assert item["instruction"] == item["task"] == expected["task"]
        means = item["images"].double().mean((2, 3)).numpy()
        for v, (camera, tolerance) in enumerate([(c, VIDEO_MEAN_TOLERANCE) for c in VIDEOS] + [(IMAGE, PNG_MEAN_TOLERANCE)]):
            np.testing.assert_allclose(means[v], expected[camera]["mean_per_channel_x255"], atol=tolerance, err_msg=f"{camera} @ {index}")


def test_samples_follow_the_contract_with_video_and_image_cameras_resized():
    item = fixture_dataset(image_size=24)[7]
    assert set(item) == {"images", "proprio", "instruction", "actions", "action_mask", "task"}
    assert item["images"].dtype == torch.uint8 and item["images"].shape == (3, 3, 24, 24)
    assert item["proprio"].dtype == torch.float32 and item["proprio"].shape == (6,)
    assert item["actions"].dtype == torch.float32 and item["actions"].shape == (4, 4)
    assert item["action_mask"].dtype == torch.bool and item["action_mask"].all()


def test_val_split_holds_out_whole_episodes():
    train, val = fixture_dataset(split="train", holdout_every=3), fixture_dataset(split="val", holdout_every=3)
    assert (len(train), len(val)) == (20 + 15, 25)  # episode 2 of 0, 1, 2 is held out
    assert {float(val[i]["proprio"][0]) // 1000 for i in range(len(val))} == {2.0}
    with pytest.raises(ValueError, match="val split .* is empty .*holdout_every"):
        fixture_dataset(split="val", holdout_every=10)
    assert train.episode_ids().tolist() == [0] * 20 + [1] * 15 and set(val.episode_ids().tolist()) == {2}


def test_normalization_stats_come_from_meta_stats_json():
    recorded = json.loads((FIXTURE / "dataset" / "meta" / "stats.json").read_text())
    stats = dataset_stats(fixture_dataset(split="train", holdout_every=3))
    assert stats["actions"] == {s: recorded["action"][s] for s in STATS}
    assert stats["proprio"] == {s: recorded["observation.state"][s] for s in STATS}


def test_normalization_stats_are_computed_over_the_train_split_without_quantiles_in_stats_json(fixture_copy):
    path = fixture_copy / "meta" / "stats.json"
    stats = json.loads(path.read_text())
    del stats["action"]["q01"]
    path.write_text(json.dumps(stats))
    train = fixture_dataset(root=fixture_copy, split="train", holdout_every=3)
    computed = dataset_stats(train)
    assert computed["actions"]["min"] == train.all_actions().min(0).tolist()
    assert computed["proprio"]["max"] == [1140.0 + d for d in range(6)]  # episode 1's last state; episode 2 held out


def test_stats_json_of_the_wrong_size_is_an_error_naming_the_file(fixture_copy):
    path = fixture_copy / "meta" / "stats.json"
    stats = json.loads(path.read_text())
    stats["action"]["mean"] = stats["action"]["mean"][:3]
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"stats.json: action.mean has 3 values .* shape \[4\]"):
        dataset_stats(fixture_dataset(root=fixture_copy))


def test_a_non_finite_action_is_refused_naming_the_file_episode_frame_and_feature_or_left_out_under_skip_corrupt(fixture_copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = fixture_copy / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(path)
    actions = table.column("action").to_pylist()
    episodes = table.column("episode_index").to_pylist()
    row = episodes.index(1) + 2  # frame 2 of episode 1
    actions[row][1] = float("nan")
    column = pa.array(actions, type=table.schema.field("action").type)
    pq.write_table(table.set_column(table.schema.get_field_index("action"), "action", column), path)
    with pytest.raises(CorruptEpisodeError, match=r"file-000.parquet: episode 1 has a non-finite 'action' at frame 2.*skip_corrupt"):
        fixture_dataset(root=fixture_copy)
    assert sorted(set(fixture_dataset(root=fixture_copy, skip_corrupt=True).episode_ids().tolist())) == [0, 2]


def test_stats_json_with_a_non_finite_value_is_an_error_naming_it(fixture_copy):
    path = fixture_copy / "meta" / "stats.json"
    stats = json.loads(path.read_text())
    stats["observation.state"]["max"][0] = float("inf")
    path.write_text(json.dumps(stats))
    with pytest.raises(ValueError, match=r"stats.json: observation.state.max holds non-finite values"):
        dataset_stats(fixture_dataset(root=fixture_copy))


def test_workers_decode_video_after_the_parent_did():
    dataset = fixture_dataset()
    expected = collate_samples([dataset[i] for i in range(8)])  # the parent has open decoders now
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=collate_samples, timeout=60)
    batch = next(iter(loader))
    torch.testing.assert_close(batch["images"], expected["images"], rtol=0, atol=0)


# --- bad input ------------------------------------------------------------------------------------


def test_a_feature_the_dataset_lacks_is_an_error_listing_what_it_has():
    with pytest.raises(KeyError, match=r"observation.images.top.* not in .*info.json.*observation.images.front"):
        fixture_dataset(cameras=["observation.images.top"])
    with pytest.raises(ValueError, match="must name image or video features"):
        fixture_dataset(cameras=["observation.state"])


def test_config_dims_that_do_not_match_the_features_name_the_feature():
    with pytest.raises(ValueError, match=r"data.action_spec gives 7 values but feature 'action' has shape \[4\]"):
        fixture_dataset(action_dim=7)
    with pytest.raises(ValueError, match=r"data.proprio_dim gives 4 values but feature 'observation.state' has shape \[6\]"):
        fixture_dataset(proprio_dim=4)


def test_other_codebase_versions_name_the_converter(fixture_copy):
    info = json.loads((fixture_copy / "meta" / "info.json").read_text())
    (fixture_copy / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    with pytest.raises(ValueError, match="v2.1.*convert_dataset_v21_to_v30"):
        fixture_dataset(root=fixture_copy)


def test_missing_or_truncated_parquet_is_an_error_naming_the_file(fixture_copy):
    data = fixture_copy / "data" / "chunk-000" / "file-000.parquet"
    data.write_bytes(data.read_bytes()[:2000])
    with pytest.raises(CorruptEpisodeError, match="data/chunk-000/file-000.parquet"):
        fixture_dataset(root=fixture_copy)
    data.unlink()
    with pytest.raises(CorruptEpisodeError, match="file-000.parquet is missing"):
        fixture_dataset(root=fixture_copy)


def move_last_episode_to_a_second_data_file(root: Path) -> Path:
    """data/chunk-000/file-001.parquet holding the last episode's rows (as LeRobot starts a new data
    file past data_files_size_in_mb), meta/episodes pointing there; returns that file."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    data = root / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    last = pc.equal(table.column("episode_index"), pc.max(table.column("episode_index")))
    pq.write_table(table.filter(pc.invert(last)), data)
    pq.write_table(table.filter(last), data.with_name("file-001.parquet"))
    meta = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    episodes = pq.read_table(meta)
    column = episodes.schema.get_field_index("data/file_index")
    file_index = [0] * (episodes.num_rows - 1) + [1]  # episodes are in index order
    pq.write_table(episodes.set_column(column, "data/file_index", pa.array(file_index, pa.int64())), meta)
    return data.with_name("file-001.parquet")


def test_a_damaged_data_file_stops_the_run_naming_it_or_under_skip_corrupt_leaves_out_its_episodes(fixture_copy, caplog):
    from drifting_vla.data.registry import build_dataset

    damaged = move_last_episode_to_a_second_data_file(fixture_copy)
    whole = fixture_dataset(root=fixture_copy)
    assert sorted(set(whole.episode_ids().tolist())) == [0, 1, 2]
    damaged.write_bytes(damaged.read_bytes()[:400])  # cut short
    with pytest.raises(CorruptEpisodeError, match="file-001.parquet.*set data.skip_corrupt=true"):
        fixture_dataset(root=fixture_copy)

    data_cfg = {"name": "lerobot", "root": str(fixture_copy), "cameras": [*VIDEOS, IMAGE], "horizon": 4, "image_size": 32,
                "state_key": "observation.state", "action_key": "action", "holdout_every": 3, "proprio_dim": 6,
                "action_spec": {"components": [{"name": "delta", "kind": "raw", "dim": 4}]}, "skip_corrupt": True}
    dataset = fixture_dataset(root=fixture_copy, skip_corrupt=True)
    assert "file-001.parquet" in caplog.text and "1 episode(s) left out" in caplog.text
    assert sorted(set(dataset.episode_ids().tolist())) == [0, 1] and len(dataset) == 20 + 15
    assert dataset[len(dataset) - 1]["images"].shape == (3, 3, 32, 32)

    assert len(build_dataset(data_cfg, "train")) == 35  # data.skip_corrupt reaches the dataset
    with pytest.raises(ValueError, match=r"the val split .* is empty \(3 episodes, 1 of them left out as damaged"):
        build_dataset(data_cfg, "val")  # the split is made first: episode 2 stays the val episode


def test_missing_or_truncated_video_is_an_error_naming_the_file(fixture_copy):
    video = fixture_copy / "videos" / VIDEOS[0] / "chunk-000" / "file-000.mp4"
    video.write_bytes(video.read_bytes()[:1500])
    dataset = fixture_dataset(root=fixture_copy)
    with pytest.raises(CorruptEpisodeError, match=f"{VIDEOS[0]}/chunk-000/file-000.mp4"):
        [dataset[i] for i in range(len(dataset))]
    video.unlink()
    with pytest.raises(CorruptEpisodeError, match=f"video file .*{VIDEOS[0]}.*episodes \\[0, 1, 2\\].*missing.*skip_corrupt"):
        fixture_dataset(root=fixture_copy)
    with pytest.raises(ValueError, match="3 episodes, 3 of them left out as damaged"):  # one video file held them all
        fixture_dataset(root=fixture_copy, skip_corrupt=True)


def test_a_damaged_png_frame_names_its_file_and_row_and_is_replaced_under_skip_corrupt(fixture_copy):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = fixture_copy / "data" / "chunk-000" / "file-000.parquet"
    table = pq.read_table(data)
    images = table.column(IMAGE).to_pylist()
    images[3] = {**images[3], "bytes": images[3]["bytes"][:30]}
    column = pa.array(images, type=table.schema.field(IMAGE).type)
    pq.write_table(table.set_column(table.schema.get_field_index(IMAGE), IMAGE, column), data)
    dataset = fixture_dataset(root=fixture_copy, cameras=[IMAGE])
    damaged = int(np.flatnonzero(dataset._index[:, 0] == 3)[0])
    with pytest.raises(CorruptEpisodeError, match=f"{IMAGE}.*row 3 of .*file-000.parquet.*skip_corrupt=true"):
        dataset[damaged]
    replaced = SkipCorruptSamples(dataset)[damaged]
    assert replaced["images"].shape == dataset[damaged + 1]["images"].shape


def test_skip_corrupt_does_not_hide_a_dataset_that_is_mostly_damaged(fixture_copy):
    video = fixture_copy / "videos" / VIDEOS[0] / "chunk-000" / "file-000.mp4"
    video.write_bytes(bytes(video.stat().st_size))  # zeros at the same size: every frame is lost
    with pytest.raises(CorruptEpisodeError, match="most of the data is damaged"):
        SkipCorruptSamples(fixture_dataset(root=fixture_copy))[0]


def test_hub_dataset_offline_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="lerobot/pusht.*hf download.*data.root=DIR"):
        resolve_root(None, "lerobot/pusht-not-cached")
    with pytest.raises(FileNotFoundError, match="no LeRobot dataset at data.root"):
        resolve_root("/nonexistent")


# --- writing --------------------------------------------------------------------------------------




@pytest.mark.parametrize("vcodec,codec", [("libsvtav1", "av1"), ("libx264", "h264")])
def test_exported_metaworld_demos_read_back_like_the_native_store(tmp_path, vcodec, codec):
    store = metaworld_store(tmp_path / "store")
    out = export_metaworld_store(store, tmp_path / "lerobot", ["reach-v3", "push-v3"], {"start": 100000, "count": 5}, vcodec=vcodec)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["features"]["observation.images.corner"]["info"]["video.codec"] == codec
    native = MetaWorldDataset(store, ["reach-v3", "push-v3"], ["corner", "topview"], horizon=4)
    exported = LeRobotDataset(out, ["observation.images.corner", "observation.images.topview"], horizon=4, image_size=16)
    assert len(exported) == len(native) == 42
    for i in range(len(native)):
        a, b = native[i], exported[i]
        for key in ("proprio", "actions", "action_mask"):
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
        assert (b["instruction"], b["task"]) == (a["instruction"], a["task"])
        assert (b["images"].int() - a["images"].int()).abs().max() <= 2, f"item {i}"


def test_export_has_lerobots_layout(tmp_path):
    import pyarrow.parquet as pq

    out = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3"], {"start": 0, "count": 1})
    theirs, ours = FIXTURE / "dataset", out
    info = json.loads((ours / "meta" / "info.json").read_text())
    assert set(info) == set(json.loads((theirs / "meta" / "info.json").read_text()))
    assert (info["total_episodes"], info["total_frames"], info["fps"]) == (3, 21, 80)
    episodes = "meta/episodes/chunk-000/file-000.parquet"
    wanted = {c.replace("front", "corner") for c in pq.read_schema(theirs / episodes).names if not c.startswith("stats/") and "wrist" not in c}
    assert wanted <= set(pq.read_schema(ours / episodes).names)
    tasks = pq.read_schema(ours / "meta" / "tasks.parquet")
    assert json.loads(tasks.metadata[b"pandas"])["index_columns"] == ["__index_level_0__"]  # LeRobot reads it with pandas
    data = pq.read_schema(ours / "data" / "chunk-000" / "file-000.parquet")
    assert str(data.field("action").type) == "fixed_size_list<element: float>[4]"
    stats = json.loads((ours / "meta" / "stats.json").read_text())
    assert set(stats["action"]) == set(json.loads((theirs / "meta" / "stats.json").read_text())["action"])
    assert np.shape(stats["observation.images.corner"]["mean"]) == (3, 1, 1)


def test_writer_refuses_a_non_empty_output_and_episodes_missing_a_camera(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        LeRobotWriter(tmp_path / "full", 10, {}, ["s"], ["a"])
    writer = LeRobotWriter(tmp_path / "new", 10, {"observation.images.cam": (16, 16)}, ["s"], ["a"])
    with pytest.raises(ValueError, match="cover cameras"):
        writer.add_episode("t", {}, {"observation.state": np.zeros((3, 1)), "action": np.zeros((3, 1))})


# --- evaluation: the simulator a dataset records --------------------------------------------------


def test_an_exported_dataset_names_its_simulator_for_the_chosen_cameras(tmp_path):
    out = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3", "push-v3"], {"start": 100000, "count": 5})
    dataset = LeRobotDataset(out, ["observation.images.topview"], horizon=4, image_size=32)
    data_cfg = {"name": "lerobot", "image_size": 32, "horizon": 4, "simulator": dataset.simulator()}
    sim = simulation_config(data_cfg)
    assert sim["name"] == "metaworld" and sim["tasks"] == ["reach-v3", "push-v3"]
    assert sim["cameras"] == ["topview"] and sim["image_size"] == 32 and sim["max_episode_steps"] == 50
    assert sim["eval_seeds"] == {"start": 100000, "count": 5}


def test_a_foreign_dataset_has_no_simulator():
    assert fixture_dataset().simulator() is None
    assert simulation_config({"name": "lerobot", "simulator": None}) is None
    with pytest.raises(ValueError, match="simulator=auto is resolved"):
        simulation_config({"name": "lerobot", "simulator": "auto"})


def test_training_on_an_export_records_its_simulator_and_on_a_foreign_dataset_skips_evaluation(tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from drifting_vla.training.trainer import Trainer

    export = export_metaworld_store(metaworld_store(tmp_path / "store"), tmp_path / "lerobot", ["reach-v3", "push-v3"], {"start": 100000, "count": 5})
    common = ["experiment=tiny_cpu", "data=lerobot", "data.image_size=16", "data.horizon=4", "data.holdout_every=3",
              "data.num_workers=0", "training.wandb.mode=disabled", "training.num_threads=1", "training.max_steps=2"]
    with initialize_config_dir(config_dir=str(Path(__file__).parents[1] / "drifting_vla" / "configs"), version_base=None):
        exported = compose("config", overrides=[*common, f"data.root={export}", f"run_dir={tmp_path / 'a'}"])
        foreign = compose("config", overrides=[*common, f"data.root={FIXTURE / 'dataset'}", f"data.cameras=[{VIDEOS[0]},{IMAGE}]",
                                               "data.proprio_dim=6", "training.eval.at_end=true", "training.eval.execute_steps=2",
                                               f"run_dir={tmp_path / 'b'}"])
    assert Trainer(exported).cfg.data.simulator.name == "metaworld"
    assert "simulator:\n    name: metaworld" in (tmp_path / "a" / "config.yaml").read_text()  # what checkpoints hold
    assert Trainer(foreign).fit() is None
    assert "no closed-loop evaluation: the dataset records no simulator" in capsys.readouterr().out


# --- a dataset's paths stay inside it -------------------------------------------------------------


def edit_info(root: Path, **changes) -> None:
    info_file = root / "meta" / "info.json"
    info = json.loads(info_file.read_text())
    info.update(changes)
    info_file.write_text(json.dumps(info))


def test_a_data_path_leading_out_of_the_dataset_is_refused_naming_the_key(fixture_copy, tmp_path):
    outside = tmp_path / "outside" / "data" / "chunk-000"
    outside.mkdir(parents=True)
    shutil.copy(fixture_copy / "data" / "chunk-000" / "file-000.parquet", outside / "file-000.parquet")
    edit_info(fixture_copy, data_path="../outside/data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet")
    with pytest.raises(ValueError, match=r"info.json: key 'data_path'=.* lies outside the dataset"):
        fixture_dataset(root=fixture_copy)
    edit_info(fixture_copy, data_path=str(outside / "file-{file_index:03d}.parquet"))
    with pytest.raises(ValueError, match=r"info.json: key 'data_path'=.* lies outside the dataset"):
        fixture_dataset(root=fixture_copy)


@pytest.mark.parametrize("template, field", [
    ("videos/{video_key.__class__.__mro__}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4", "video_key.__class__.__mro__"),
    ("videos/{video_key[0]}/file-{file_index:03d}.mp4", "video_key[0]"),
    ("videos/{video_key!r}/file-{file_index:03d}.mp4", "video_key!r"),
    ("videos/{episode_index}/file-{file_index:03d}.mp4", "episode_index"),
])
def test_a_video_path_may_name_only_its_own_fields(fixture_copy, template, field):
    edit_info(fixture_copy, video_path=template)
    with pytest.raises(ValueError, match=rf"info.json: key 'video_path'=.* has the field \{{{re.escape(field)}\}}"):
        fixture_dataset(root=fixture_copy)


def test_a_data_file_wider_than_info_json_says_is_refused_naming_file_and_feature(fixture_copy):
    """Found by a hostile probe: it failed at the first normalization, naming neither."""
    edit_info(fixture_copy, features={**json.loads((fixture_copy / "meta" / "info.json").read_text())["features"],
                                      "observation.state": {"dtype": "float32", "shape": [5], "names": None}})
    with pytest.raises(CorruptEpisodeError, match=r"file-000.parquet: column 'observation.state' has 6 values per frame, "
                                                  r"but .*info.json declares shape \[5\]"):
        fixture_dataset(root=fixture_copy)


def test_a_dataset_of_symlinks_as_the_hub_cache_keeps_them_is_read(fixture_copy, tmp_path):
    """The hub cache's snapshot is symlinks into its blob store: they lead out of the root, and are
    the downloader's, not info.json's."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    shutil.copytree(fixture_copy, blobs)
    for path in blobs.rglob("*"):
        if path.is_file():
            link = snapshot / path.relative_to(blobs)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    assert len(fixture_dataset(root=snapshot)) == len(fixture_dataset(root=fixture_copy))
