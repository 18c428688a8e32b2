"""LeRobotDataset v3.0 (the ecosystem's exchange format) as a dataset of sample dicts.

    dataset = LeRobotDataset(root, cameras=["observation.images.front"], horizon=16, image_size=64)
    dataset[i]    # images uint8 [V, 3, H, W], proprio, actions [T, A], action_mask, instruction, task

Read with pyarrow (parquet) and PyAV (mp4, AV1 or H.264), no LeRobot install, no torchvision.
The layout (templates and features in `meta/info.json`):

    meta/info.json  meta/stats.json  meta/tasks.parquet  meta/episodes/chunk-XXX/file-XXX.parquet
    data/chunk-XXX/file-XXX.parquet           one row per frame, many episodes per file; `image`
                                              features are PNG bytes in the row
    videos/<key>/chunk-XXX/file-XXX.mp4       `video` features, many episodes per file

A frame of a video feature is the one at `from_timestamp` (of its episode, per key, in
meta/episodes) + the row's `timestamp`, found by seeking to the keyframe before it (LeRobot
encodes a keyframe every 2 frames) and decoding forward. Low-dimensional columns are read once
into memory; image columns and video files are opened lazily in each loader worker.

    frame t of an episode of length L:  images, proprio at t (with n_obs_steps = n > 1: at
    t-n+1 .. t, the episode's first frame repeated before its start);  actions t .. t+T-1 (rows
    past L-1 repeat the last action, mask False), as the other datasets return them (specs.py).

When the dataset opens, each episode's data file is read (all of its rows), its video files are
looked for and its actions and states checked for being finite; an episode that fails stops the
run with an error naming the file, or with `skip_corrupt` (data.skip_corrupt=true) is left out
with a warning naming it, like a damaged RLBench episode. A data file holds many episodes: all of
them go with it. The split is made before leaving any out, so the held-out episodes stay the same.

Datasets written by `drifting_vla.data.lerobot_writer` also hold `meta/drifting_vla.json`: the
task name of each instruction and the simulator the demos came from, so that a policy trained on
the export can be evaluated in that simulator (`simulator`), and the action layout
(`lerobot_features.py` reads it when data.action_spec is unset).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pathlib

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from drifting_vla.data.lerobot_features import check_size, feature_size, resolve_cameras
from drifting_vla.data.lerobot_paths import dataset_file
from drifting_vla.data.normalization import STATS, compute_stats
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.transforms import (
    action_window,
    check_n_obs_steps,
    first_non_finite,
    history_rows,
    split_episodes,
    stack_history,
)

log = logging.getLogger(__name__)

CODEBASE_VERSION = "v3.0"
EXPORT_META = "meta/drifting_vla.json"
TIMESTAMP_TOLERANCE_S = 1e-4
"""LeRobot's own `tolerance_s`: a decoded frame farther than this from the asked time is an error
(a frame period is 1/fps, orders of magnitude more)."""

REMEDY = "download or export the dataset again, or set data.skip_corrupt=true to train without the samples that need it"
_INHERITED_FILES: list[dict] = []  # a forked worker's copies of its parent's open files (see _files)
_CONVERTERS = {
    "v2.1": "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=<repo_id>",
    "v2.0": "first v2.0 -> v2.1 (lerobot.datasets.v21.convert_dataset_v20_to_v21, lerobot <= 0.3), then "
    "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=<repo_id>",
}


def resolve_root(root: str | None, repo_id: str | None = None, revision: str | None = None) -> pathlib.Path:
    """The local folder of the dataset: `root`, or a hub snapshot of `repo_id` at `revision`."""
    if root:
        path = pathlib.Path(str(root)).expanduser()
        if not (path / "meta" / "info.json").is_file():
            raise FileNotFoundError(f"no LeRobot dataset at data.root={path} (no meta/info.json)")
        return path
    if not repo_id:
        raise ValueError("data=lerobot needs data.root (a local dataset folder) or data.repo_id (a hub dataset)")
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(str(repo_id), repo_type="dataset", revision=revision))
    except Exception as e:  # offline (HF_HUB_OFFLINE=1, no network), unknown repo, auth: one answer
        raise RuntimeError(
            f"cannot download the LeRobot dataset {repo_id!r} (revision {revision}) from the hub: "
            f"{type(e).__name__}: {e}. On a machine with access run `hf download {repo_id} --repo-type dataset "
            f"--local-dir DIR`, copy DIR here and train with data.root=DIR"
        ) from e


def read_info(root: pathlib.Path) -> dict:
    """meta/info.json, refusing codebase versions other than v3.0 with the converter to run."""
    info = _read_json(root / "meta" / "info.json")
    version = info.get("codebase_version")
    if version != CODEBASE_VERSION:
        how = _CONVERTERS.get(version, "convert it to v3.0 with LeRobot's converters (lerobot.datasets.v30)")
        raise ValueError(
            f"{root / 'meta' / 'info.json'} says codebase_version {version!r}; this reader reads {CODEBASE_VERSION}. "
            f"Convert the dataset with LeRobot: {how}"
        )
    return info


def read_export_meta(root: pathlib.Path) -> dict:
    """meta/drifting_vla.json (what our exporter records beside LeRobot's files), {} without it."""
    path = root / EXPORT_META
    return _read_json(path) if path.is_file() else {}


class LeRobotDataset(Dataset):
    """Items are sample dicts (`drifting_vla.specs`) built from a LeRobot v3.0 dataset folder."""

    def __init__(
        self,
        root: str | pathlib.Path,
        cameras: list[str] | None,
        horizon: int,
        image_size: int,
        state_key: str = "observation.state",
        action_key: str = "action",
        split: str = "all",
        holdout_every: int = 0,
        action_dim: int | None = None,
        proprio_dim: int | None = None,
        n_obs_steps: int = 1,
        skip_corrupt: bool = False,
    ) -> None:
        """`cameras`: image or video feature keys (any mix), each resized to `image_size` square;
        None: every image and video feature (lerobot_features.py).
        `split` "train" / "val" holds out every `holdout_every`-th episode (by episode index order).
        `action_dim` / `proprio_dim`: what the data config expects of the action and state
        features (checked here, so a mismatch names the feature instead of failing in the model).
        `skip_corrupt`: leave out the episodes whose files are damaged (above) instead of failing."""
        split_episodes(0, split, holdout_every)  # a bad split fails before anything is read
        self.root = pathlib.Path(root)
        self.info = read_info(self.root)
        self.features = self.info["features"]
        self.cameras = resolve_cameras(cameras, self.features, self.root / "meta" / "info.json")
        self.horizon, self.image_size = int(horizon), int(image_size)
        self.n_obs_steps = check_n_obs_steps(n_obs_steps)
        self.state_key, self.action_key = state_key, action_key
        self.skip_corrupt = skip_corrupt
        self.skipped: list[str] = []  # with skip_corrupt: why episodes were left out
        self._check_features(action_dim, proprio_dim)
        self.tasks = _read_tasks(self.root / "meta" / "tasks.parquet")
        export = read_export_meta(self.root)
        self._task_names = export.get("task_names", {})
        self._export_simulator = export.get("simulator")

        episodes = _read_episodes(self.root)
        left_out: set[int] = set()  # episodes whose files are damaged (skip_corrupt)
        self._frames = self._read_frames(episodes, left_out)
        self._video_ref = {  # per video camera: per episode (path, from_timestamp)
            key: self._video_paths(episodes, key, left_out) for key in self.cameras if self.features[key]["dtype"] == "video"
        }
        keep = [k for k in split_episodes(len(episodes["episode_index"]), split, holdout_every) if k not in left_out]
        if not keep:
            damaged = f", {len(left_out)} of them left out as damaged" if left_out else ""
            raise ValueError(
                f"the {split} split of {self.root} is empty ({len(episodes['episode_index'])} episodes{damaged}, "
                f"holdout_every={holdout_every}); lower data.holdout_every or add episodes"
            )
        self._episode_start = episodes["row_start"]
        rows, ends, episode_of_row = [], [], []
        for k in keep:
            start, end = episodes["row_start"][k], episodes["row_end"][k]
            rows.append(np.arange(start, end))
            ends.append(np.full(end - start, end))
            episode_of_row.append(np.full(end - start, k))
        self._index = np.stack([np.concatenate(rows), np.concatenate(ends), np.concatenate(episode_of_row)], 1)
        self._open: dict = {}  # per process: open videos, PNG columns (see _files)

    # ------------------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        row, end, episode = (int(v) for v in self._index[i])
        f = self._frames
        chunk, mask = action_window(f["actions"][row:end], 0, self.horizon)
        instruction = self.tasks[int(f["task_index"][row])]
        frames = history_rows(row, int(self._episode_start[episode]), self.n_obs_steps)
        images = stack_history([np.stack([self._image(key, int(r), episode) for key in self.cameras]) for r in frames])
        return {
            "images": torch.from_numpy(images),
            "proprio": torch.from_numpy(stack_history([f["proprio"][r].copy() for r in frames])),
            "instruction": instruction,
            "actions": torch.from_numpy(chunk),
            "action_mask": torch.from_numpy(mask),
            "task": self._task_names.get(instruction, instruction),
        }

    def all_instructions(self) -> list[str]:
        """Every task string of the dataset, sorted (the vocabulary of learned task embeddings)."""
        return sorted(set(self.tasks.values()))

    def all_actions(self) -> np.ndarray:
        """The actions of this split's frames, float32 [N, A]."""
        return self._frames["actions"][self._index[:, 0]]

    def all_proprio(self) -> np.ndarray:
        return self._frames["proprio"][self._index[:, 0]]

    def episode_ids(self) -> np.ndarray:
        """The episode index of every sample, int64 [N] (neighbour positives can leave it out)."""
        return self._index[:, 2].astype(np.int64)

    def normalization_stats(self) -> dict[str, dict[str, list[float]]]:
        """{"actions", "proprio"} statistics: meta/stats.json's when it has all of `STATS` for both
        features (LeRobot computes them at recording time, over every episode), else computed over
        this split."""
        path = self.root / "meta" / "stats.json"
        recorded = _read_json(path) if path.is_file() else {}
        keys = {"actions": self.action_key, "proprio": self.state_key}
        if not all(set(STATS) <= set(recorded.get(feature, {})) for feature in keys.values()):
            return compute_stats({"actions": self.all_actions(), "proprio": self.all_proprio()})
        stats = {}
        for name, feature in keys.items():
            dim = self.features[feature]["shape"][0]
            for s in STATS:
                if len(recorded[feature][s]) != dim:
                    raise ValueError(
                        f"{path}: {feature}.{s} has {len(recorded[feature][s])} values but the feature "
                        f"has shape {self.features[feature]['shape']}; delete the file to compute the stats instead"
                    )
                if first_non_finite(np.asarray(recorded[feature][s], dtype=np.float64)) is not None:
                    raise ValueError(f"{path}: {feature}.{s} holds non-finite values {recorded[feature][s]}; "
                                     "delete the file to compute the stats instead")
            stats[name] = {s: [float(v) for v in recorded[feature][s]] for s in STATS}
        return stats

    def simulator(self) -> dict | None:
        """The data config of the simulator the demos came from, for `data.cameras` (each camera
        key mapped to its simulator camera), or None when the dataset does not record one."""
        sim = self._export_simulator
        if not sim or not all(key in sim["cameras"] for key in self.cameras):
            return None
        return {**{k: v for k, v in sim.items() if k != "cameras"}, "cameras": [sim["cameras"][key] for key in self.cameras]}

    def __getstate__(self) -> dict:
        # Open files do not pickle; each worker reopens its own.
        return {**self.__dict__, "_open": {}}

    # ------------------------------------------------------------------------------ reading
    def _check_features(self, action_dim: int | None, proprio_dim: int | None) -> None:
        info = self.root / "meta" / "info.json"
        expected = (
            (self.action_key, action_dim, "data.action_spec", "data.action_key"),
            (self.state_key, proprio_dim, "data.proprio_dim", "data.state_key"),
        )
        for key, dim, config, key_config in expected:
            check_size(dim, config, key, feature_size(self.features, key, key_config, info), key_config, info)

    def _leave_out(self, error: CorruptEpisodeError, episodes: list[int], left_out: set[int]) -> None:
        """Add `episodes` (indices into meta/episodes), whose file `error` names, to `left_out`
        under skip_corrupt, with a warning; without it, raise the error and say how to go on."""
        if not self.skip_corrupt:
            raise CorruptEpisodeError(f"{error} (set data.skip_corrupt=true to train without the episodes that need it)") from error
        left_out.update(episodes)
        self.skipped.append(str(error))
        log.warning("data.skip_corrupt=true: %d episode(s) left out: %s", len(episodes), error)

    def _read_frames(self, episodes: dict, left_out: set[int]) -> dict[str, np.ndarray]:
        """The low-dimensional columns of every readable data file, concatenated in file order;
        each episode's row range is checked against the global `index` column, and its values
        for being finite. Episodes that fail join `left_out` (`_leave_out`)."""
        file_of_episode = list(zip(episodes["data/chunk_index"], episodes["data/file_index"], strict=True))
        files = sorted(set(file_of_episode))
        columns = {"proprio": self.state_key, "actions": self.action_key, "timestamp": "timestamp",
                   "task_index": "task_index", "index": "index"}
        parts, file_of_row, row_in_file = [], [], []
        for n, (chunk, file) in enumerate(files):
            path = self._file("data_path", chunk_index=chunk, file_index=file)
            try:
                table = _read_parquet(path, list(columns.values()))
                part = {name: _column(table, key, path) for name, key in columns.items()}
                self._check_widths(part, path)
                parts.append(part)
            except CorruptEpisodeError as error:
                self._leave_out(error, [k for k, f in enumerate(file_of_episode) if f == (chunk, file)], left_out)
                continue
            file_of_row.append(np.full(table.num_rows, n))
            row_in_file.append(np.arange(table.num_rows))
        if not parts:
            raise CorruptEpisodeError(f"no data file of {self.root} can be read (each is named above); download or export the dataset again")
        frames = {name: np.concatenate([p[name] for p in parts]) for name in columns}
        frames["proprio"] = frames["proprio"].astype(np.float32)
        frames["actions"] = frames["actions"].astype(np.float32)
        frames["file"], frames["row_in_file"] = np.concatenate(file_of_row), np.concatenate(row_in_file)
        self._data_files = [self._file("data_path", chunk_index=c, file_index=f).relative_to(self.root) for c, f in files]
        order = np.argsort(frames["index"], kind="stable")
        frames = {k: v[order] for k, v in frames.items()}
        episodes["row_start"] = np.searchsorted(frames["index"], episodes["dataset_from_index"])
        episodes["row_end"] = episodes["row_start"] + (episodes["dataset_to_index"] - episodes["dataset_from_index"])
        for k, (start, end) in enumerate(zip(episodes["row_start"], episodes["row_end"], strict=True)):
            if k in left_out:
                continue
            found = frames["index"][start:end]
            wanted = np.arange(episodes["dataset_from_index"][k], episodes["dataset_to_index"][k])
            if len(found) != len(wanted) or (found != wanted).any():
                self._leave_out(CorruptEpisodeError(
                    f"episode {episodes['episode_index'][k]} spans index {wanted[0]}..{wanted[-1]} in meta/episodes "
                    f"but {self.root / 'data'} lacks some of those rows; the dataset is incomplete: download or export it again"
                ), [k], left_out)
                continue
            for name, feature in (("actions", self.action_key), ("proprio", self.state_key)):
                row = first_non_finite(frames[name][start:end])
                if row is not None:
                    self._leave_out(CorruptEpisodeError(
                        f"{self.root / self._data_files[int(frames['file'][start + row])]}: episode {episodes['episode_index'][k]} "
                        f"has a non-finite {feature!r} at frame {row} ({frames[name][start + row].tolist()}); "
                        "fix or drop that episode and export the dataset again"
                    ), [k], left_out)
                    break
        return frames

    def _check_widths(self, part: dict[str, np.ndarray], path: pathlib.Path) -> None:
        """The action and state columns of a data file have the width info.json declares (else the
        first normalization fails, naming neither); CorruptEpisodeError naming both otherwise."""
        for name, feature in (("actions", self.action_key), ("proprio", self.state_key)):
            width = part[name].shape[1] if part[name].ndim == 2 else 1
            declared = list(self.features[feature]["shape"])
            if len(part[name]) and [width] != declared:
                raise CorruptEpisodeError(
                    f"{path}: column {feature!r} has {width} values per frame, but {self.root / 'meta' / 'info.json'} "
                    f"declares shape {declared}; the file and info.json disagree: export or download the dataset again"
                )

    def _video_paths(self, episodes: dict, key: str, left_out: set[int]) -> list[tuple[pathlib.Path, float]]:
        """(video file, from_timestamp) of each episode for the video feature `key`; the episodes
        of a missing file join `left_out` (`_leave_out`)."""
        prefix = f"videos/{key}/"
        missing = [c for c in ("chunk_index", "file_index", "from_timestamp") if prefix + c not in episodes]
        if missing:
            raise CorruptEpisodeError(f"{self.root / 'meta' / 'episodes'} lacks the columns {[prefix + c for c in missing]} of video feature {key!r}")
        paths = [
            self._file("video_path", video_key=key, chunk_index=chunk, file_index=file)
            for chunk, file in zip(episodes[prefix + "chunk_index"], episodes[prefix + "file_index"], strict=True)
        ]
        for path in sorted(set(paths)):
            ks = [k for k, p in enumerate(paths) if p == path and k not in left_out]
            if ks and not path.is_file():
                indices = [int(episodes["episode_index"][k]) for k in ks]
                self._leave_out(CorruptEpisodeError(f"video file {path} (feature {key!r}, episodes {indices}) is missing"), ks, left_out)
        return [(path, float(start)) for path, start in zip(paths, episodes[prefix + "from_timestamp"], strict=True)]

    def _file(self, template: str, **values) -> pathlib.Path:
        """A file of the dataset from info.json's `template` key, kept under the root (lerobot_paths)."""
        return dataset_file(self.root, self.info, template, self.root / "meta" / "info.json", **values)

    def _image(self, key: str, row: int, episode: int) -> np.ndarray:
        """uint8 [3, S, S] of camera `key` at frame `row`."""
        if key in self._video_ref:
            path, start = self._video_ref[key][episode]
            rgb = self._decode_video_frame(path, start + float(self._frames["timestamp"][row]))
        else:
            rgb = self._decode_png(key, int(self._frames["file"][row]), int(self._frames["row_in_file"][row]))
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))

    def _files(self) -> dict:
        """This process's open files: {"videos": {path: PyAV container}, "png": {(file, key): PNG
        bytes column}, "reformatter": PyAV's frame converter}, opened by each process itself.
        A forked loader worker inherits the parent's decoders, whose threads did not survive the
        fork: freeing them joins those threads and hangs forever, so they are kept, unused."""
        if self._open.get("pid") != os.getpid():
            _INHERITED_FILES.append(self._open)
            self._open = {"pid": os.getpid(), "videos": {}, "png": {}, "reformatter": None}
        return self._open

    def _decode_png(self, key: str, file: int, row: int) -> np.ndarray:
        columns = self._files()["png"]
        if (file, key) not in columns:
            path = self.root / self._data_files[file]
            columns[(file, key)] = _read_parquet(path, [key]).column(key).combine_chunks().field("bytes")
        try:
            with Image.open(io.BytesIO(columns[(file, key)][row].as_py())) as image:
                image = image.convert("RGB")
                if image.size != (self.image_size, self.image_size):
                    image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
                return np.asarray(image)
        except (OSError, ValueError, SyntaxError) as e:  # what PIL raises for a damaged image
            raise CorruptEpisodeError(
                f"cannot decode {key!r} in row {row} of {self.root / self._data_files[file]} ({type(e).__name__}: {e}); {REMEDY}"
            ) from e

    def _decode_video_frame(self, path: pathlib.Path, t: float) -> np.ndarray:
        """uint8 [S, S, 3]: the frame at time `t` (seconds) of `path`."""
        import av
        from av.video.reformatter import VideoReformatter

        files = self._files()
        try:
            if path not in files["videos"]:
                files["videos"][path] = av.open(str(path))
                # One decoding thread: a threaded decoder must be primed with several frames after
                # every seek (3x slower per random frame, measured); workers give the parallelism.
                files["videos"][path].streams.video[0].codec_context.thread_count = 1
            container = files["videos"][path]
            stream = container.streams.video[0]
            container.seek(int(t / stream.time_base), stream=stream, backward=True)  # the keyframe at or before t
            for frame in container.decode(stream):
                if frame.time < t - TIMESTAMP_TOLERANCE_S:
                    continue
                if frame.time > t + TIMESTAMP_TOLERANCE_S:
                    break
                # A kept reformatter reuses its scaler; `frame.to_ndarray` builds one per call (10x slower).
                files["reformatter"] = files["reformatter"] or VideoReformatter()
                return files["reformatter"].reformat(frame, width=self.image_size, height=self.image_size, format="rgb24").to_ndarray()
        except (av.error.FFmpegError, OSError) as e:
            files["videos"].pop(path, None)
            raise CorruptEpisodeError(f"cannot decode {path} at {t:.4f} s ({type(e).__name__}: {e}); the file is damaged: {REMEDY}") from e
        raise CorruptEpisodeError(
            f"{path} has no frame within {TIMESTAMP_TOLERANCE_S} s of {t:.4f} s (truncated, or meta/episodes "
            f"timestamps do not match the video); {REMEDY}"
        )


