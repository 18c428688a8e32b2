"""Tiny LeRobot v3.0 datasets in the layouts of well-known hub datasets, for tests and examples.

    write_hub_layout(root, "aloha")                   # like lerobot/aloha_sim_*: 14-dim state and
                                                      # action, video observation.images.top, 50 fps
    write_hub_layout(root, "pusht", image="image")    # like lerobot/pusht: 2-dim, observation.image
                                                      # (video, or PNG in the parquet), 10 fps

Feature keys, dtypes, `names` (a {"motors": [...]} dict, as converted hub datasets have them), the
extra columns (`next.done`, PushT's `next.reward` and `next.success`) and fps follow the hub
datasets; frames are smaller (ALOHA's 480x640 become 48x64) and there are fewer, shorter episodes.
Files are written with pyarrow and PyAV in LeRobot's layout (docs/data.md), independently of
`lerobot_writer.py`, so a reader test does not only read back what our own writer wrote.

Values follow a formula, so a reader can be checked exactly (ep: episode, t: frame in it, d: dim):
state = ep * 100 + t + d / 100, action = -state, and every pixel of the camera at (ep, t) is
RGB (10 + 9 t, 245 - 9 t, 20 ep).
"""

from __future__ import annotations

import fractions
import json
import os
import pathlib
from dataclasses import dataclass

import numpy as np

DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
ALOHA_MOTORS = [f"{side}_{joint}" for side in ("left", "right") for joint in
                ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")]


@dataclass(frozen=True)
class HubLayout:
    fps: int
    camera: str
    frame_size: tuple[int, int]  # height, width
    motors: list[str]  # the names of the state and action dimensions
    extra: dict[str, str]  # scalar columns beside the standard ones: key -> dtype
    robot_type: str | None
    task: str
    vcodec: str  # PyAV encoder of the video feature: what the hub dataset's info.json records


HUB_LAYOUTS = {
    "aloha": HubLayout(50, "observation.images.top", (48, 64), ALOHA_MOTORS, {"next.done": "bool"}, "aloha",
                       "Insert the peg into the socket.", "libsvtav1"),
    "pusht": HubLayout(10, "observation.image", (96, 96), ["motor_0", "motor_1"],
                       {"next.reward": "float32", "next.done": "bool", "next.success": "bool"}, None,
                       "Push the T-shaped block onto the T-shaped target.", "libsvtav1"),
}
_CODEC_NAMES = {"libsvtav1": "av1", "libx264": "h264"}


def write_hub_layout(root: str | pathlib.Path, layout: str, image: str = "video", episodes: int = 10,
                     length: int = 8) -> pathlib.Path:
    """A v3.0 dataset in `layout` ("aloha" or "pusht") at `root`: `episodes` episodes of
    `length` frames; the camera stored as `image` ("video": an mp4, "image": PNG bytes)."""
    spec = HUB_LAYOUTS[layout]
    if image not in ("video", "image"):
        raise ValueError(f"image must be 'video' or 'image', got {image!r}")
    root = pathlib.Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=False)
    frames = [_frames(spec, ep, length) for ep in range(episodes)]
    state = np.concatenate([_state(ep, length, len(spec.motors)) for ep in range(episodes)])
    rows = {
        "observation.state": state, "action": -state,
        "timestamp": np.tile(np.arange(length) / spec.fps, episodes).astype(np.float32),
        "frame_index": np.tile(np.arange(length), episodes), "episode_index": np.repeat(np.arange(episodes), length),
        "index": np.arange(episodes * length), "task_index": np.zeros(episodes * length, dtype=np.int64),
    }
    rows |= {key: _extra_column(key, episodes, length) for key in spec.extra}
    episode_rows = [_episode_row(ep, length, spec.task) for ep in range(episodes)]
    if image == "video":
        for row, start in zip(episode_rows, _write_video(root, spec, frames), strict=True):
            row |= {f"videos/{spec.camera}/chunk_index": 0, f"videos/{spec.camera}/file_index": 0,
                    f"videos/{spec.camera}/from_timestamp": start, f"videos/{spec.camera}/to_timestamp": start + length / spec.fps}
    else:
        rows[spec.camera] = [_png(frame) for episode in frames for frame in episode]
    _write_data(root, spec, rows)
    _write_meta(root, spec, image, episode_rows, rows)
    return root


def _state(ep: int, length: int, dim: int) -> np.ndarray:
    return (ep * 100 + np.arange(length)[:, None] + np.arange(dim)[None] / 100).astype(np.float32)


def _frames(spec: HubLayout, ep: int, length: int) -> np.ndarray:
    """uint8 [L, H, W, 3], one colour per frame."""
    colours = np.stack([10 + 9 * np.arange(length), 245 - 9 * np.arange(length), np.full(length, 20 * ep)], 1) % 256
    return np.broadcast_to(colours.astype(np.uint8)[:, None, None, :], (length, *spec.frame_size, 3)).copy()


