"""Write LeRobotDataset v3.0 (the layout `lerobot_dataset.py` reads and LeRobot 0.4 writes).

    writer = LeRobotWriter(out, fps=80, cameras={"observation.images.corner": (64, 64)},
                           state_names=[...], action_names=[...], vcodec="libsvtav1")
    writer.add_episode(task="open the drawer", images={key: uint8 [L, H, W, 3]}, state=[L, S], actions=[L, A])
    writer.finalize(extra_meta={...})        # meta/*, then the folder is renamed into place

    export_metaworld_store(store, out, tasks, eval_seeds)   # the embedded demos as a v3.0 dataset

Video is encoded with PyAV as LeRobot does (`libsvtav1`: AV1, yuv420p, a keyframe every 2 frames,
crf 30, preset 12; or `libx264` with the same GOP and crf), all episodes of a camera back to back
in one mp4 until `video_files_size_in_mb`, then the next file. Frame i of a file has pts i at
1/fps, so an episode's `from_timestamp` is its first frame's index / fps exactly. Statistics
(meta/stats.json) cover every frame of every episode, images per channel in [0, 1], as LeRobot's.
"""

from __future__ import annotations

import fractions
import json
import os
import pathlib
import shutil

import numpy as np

from drifting_vla.data.lerobot_dataset import CODEBASE_VERSION, EXPORT_META
from drifting_vla.data.metaworld_dataset import open_task_arrays, read_collection, read_task_meta
from drifting_vla.data.normalization import compute_stats
from drifting_vla.specs import METAWORLD_ACTION_SPEC

VIDEO_CODECS = {"libsvtav1": ("av1", {"g": "2", "crf": "30", "preset": "12"}), "libx264": ("h264", {"g": "2", "crf": "30"})}
"""PyAV encoder -> (codec name recorded in info.json, LeRobot's encoder options)."""
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
CHUNKS_SIZE = 1000
METAWORLD_FPS = 80
"""Meta-World's control rate: frame_skip 5 x MuJoCo timestep 2.5 ms (the env's `render_fps`)."""
_STAT_FRAMES_PER_EPISODE = 10  # image statistics from a subsample, as LeRobot computes them