def _read_json(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptEpisodeError(f"cannot read {path} ({type(e).__name__}: {e}); download or export the dataset again") from e


def _read_parquet(path: pathlib.Path, columns: list[str] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except FileNotFoundError as e:
        raise CorruptEpisodeError(f"parquet file {path} is missing; download or export the dataset again") from e
    except (pa.ArrowException, OSError) as e:
        raise CorruptEpisodeError(f"cannot read parquet file {path} ({type(e).__name__}: {e}); the file is damaged or truncated") from e


def _column(table, key: str, path: pathlib.Path) -> np.ndarray:
    """A numeric column as numpy: scalars [N], vectors (fixed-size or plain lists) [N, D]."""
    column = table.column(key).combine_chunks()
    if hasattr(column, "flatten"):
        values = column.flatten().to_numpy(zero_copy_only=False)
        if len(column) and len(values) % len(column):
            raise CorruptEpisodeError(f"column {key!r} of {path} has rows of different lengths")
        return values.reshape(len(column), -1)
    return column.to_numpy(zero_copy_only=False)


def _read_episodes(root: pathlib.Path) -> dict[str, np.ndarray]:
    """meta/episodes/*/*.parquet as columns (without the per-episode `stats/*`), by episode index."""
    import pyarrow as pa

    paths = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not paths:
        raise CorruptEpisodeError(f"{root / 'meta' / 'episodes'} holds no chunk-*/file-*.parquet; the dataset is incomplete")
    tables = [_read_parquet(p) for p in paths]
    tables = [t.select([c for c in t.column_names if not c.startswith("stats/")]) for t in tables]
    table = pa.concat_tables(tables, promote_options="default")
    episodes = {c: table.column(c).to_numpy() for c in table.column_names if c != "tasks"}
    order = np.argsort(episodes["episode_index"])
    return {c: v[order] for c, v in episodes.items()}


def _read_tasks(path: pathlib.Path) -> dict[int, str]:
    """task_index -> task string. LeRobot writes the strings as the pandas index
    (`__index_level_0__`); a plain `task` column is read too."""
    table = _read_parquet(path)
    name = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
    if name is None or "task_index" not in table.column_names:
        raise CorruptEpisodeError(f"{path} has columns {table.column_names}; expected task_index and the task strings")
    return dict(zip(table.column("task_index").to_pylist(), table.column(name).to_pylist(), strict=True))
