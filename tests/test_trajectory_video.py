"""eval/trajectory_video: the frame compositor, the title, the frames and the encoded file."""

import imageio.v2 as imageio
import numpy as np
import pytest

from drifting_vla.logging.trajectory_video import (
    PLOT_HEIGHT_PX,
    TITLE_HEIGHT_PX,
    compose_frame,
    episode_title,
    frame_strip,
    trajectory_frames,
    write_trajectory_video,
)

RECORD = {"task": "reach-v3", "seed": 100000, "success": False, "steps": 11, "error": None}


def episode(steps: int = 11, size: int = 64):
    """Camera frames that brighten step by step and a helix of end-effector positions."""
    t = np.arange(steps + 1)
    frames = [np.full((size, size, 3), 10 * k, np.uint8) for k in t]
    positions = np.stack([np.cos(t / 3), np.sin(t / 3), 0.05 * t], axis=1)
    return frames, positions


def test_compose_frame_puts_the_title_above_the_camera_beside_the_plots():
    camera = np.full((4, 3, 3), 7, np.uint8)
    plots = np.full((6, 5, 3), 9, np.uint8)
    title = np.full((2, 8, 3), 1, np.uint8)
    frame = compose_frame(camera, plots, title)
    assert frame.shape == (8, 8, 3) and frame.dtype == np.uint8
    assert (frame[:2] == 1).all()
    assert (frame[2:8, 3:] == 9).all()
    assert (frame[3:7, :3] == 7).all(), "the shorter camera is centred vertically"
    assert (frame[2, :3] == 255).all() and (frame[7, :3] == 255).all()


def test_compose_frame_pads_odd_sides_to_even_for_h264():
    frame = compose_frame(np.zeros((5, 3, 3), np.uint8), np.zeros((5, 4, 3), np.uint8), np.zeros((2, 7, 3), np.uint8))
    assert frame.shape == (8, 8, 3)
    assert (frame[7] == 255).all() and (frame[:, 7] == 255).all()


def test_compose_frame_refuses_a_title_of_another_width():
    with pytest.raises(ValueError, match=r"9 px wide, camera \+ plots are 8"):
        compose_frame(np.zeros((4, 3, 3), np.uint8), np.zeros((4, 5, 3), np.uint8), np.zeros((2, 9, 3), np.uint8))


def test_episode_title_says_the_outcome_and_shows_requested_labels_and_the_error():
    assert episode_title({**RECORD, "success": True, "steps": 42}) == "reach-v3   seed 100000   SUCCESS in 42 steps"
    title = episode_title({**RECORD, "mode": "left", "error": "IKError: unreachable"}, labels=("mode", "absent"))
    assert title == "reach-v3   seed 100000   FAILURE after 11 steps   mode: left   error: IKError: unreachable"


def test_frames_show_the_camera_and_a_path_that_grows_step_by_step():
    frames, positions = episode()
    video = list(trajectory_frames(frames, positions, replan_steps=[0, 4, 8], record=RECORD))
    assert len(video) == len(frames)
    height = TITLE_HEIGHT_PX + PLOT_HEIGHT_PX
    assert {f.shape for f in video} == {(height, 64 + 2 * PLOT_HEIGHT_PX, 3)}
    top = TITLE_HEIGHT_PX + (PLOT_HEIGHT_PX - 64) // 2
    assert all((f[top : top + 64, :64] == camera).all() for f, camera in zip(video, frames, strict=True))
    plots = [f[TITLE_HEIGHT_PX:, 64:].astype(int) for f in video]
    changed = [np.abs(b - a).sum(-1).astype(bool).sum() for a, b in zip(plots, plots[1:], strict=False)]
    assert min(changed) > 20, "every step moves the current point and extends the path"
    assert (video[0][:TITLE_HEIGHT_PX] != 255).any(), "the title is drawn"


def test_frames_need_one_position_per_camera_frame():
    frames, positions = episode()
    with pytest.raises(ValueError, match=r"\[12, 3\]"):
        next(trajectory_frames(frames, positions[:-1], [], RECORD))


def test_video_file_has_one_frame_per_observation_at_the_composed_size(tmp_path):
    frames, positions = episode(steps=7)
    path = write_trajectory_video(tmp_path / "videos" / "reach_trajectory.mp4", frames, positions, [0, 4], RECORD)
    read = imageio.mimread(path, memtest=False)
    assert len(read) == 8 and read[0].shape == (TITLE_HEIGHT_PX + PLOT_HEIGHT_PX, 64 + 2 * PLOT_HEIGHT_PX, 3)
    assert np.abs(read[-1].astype(int) - read[0].astype(int)).mean() > 1, "the video changes over the episode"


def test_frame_strip_stacks_evenly_spaced_frames_of_a_video(tmp_path):
    frames = [np.full((16, 24, 3), 30 * k, np.uint8) for k in range(7)]
    path = tmp_path / "v.mp4"
    imageio.mimwrite(path, frames, fps=10, codec="libx264", macro_block_size=2)
    strip = frame_strip(path, count=3)
    assert strip.shape == (3 * 16, 24, 3)
    assert [int(round(strip[16 * i : 16 * (i + 1)].mean())) for i in range(3)] == pytest.approx([0, 90, 180], abs=4)