class LeRobotWriter:
    def __init__(
        self,
        root: str | pathlib.Path,
        fps: int,
        cameras: dict[str, tuple[int, int]],
        state_names: list[str],
        action_names: list[str],
        vcodec: str = "libsvtav1",
        robot_type: str | None = None,
        extra_features: dict[str, list[str]] | None = None,
        video_files_size_in_mb: int = 200,
    ) -> None:
        """`cameras`: video feature key -> (height, width). `extra_features`: more float32 vector
        features (key -> names), written to the parquet beside state and action."""
        if vcodec not in VIDEO_CODECS:
            raise ValueError(f"unknown video encoder {vcodec!r}; choose one of {sorted(VIDEO_CODECS)}")
        self.root = pathlib.Path(root)
        if self.root.exists() and any(self.root.iterdir()):
            raise FileExistsError(f"{self.root} exists and is not empty; choose a new --output folder or delete it")
        self.tmp = self.root.with_name(self.root.name + ".tmp")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.fps, self.cameras, self.vcodec, self.robot_type = int(fps), dict(cameras), vcodec, robot_type
        self.vectors = {"observation.state": list(state_names), "action": list(action_names), **(extra_features or {})}
        self.video_files_size_in_mb = int(video_files_size_in_mb)
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict] = []
        self.rows: dict[str, list[np.ndarray]] = {key: [] for key in self.vectors}
        self.task_index: list[np.ndarray] = []
        self.stat_frames: dict[str, list[np.ndarray]] = {key: [] for key in cameras}
        self.videos = {
            key: _VideoFile(self.tmp, key, self.fps, vcodec, size, video_files_size_in_mb * 1024 * 1024)
            for key, size in cameras.items()
        }

    def add_episode(self, task: str, images: dict[str, np.ndarray], vectors: dict[str, np.ndarray]) -> None:
        """One episode: `images` {camera key: uint8 [L, H, W, 3]}, `vectors` {feature key: [L, D]}
        for observation.state, action and the extra features."""
        missing = sorted(set(self.vectors) - set(vectors))
        if missing:
            raise ValueError(f"episode lacks the vector feature(s) {missing}")
        vectors = {key: np.asarray(vectors[key], dtype=np.float32) for key in self.vectors}
        length = len(vectors["action"])
        bad = {k: v.shape for k, v in {**vectors, **images}.items() if len(v) != length}
        if bad or set(images) != set(self.cameras):
            raise ValueError(f"episode arrays must all have {length} rows and cover cameras {sorted(self.cameras)}; got {bad or sorted(images)}")
        start = sum(ep["length"] for ep in self.episodes)
        episode = {
            "episode_index": len(self.episodes), "tasks": [task], "length": length,
            "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": start, "dataset_to_index": start + length,
        }
        for key, video in self.videos.items():
            episode.update({f"videos/{key}/{k}": v for k, v in video.add(images[key]).items()})
            self.stat_frames[key].append(images[key][:: max(1, length // _STAT_FRAMES_PER_EPISODE)])
        episode.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0})
        self.episodes.append(episode)
        for key, value in vectors.items():
            self.rows[key].append(value)
        self.task_index.append(np.full(length, self.tasks.setdefault(task, len(self.tasks)), dtype=np.int64))

    def finalize(self, extra_meta: dict | None = None) -> pathlib.Path:
        """Close the videos, write the parquet files and meta/, rename the folder into place."""
        if not self.episodes:
            raise ValueError(f"no episodes to write to {self.root}")
        for video in self.videos.values():
            video.close()
        lengths = [ep["length"] for ep in self.episodes]
        frame_index = np.concatenate([np.arange(n) for n in lengths])
        columns = {
            **{key: np.concatenate(parts) for key, parts in self.rows.items()},
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.repeat(np.arange(len(lengths)), lengths),
            "index": np.arange(sum(lengths)),
            "task_index": np.concatenate(self.task_index),
        }
        self._write_data(columns)
        self._write_meta(columns, extra_meta)
        self.tmp.rename(self.root)
        return self.root

    def _features(self) -> dict:
        features = {}
        for key, (height, width) in self.cameras.items():
            features[key] = {
                "dtype": "video", "shape": [height, width, 3], "names": ["height", "width", "channels"],
                "info": {"video.height": height, "video.width": width, "video.codec": VIDEO_CODECS[self.vcodec][0],
                         "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": self.fps,
                         "video.channels": 3, "has_audio": False},
            }
        for key, names in self.vectors.items():
            features[key] = {"dtype": "float32", "shape": [len(names)], "names": names}
        features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
        for key in ("frame_index", "episode_index", "index", "task_index"):
            features[key] = {"dtype": "int64", "shape": [1], "names": None}
        return features

    def _write_data(self, columns: dict) -> None:
        import pyarrow as pa

        arrays = {
            key: pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value.shape[1]) if value.ndim == 2 else pa.array(value)
            for key, value in columns.items()
        }
        hf_features = {  # the Hugging Face `datasets` schema LeRobot stores beside the arrow one
            key: {"feature": {"dtype": "float32", "_type": "Value"}, "length": len(names), "_type": "List"}
            for key, names in self.vectors.items()
        } | {key: {"dtype": str(columns[key].dtype), "_type": "Value"}
             for key in ("timestamp", "frame_index", "episode_index", "index", "task_index")}
        table = pa.table(arrays).replace_schema_metadata({"huggingface": json.dumps({"info": {"features": hf_features}})})
        _write_parquet(table, self.tmp / DATA_PATH.format(chunk_index=0, file_index=0))

    def _write_meta(self, columns: dict, extra_meta: dict | None) -> None:
        import pyarrow as pa

        meta = self.tmp / "meta"
        _write_parquet(pa.Table.from_pylist(self.episodes), meta / "episodes" / "chunk-000" / "file-000.parquet")
        tasks = pa.table({"task_index": pa.array(list(self.tasks.values()), pa.int64()), "__index_level_0__": list(self.tasks)})
        # LeRobot reads tasks.parquet with pandas, the task strings being the pandas index.
        pandas_meta = {
            "index_columns": ["__index_level_0__"],
            "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode", "numpy_type": "object",
                                "metadata": {"encoding": "UTF-8"}}],
            "columns": [
                {"name": "task_index", "field_name": "task_index", "pandas_type": "int64", "numpy_type": "int64", "metadata": None},
                {"name": None, "field_name": "__index_level_0__", "pandas_type": "unicode", "numpy_type": "object", "metadata": None},
            ],
        }
        _write_parquet(tasks.replace_schema_metadata({"pandas": json.dumps(pandas_meta)}), meta / "tasks.parquet")
        frames = sum(ep["length"] for ep in self.episodes)
        info = {
            "codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
            "total_episodes": len(self.episodes), "total_frames": frames, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": 100,
            "video_files_size_in_mb": self.video_files_size_in_mb, "fps": self.fps,
            "splits": {"train": f"0:{len(self.episodes)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.cameras else None, "features": self._features(),
        }
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        (meta / "stats.json").write_text(json.dumps(self._stats(columns), indent=4))
        if extra_meta:
            (self.tmp / EXPORT_META).write_text(json.dumps(extra_meta, indent=2))

    def _stats(self, columns: dict) -> dict:
        """LeRobot's stats.json: min, max, mean, std, count and 1/10/50/90/99% quantiles per
        feature; images per channel, scaled to [0, 1], shaped [3][1][1]."""
        stats = {}
        for key, value in columns.items():
            stats[key] = _feature_stats(value.reshape(len(value), -1))
        for key, parts in self.stat_frames.items():
            pixels = np.concatenate(parts).reshape(-1, 3) / 255.0
            per_channel = {s: [[[v]] for v in values] for s, values in _feature_stats(pixels).items() if s != "count"}
            stats[key] = {**per_channel, "count": [sum(len(p) for p in parts)]}
        return stats


def export_metaworld_store(
    store_dir: str | pathlib.Path,
    output: str | pathlib.Path,
    tasks: list[str],
    eval_seeds: dict,
    vcodec: str = "libsvtav1",
) -> pathlib.Path:
    """The demos of `tasks` in a Meta-World store (`metaworld_dataset.py`) as a v3.0 dataset.

    Camera `c` becomes `observation.images.c`, proprio `observation.state`, the 39-d state
    `observation.environment_state`, the instruction the task string. meta/drifting_vla.json
    records the Meta-World task of each instruction, the simulator settings (tasks, cameras,
    step limit, train and eval seeds) and the action layout (`METAWORLD_ACTION_SPEC`), so
    `data=lerobot data.root=<output>` trains like `data=metaworld` and evaluates in Meta-World.
    """
    store_dir = pathlib.Path(store_dir)
    collection = read_collection(store_dir)
    keys = {f"observation.images.{camera}": camera for camera in collection["cameras"]}
    size = int(collection["image_size"])
    writer = LeRobotWriter(
        output, fps=METAWORLD_FPS, cameras={key: (size, size) for key in keys},
        state_names=["hand_x", "hand_y", "hand_z", "gripper_opening"],
        action_names=["delta_x", "delta_y", "delta_z", "gripper_effort"],
        vcodec=vcodec, robot_type="sawyer",
        extra_features={"observation.environment_state": [f"state_{i}" for i in range(39)]},
    )
    task_names = {}
    for task in tasks:
        meta, ends = read_task_meta(store_dir / task)
        arrays = open_task_arrays(store_dir / task)
        task_names[meta["instruction"]] = task
        for start, end in zip([0, *ends[:-1]], ends, strict=True):
            images = arrays["images"][start:end]  # [L, V, 3, H, W]
            writer.add_episode(
                meta["instruction"],
                {key: images[:, v].transpose(0, 2, 3, 1) for v, key in enumerate(keys)},
                {"observation.state": arrays["proprio"][start:end], "action": arrays["actions"][start:end],
                 "observation.environment_state": arrays["state"][start:end]},
            )
    simulator = {
        "name": "metaworld", "tasks": list(tasks), "cameras": keys,
        "max_episode_steps": int(collection["max_episode_steps"]),
        "train_seeds": dict(collection["train_seeds"]), "eval_seeds": {k: int(v) for k, v in eval_seeds.items()},
    }
    # The action layout Meta-World's own data config uses, so data=lerobot trains the same decoder.
    action_spec = METAWORLD_ACTION_SPEC.to_config()
    return writer.finalize({"task_names": task_names, "simulator": simulator, "action_spec": action_spec})


class _VideoFile:
    """All episodes of one camera, back to back, rolling over to a new mp4 past the size limit."""

    def __init__(self, root: pathlib.Path, key: str, fps: int, vcodec: str, size: tuple[int, int], limit_bytes: int) -> None:
        self.root, self.key, self.fps, self.vcodec, (self.height, self.width) = root, key, fps, vcodec, size
        self.limit_bytes, self.file_number, self.container = limit_bytes, -1, None

    def add(self, frames: np.ndarray) -> dict:
        """Encode an episode's frames [L, H, W, 3]; returns its meta/episodes video columns."""
        import av

        if frames.shape[1:] != (self.height, self.width, 3) or frames.dtype != np.uint8:
            raise ValueError(f"camera {self.key!r} frames must be uint8 [L, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}")
        if self.container is None or self.bytes > self.limit_bytes:
            self._open_next()
        first = self.frames
        for rgb in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = self.frames, fractions.Fraction(1, self.fps)
            self._mux(self.stream.encode(frame))
            self.frames += 1
        return {
            "chunk_index": self.file_number // CHUNKS_SIZE, "file_index": self.file_number % CHUNKS_SIZE,
            "from_timestamp": first / self.fps, "to_timestamp": self.frames / self.fps,
        }

    def close(self) -> None:
        if self.container is not None:
            self._mux(self.stream.encode())  # flush the encoder's delayed frames
            self.container.close()
            self.container = None

    def _open_next(self) -> None:
        import av

        self.close()
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 logs its whole configuration per file; errors only
        self.file_number += 1
        chunk_index, file_index = divmod(self.file_number, CHUNKS_SIZE)
        path = self.root / VIDEO_PATH.format(video_key=self.key, chunk_index=chunk_index, file_index=file_index)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(self.vcodec, rate=self.fps)
        self.stream.width, self.stream.height, self.stream.pix_fmt = self.width, self.height, "yuv420p"
        self.stream.options = VIDEO_CODECS[self.vcodec][1]
        self.frames, self.bytes = 0, 0

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)


def _feature_stats(x: np.ndarray) -> dict[str, list]:
    """compute_stats' statistics plus the count and the 10/50/90% quantiles LeRobot also stores."""
    stats = compute_stats({"x": x})["x"]
    q10, q50, q90 = np.quantile(np.asarray(x, dtype=np.float64), [0.1, 0.5, 0.9], axis=0)
    return {**stats, "count": [len(x)], "q10": q10.tolist(), "q50": q50.tolist(), "q90": q90.tolist()}


def _write_parquet(table, path: pathlib.Path) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")