def _extra_column(key: str, episodes: int, length: int) -> np.ndarray:
    last = np.tile(np.arange(length) == length - 1, episodes)
    return last.astype(np.float32) if key == "next.reward" else last


def _episode_row(ep: int, length: int, task: str) -> dict:
    return {"episode_index": ep, "tasks": [task], "length": length, "data/chunk_index": 0, "data/file_index": 0,
            "dataset_from_index": ep * length, "dataset_to_index": (ep + 1) * length,
            "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}


def _png(frame: np.ndarray) -> dict:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _write_video(root: pathlib.Path, spec: HubLayout, frames: list[np.ndarray]) -> list[float]:
    """Every episode back to back in one mp4 (a keyframe every 2 frames, as LeRobot encodes;
    crf 10, where LeRobot uses 30, which blurred a frame 7/255 towards its neighbour here); returns
    each episode's from_timestamp."""
    import av

    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 logs its whole configuration per file; errors only
    path = root / VIDEO_PATH.format(video_key=spec.camera, chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True)
    starts, count = [], 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream(spec.vcodec, rate=spec.fps)
        stream.height, stream.width = spec.frame_size
        stream.pix_fmt, stream.options = "yuv420p", {"g": "2", "crf": "10", "preset": "12"}  # LeRobot's GOP; crf 10, not 30: frames stay apart
        for episode in frames:
            starts.append(count / spec.fps)
            for rgb in episode:
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts, frame.time_base = count, fractions.Fraction(1, spec.fps)
                container.mux(stream.encode(frame))
                count += 1
        container.mux(stream.encode())
    return starts


def _write_data(root: pathlib.Path, spec: HubLayout, rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {}
    for key, value in rows.items():
        if key == spec.camera:
            columns[key] = pa.array(value, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        elif np.ndim(value) == 2:
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(value.reshape(-1)), value.shape[1])
        else:
            columns[key] = pa.array(value)
    path = root / DATA_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table(columns), path)


def _write_meta(root: pathlib.Path, spec: HubLayout, image: str, episode_rows: list[dict], rows: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = root / "meta"
    (meta / "episodes" / "chunk-000").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(episode_rows), meta / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task_index": pa.array([0], pa.int64()), "__index_level_0__": [spec.task]}), meta / "tasks.parquet")
    height, width = spec.frame_size
    camera = {"dtype": image, "shape": [height, width, 3], "names": ["height", "width", "channel"]}
    if image == "video":
        camera["info"] = {"video.height": height, "video.width": width, "video.codec": _CODEC_NAMES[spec.vcodec],
                          "video.pix_fmt": "yuv420p", "video.is_depth_map": False, "video.fps": spec.fps,
                          "video.channels": 3, "has_audio": False}
    vector = {"dtype": "float32", "shape": [len(spec.motors)], "names": {"motors": spec.motors}}
    scalar = {"shape": [1], "names": None}
    features = {
        spec.camera: camera, "observation.state": vector, "action": vector,
        **{key: {"dtype": dtype, **scalar} for key, dtype in spec.extra.items()},
        "timestamp": {"dtype": "float32", **scalar},
        **{key: {"dtype": "int64", **scalar} for key in ("frame_index", "episode_index", "index", "task_index")},
    }
    frames = len(rows["index"])
    info = {
        "codebase_version": "v3.0", "robot_type": spec.robot_type, "total_episodes": len(episode_rows),
        "total_frames": frames, "total_tasks": 1, "chunks_size": 1000, "data_files_size_in_mb": 100,
        "video_files_size_in_mb": 200, "fps": spec.fps, "splits": {"train": f"0:{len(episode_rows)}"},
        "data_path": DATA_PATH, "video_path": VIDEO_PATH if image == "video" else None, "features": features,
    }
    (meta / "info.json").write_text(json.dumps(info, indent=4))
    stats = {key: _vector_stats(rows[key]) for key in ("observation.state", "action")}
    (meta / "stats.json").write_text(json.dumps(stats, indent=4))


def _vector_stats(x: np.ndarray) -> dict[str, list]:
    """LeRobot's per-feature statistics of [N, D] values."""
    x = np.asarray(x, dtype=np.float64)
    quantiles = {f"q{round(q * 100):02d}": np.quantile(x, q, axis=0).tolist() for q in (0.01, 0.1, 0.5, 0.9, 0.99)}
    return {"min": x.min(0).tolist(), "max": x.max(0).tolist(), "mean": x.mean(0).tolist(), "std": x.std(0).tolist(),
            "count": [len(x)], **quantiles}
