"""Download PerAct's RLBench 18-task data (`hqfang/RLBench-18-Tasks` on the Hugging Face hub).

One zip per task and split, `data/<split>/<task>.zip`, unpacked to `<output>/<split>/<task>/`.
`huggingface_hub` resumes interrupted downloads and shows a progress bar; a task whose
`<output>/<split>/<task>/.complete` marker exists is skipped; every zip is checked (CRCs) before
it is unpacked, and a corrupt one is deleted so the next run fetches it again.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import zipfile

from drifting_vla.data.rlbench_dataset import RLBENCH_TASKS, check_rlbench_tasks

REPO_ID = "hqfang/RLBench-18-Tasks"
SPLITS = ("train", "val", "test")


class DownloadError(RuntimeError):
    pass


def check_request(tasks: list[str], split: str) -> None:
    """Fail before any network call on a wrong task or split name, or when the hub is off."""
    check_rlbench_tasks(tasks)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise DownloadError(
            "HF_HUB_OFFLINE is set: cannot download RLBench data. Unset it on a machine with "
            f"internet access, or copy already-downloaded data there (tasks: {list(RLBENCH_TASKS)})"
        )


def download_rlbench(
    tasks: list[str],
    split: str,
    output: str | pathlib.Path,
    repo_id: str = REPO_ID,
) -> list[pathlib.Path]:
    """Download, verify and unpack each task; return the task folders."""
    check_request(tasks, split)
    from huggingface_hub import hf_hub_download

    split_dir = pathlib.Path(output).expanduser() / split
    zips = pathlib.Path(output).expanduser() / ".zips"
    done = []
    for task in tasks:
        if (split_dir / task / ".complete").is_file():
            print(f"{task}: already complete in {split_dir / task}")
            done.append(split_dir / task)
            continue
        try:
            zip_path = hf_hub_download(
                repo_id, f"data/{split}/{task}.zip", repo_type="dataset", local_dir=zips
            )
        except Exception as e:  # network, auth or missing file: say which task and how to retry
            raise DownloadError(
                f"downloading {task} ({split}) from {repo_id} failed: {type(e).__name__}: {e}. "
                "Re-run the same command to resume."
            ) from e
        done.append(unpack_task_zip(pathlib.Path(zip_path), task, split_dir))
    return done


def unpack_task_zip(zip_path: pathlib.Path, task: str, split_dir: pathlib.Path) -> pathlib.Path:
    """Verify a task zip, unpack it to `split_dir/<task>/`, mark it complete; return that folder.

    The zip may hold `<task>/...` at any depth (or `all_variations/...` at its top): the folder
    that contains `all_variations` is moved into place.
    """
    split_dir = pathlib.Path(split_dir)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise zipfile.BadZipFile(f"CRC mismatch in member {bad}")
            staging = split_dir / f".{task}.unpacking"
            shutil.rmtree(staging, ignore_errors=True)
            zf.extractall(staging)
    except zipfile.BadZipFile as e:
        zip_path.unlink(missing_ok=True)
        raise DownloadError(f"{zip_path} is corrupt ({e}); deleted it, re-run to download it again") from e
    found = sorted(p.parent for p in staging.rglob("all_variations") if p.is_dir())
    if not found:
        shutil.rmtree(staging, ignore_errors=True)
        raise DownloadError(f"{zip_path} holds no `all_variations` folder: not a PerAct-format task zip")
    target = split_dir / task
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(found[0]), str(target))
    shutil.rmtree(staging, ignore_errors=True)
    episodes = len(list((target / "all_variations" / "episodes").glob("episode*")))
    (target / ".complete").write_text(f"{episodes} episodes from {zip_path.name}\n")
    print(f"{task}: {episodes} episodes -> {target}")
    return target
