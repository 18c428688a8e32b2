"""A hostile probe's findings, one test (or more) each: nothing non-finite reaches a robot,
the server bounds what one client can cost, and results never mix two runs.

Export checks are in test_export.py, dataset paths in test_lerobot.py, compare.py in test_compare.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from websockets.sync.server import serve as sync_serve

from drifting_vla.evaluation.results import read_episodes
from drifting_vla.evaluation.rollout import evaluate
from drifting_vla.safety import PROPRIO_LIMIT, NonFiniteActions, PolicyRefusal, ProprioOutOfRange
from drifting_vla.serving import (
    AsyncChunkExecutor,
    ChunkedPolicy,
    ChunkQueue,
    PolicyClient,
    PolicyError,
)
from drifting_vla.serving.client import ServerNonFiniteActions, ServerProprioOutOfRange
from drifting_vla.serving.protocol import pack
from drifting_vla.serving.server import PolicyServer, ServerConfig
from tests.helpers import (
    ROOT,
    TASK,
    Running,
    SlowPolicy,
    observation,
    observation_batch,
    served_policy,
    tiny_cfg,
    tiny_policy,
)

HUGE = 1e20  # the probe's proprio: finite, and an all-NaN chunk before the checks


def nan_policy(**kwargs):
    """The tiny policy with one NaN in its action decoder: every chunk it draws is NaN."""
    policy = served_policy(**kwargs)
    with torch.no_grad():
        next(policy.model.action_decoder.parameters()).view(-1)[0] = float("nan")
    return policy


# ----------------------------------------------------------------------------------------------
# 1. The finite-action guarantee, in process


def test_a_huge_proprio_is_refused_naming_the_row_and_dimension_not_answered_with_nan():
    obs = observation_batch(batch=3)
    obs["proprio"][1, 2] = HUGE
    with pytest.raises(ProprioOutOfRange, match=r"row\(s\) \[1\] .* dimension\(s\) \[2\]") as refused:
        tiny_policy().predict_action_chunk(obs)
    assert refused.value.rows == [1]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -HUGE])
def test_a_proprio_the_normalization_cannot_represent_is_refused(value):
    obs = observation_batch()
    obs["proprio"][0, 0] = value
    with pytest.raises(ProprioOutOfRange):
        tiny_policy().predict_action_chunk(obs)


def test_proprio_within_the_documented_limit_is_served():
    """The rule is on normalized proprio: the tiny normalizer's range is about [-0.5, 0.5]."""
    policy = tiny_policy()
    obs = observation_batch()
    centre, half = policy.normalizer.proprio_offset[0].item(), 1 / policy.normalizer.proprio_scale[0].item()
    obs["proprio"][0, 0] = centre + 0.99 * PROPRIO_LIMIT * half
    assert np.isfinite(policy.predict_action_chunk(obs)).all()
    obs["proprio"][0, 0] = centre + 1.01 * PROPRIO_LIMIT * half
    with pytest.raises(ProprioOutOfRange):
        policy.predict_action_chunk(obs)


def test_every_chunk_is_checked_and_a_non_finite_one_raises_a_named_error():
    with pytest.raises(NonFiniteActions, match=r"non-finite actions for batch row\(s\) \[0, 1\]"):
        nan_policy().predict_action_chunk(observation_batch())
    with pytest.raises(NonFiniteActions):
        nan_policy().predict_action_chunks(observation_batch(), 3)


@pytest.mark.parametrize("execution", ["chunk", "ensemble"])
def test_select_action_names_the_env_rows_and_leaves_the_others_as_they_were(execution):
    policy = tiny_policy(execution=execution, execute_steps=2)
    obs = observation_batch(batch=3)
    policy.select_action(obs, env_ids=[0, 1, 2])  # env 1's queue still holds an action: only 0 and 2 replan
    policy.select_action(obs, env_ids=[0, 1, 2])
    bad = {key: (value.clone() if hasattr(value, "clone") else list(value)) for key, value in obs.items()}
    bad["proprio"][2, 0] = HUGE
    with pytest.raises(ProprioOutOfRange) as refused:
        policy.select_action(bad, env_ids=[0, 1, 2])
    assert refused.value.rows == [2]  # the batch row of select_action, not of the replanning subset
    good = {key: value[:2] for key, value in obs.items()}
    assert np.isfinite(policy.select_action(good, env_ids=[0, 1])).all()


def test_a_policy_with_an_observation_history_acts_as_if_a_refused_step_never_came():
    from drifting_vla.formats.validation import training_config
    from drifting_vla.inference.policy import DriftingPolicy
    from drifting_vla.models import build_model
    from drifting_vla.objectives.methods import build_objective
    from tests.helpers import tiny_normalizer

    def history_policy() -> DriftingPolicy:
        torch.manual_seed(0)
        cfg = tiny_cfg()
        cfg.data.n_obs_steps = 2
        return DriftingPolicy(build_model(cfg), tiny_normalizer(cfg), build_objective(training_config(cfg.training)),
                              execute_steps=1)

    steps = [observation_batch(batch=1) for _ in range(3)]
    for k, step in enumerate(steps):
        step["proprio"][0, 1] = 0.1 * k  # each step its own observation
    bad = {**steps[1], "proprio": steps[1]["proprio"].clone()}
    bad["proprio"][0, 0] = HUGE
    refused, clean = history_policy(), history_policy()
    actions = {}
    for name, policy, sequence in (("refused", refused, [steps[0], bad, steps[1], steps[2]]),
                                   ("clean", clean, [steps[0], steps[1], steps[2]])):
        actions[name] = []
        for obs in sequence:
            torch.manual_seed(1 + len(actions[name]))
            try:
                actions[name].append(policy.select_action(obs))
            except ProprioOutOfRange:
                assert obs is bad
    np.testing.assert_array_equal(np.stack(actions["refused"]), np.stack(actions["clean"]))


# ----------------------------------------------------------------------------------------------
# 1. ... on the robot side: client and executors


def test_chunk_queue_refuses_a_non_finite_chunk():
    queue = ChunkQueue(refill_at=0)
    chunk = np.zeros((4, 4), np.float32)
    chunk[2, 1] = np.nan
    with pytest.raises(NonFiniteActions, match=r"first at index \[2, 1\]"):
        queue.install(chunk, 0)
    assert queue.remaining() == 0


def test_async_executor_refuses_a_non_finite_chunk_instead_of_acting_on_it():
    executor = AsyncChunkExecutor(lambda obs, seed: np.full((4, 4), np.nan, np.float32), horizon=4, refill_at=1)
    try:
        with pytest.raises(NonFiniteActions):
            executor.act(observation())
    finally:
        executor.close()


def test_chunked_policy_refuses_non_finite_chunks_naming_every_row_before_any_env_steps():
    def predict(obs, seed):
        return np.full((4, 4), np.nan if obs["proprio"][0] > 1 else 0.0, np.float32)

    policy = ChunkedPolicy(predict, horizon=4, execute_steps=2)
    batch = {"images": np.zeros((3, 2, 3, 8, 8), np.uint8), "proprio": np.zeros((3, 4), np.float32),
             "instruction": ["x"] * 3}
    batch["proprio"][[0, 2], 0] = 5.0
    with pytest.raises(NonFiniteActions) as refused:
        policy.select_action(batch)
    assert refused.value.rows == [0, 2]
    assert np.isfinite(policy.select_action({key: value[1:2] for key, value in batch.items()}, env_ids=[1])).all()


class NaNServer:
    """A websocket server that speaks the protocol and answers every request with a NaN chunk
    (what a broken or hostile server could send): the client is the last line of defence."""

    def __init__(self, metadata: dict) -> None:
        def handler(connection):
            connection.send(pack(metadata))
            for _ in connection:
                connection.send(pack({"actions": np.full((4, 4), np.nan, np.float32), "timing": {}, "batch_size": 1}))

        self.server = sync_serve(handler, "127.0.0.1", 0)
        self.url = f"ws://127.0.0.1:{self.server.socket.getsockname()[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_the_client_refuses_a_non_finite_chunk_from_the_server():
    server = PolicyServer(served_policy())
    fake = NaNServer(server.metadata)
    try:
        with PolicyClient(fake.url) as client, pytest.raises(NonFiniteActions, match="the server at ws://127.0.0.1"):
            client.predict(observation())
    finally:
        fake.server.shutdown()


# ----------------------------------------------------------------------------------------------
# 1. ... through the server


def test_the_server_answers_a_huge_proprio_with_out_of_range_and_keeps_serving():
    server = Running(served_policy())
    try:
        with PolicyClient(server.url) as client:
            bad = {**observation(), "proprio": np.array([HUGE, 0, 0, 0], np.float32)}
            with pytest.raises(ServerProprioOutOfRange, match="out_of_range: proprio of batch row") as refused:
                client.predict(bad)
            assert refused.value.kind == "out_of_range" and isinstance(refused.value, PolicyError)
            assert np.isfinite(client.predict(observation())).all()
    finally:
        server.stop()


def test_a_refused_request_does_not_take_its_batch_mates_down():
    server = Running(SlowPolicy(served_policy(), seconds=0.05), max_wait_ms=200)
    clients = [PolicyClient(server.url) for _ in range(4)]
    try:
        bad = {**observation(), "proprio": np.array([HUGE, 0, 0, 0], np.float32)}
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(c.predict, bad if i == 1 else observation()) for i, c in enumerate(clients)]
            outcomes = [f.exception(timeout=30) or f.result() for f in futures]
        assert isinstance(outcomes[1], ServerProprioOutOfRange)
        assert all(isinstance(o, np.ndarray) and np.isfinite(o).all() for i, o in enumerate(outcomes) if i != 1)
    finally:
        for client in clients:
            client.close()
        server.stop()


def test_the_server_answers_non_finite_chunks_with_their_kind_and_sends_no_nan():
    class Broken(SlowPolicy):
        def predict_action_chunk(self, obs, generator=None):  # not a DriftingPolicy: no check of its own
            chunks = self.policy.predict_action_chunk(obs, generator=generator)
            chunks[torch.as_tensor(obs["proprio"])[:, 0].numpy() == 0.5] = np.nan
            return chunks

    server = Running(Broken(served_policy()))
    try:
        with PolicyClient(server.url) as client:
            with pytest.raises(ServerNonFiniteActions, match="non_finite"):
                client.predict({**observation(), "proprio": np.array([0.5, 0, 0, 0], np.float32)})
            assert np.isfinite(client.predict(observation())).all()
    finally:
        server.stop()


def test_a_server_refuses_to_serve_weights_that_give_non_finite_actions():
    server = PolicyServer(nan_policy(), ServerConfig(port=0))
    ready = []
    with pytest.raises(NonFiniteActions):
        asyncio.run(server.serve(ready.append))
    assert not ready  # the port never opened


# ----------------------------------------------------------------------------------------------
# 1. ... in an evaluation: errors, not failures, and no NaN reaches the simulator


def test_an_evaluation_records_refused_episodes_as_errors_and_runs_the_others(tmp_path):
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "sensor_fault"
    summary = evaluate(tiny_policy(execution="chunk", execute_steps=2), data, tasks=[TASK], seeds=[0, 1, 2, 3],
                       num_workers=2, output_dir=tmp_path, videos_per_task=0, max_episode_steps=5, progress=False)
    by_seed = {r.seed: r for r in summary.records}
    for seed in (1, 3):
        assert by_seed[seed].error.startswith("ProprioOutOfRange: proprio of batch row")
    for seed in (0, 2):
        assert by_seed[seed].error is None and by_seed[seed].steps == 5
    assert summary.to_dict()["errors"] == 2
    assert not any("reached the simulator" in (r["error"] or "") for r in read_episodes(tmp_path))


def test_a_remote_evaluation_records_refused_episodes_as_errors(tmp_path):
    server = Running(served_policy())
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "sensor_fault"
    try:
        with PolicyClient(server.url) as client:
            remote = ChunkedPolicy(client.predict, client.metadata["horizon"], 2)
            summary = evaluate(remote, data, tasks=[TASK], seeds=[0, 1], num_workers=2, output_dir=tmp_path,
                               videos_per_task=0, max_episode_steps=5, progress=False)
    finally:
        server.stop()
    by_seed = {r.seed: r for r in summary.records}
    assert by_seed[0].error is None and by_seed[0].steps == 5
    assert "out_of_range" in by_seed[1].error and "ProprioOutOfRange" in by_seed[1].error


def test_refusals_are_policy_refusals_for_callers_that_catch_one_kind():
    assert issubclass(ServerProprioOutOfRange, PolicyRefusal) and issubclass(ServerNonFiniteActions, PolicyRefusal)


# ----------------------------------------------------------------------------------------------
# 4. A server that bounds what one client can cost


def test_the_instruction_cache_keeps_only_the_most_recently_used_and_encodes_the_same():
    from drifting_vla.models.language_encoder import build_language_encoder

    encoder = build_language_encoder({"name": "minilm"}, True, None)
    encoder.cache_size = 3
    texts = [f"open drawer number {i}" for i in range(8)]
    first = [encoder([t])[2] for t in texts]
    assert list(encoder._cache) == texts[-3:]
    encoder([texts[5]])  # used again: now the most recent
    encoder(["another one"])
    assert list(encoder._cache) == [texts[7], texts[5], "another one"]
    np.testing.assert_allclose(encoder([texts[0]])[2], first[0], atol=1e-6)  # evicted, then encoded again alike
    batch = encoder(texts)  # more distinct instructions in one batch than the cache holds
    np.testing.assert_allclose(batch[2], torch.cat(first), atol=1e-6)
    assert len(encoder._cache) == 3


def test_a_long_instruction_is_answered_too_large_before_it_reaches_the_model():
    policy = SlowPolicy(served_policy())
    server = Running(policy, max_instruction_chars=100)
    try:
        with PolicyClient(server.url) as client:
            assert client.metadata["max_instruction_chars"] == 100
            calls = len(policy.batch_sizes)
            with pytest.raises(PolicyError, match=r"too_large: the instruction has 6,291,456 characters; .* at most 100"):
                client.predict({**observation(), "instruction": "x" * 6 * 2**20})
            assert len(policy.batch_sizes) == calls
            assert client.predict(observation()).shape == (4, 4)
    finally:
        server.stop()


def test_an_image_past_the_pixel_limit_is_answered_too_large():
    server = Running(served_policy(), max_image_pixels=64 * 64)
    try:
        with PolicyClient(server.url) as client:
            with pytest.raises(PolicyError, match=r"too_large: the images are 65 x 64 = 4,160 pixels each"):
                client.predict({**observation(), "images": np.zeros((2, 3, 65, 64), np.uint8)})
            assert client.predict(observation(size=64)).shape == (4, 4)
    finally:
        server.stop()


def test_frames_are_decoded_and_resized_off_the_event_loop(monkeypatch):
    import drifting_vla.serving.server as server_module

    threads = []
    resize = server_module._resized

    def recording(images, size):
        threads.append(threading.current_thread().name)
        return resize(images, size)

    monkeypatch.setattr(server_module, "_resized", recording)
    server = Running(served_policy())
    try:
        with PolicyClient(server.url) as client:
            client.predict(observation(size=48))
    finally:
        server.stop()
    assert threads and all(name.startswith("decode") for name in threads), threads


class SlowWarmUp(SlowPolicy):
    """Its first forward pass (the warm-up) takes `seconds`, the others none."""

    def predict_action_chunk(self, obs, generator=None):
        if not self.batch_sizes:
            time.sleep(self.seconds)
        self.batch_sizes.append(len(obs["instruction"]))
        return self.policy.predict_action_chunk(obs, generator=generator)


@pytest.mark.parametrize("when", ["before serve", "during warm-up"])
def test_stop_at_any_point_of_start_up_ends_serve_cleanly_without_opening_the_port(when):
    server = PolicyServer(SlowWarmUp(served_policy(), seconds=1.0), ServerConfig(port=0))
    if when == "before serve":
        server.stop()
    else:
        threading.Timer(0.3, server.stop).start()
    ready = []
    started = time.perf_counter()
    asyncio.run(server.serve(ready.append))
    assert not ready and server.port is None
    assert time.perf_counter() - started < 30


def test_a_port_in_use_is_an_error_naming_host_and_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot listen on host='127.0.0.1' port={port}"):
            asyncio.run(PolicyServer(served_policy(), ServerConfig(port=port)).serve())


def run_serve_script(*overrides, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), *overrides], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("override, message", [
    ("host=no-such-host.invalid", "config key host='no-such-host.invalid' does not resolve"),
    ("host=192.0.2.1", "config key host='192.0.2.1': this machine cannot listen there"),
    ("device=cuda", "config key device='cuda', but this machine has no CUDA device"),
    ("device=tpu", "config key device='tpu'"),
])
def test_serve_start_up_errors_name_the_key_before_the_model_loads(override, message, tmp_path):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_serve_script(f"checkpoint={tmp_path / 'no_checkpoint_here'}", override)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "no whole checkpoint" not in result.stderr and "Traceback" not in result.stderr  # no model was looked for


def test_serve_with_its_port_in_use_names_the_port_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve_script(f"checkpoint={tmp_path / 'no_checkpoint_here'}", f"port={port}")
    assert result.returncode != 0 and f"config key port={port}: 127.0.0.1:{port} is in use" in result.stderr, result.stderr[-2000:]


def test_sigterm_while_serve_loads_the_model_ends_it_cleanly(tmp_path):
    (tmp_path / "slow_plugin.py").write_text("import sys, time\nprint('plugin loading', flush=True)\ntime.sleep(60)\n")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), f"checkpoint={tmp_path}", "port=0", "plugins=[slow_plugin]"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])},
    )
    for line in process.stdout:
        if "plugin loading" in line:
            break
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=30)[0]
    assert process.returncode == 0 and "stopped by SIGTERM during start-up" in output, output
    assert "Traceback" not in output


# ----------------------------------------------------------------------------------------------
# 5. Results that never mix two runs


def test_an_evaluation_into_a_used_folder_leaves_none_of_the_previous_runs_files(tmp_path):
    """Found by a hostile probe: a reused output folder kept the previous run's videos beside the new summary."""
    data = OmegaConf.to_container(tiny_cfg().data)
    data["name"] = "scripted"
    policy = tiny_policy(execution="chunk", execute_steps=2)
    evaluate(policy, data, tasks=[TASK], seeds=[0, 4], num_workers=1, output_dir=tmp_path, videos_per_task=2,
             max_episode_steps=6, progress=False)
    assert (tmp_path / "videos" / f"{TASK}_seed4.mp4").is_file()
    (tmp_path / "notes.txt").write_text("a person's file")
    evaluate(policy, data, tasks=[TASK], seeds=[8], num_workers=1, output_dir=tmp_path, videos_per_task=1,
             max_episode_steps=6, progress=False)
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == [f"{TASK}_seed8.mp4", f"{TASK}_seed8_trajectory.mp4"]
    assert [r["seed"] for r in read_episodes(tmp_path)] == [8]
    assert (tmp_path / "notes.txt").is_file()  # only what an evaluation writes is cleared


# ----------------------------------------------------------------------------------------------
# 6. data.image_size up to its bound renders in MuJoCo


def test_an_image_size_past_metaworlds_framebuffer_renders_instead_of_failing_unnamed():
    """Found by a hostile probe: data.image_size above 480 failed in MuJoCo's framebuffer, naming no key; the
    schema now bounds it (config.MAX_IMAGE_SIZE) and the env's framebuffer fits any size it allows."""
    pytest.importorskip("metaworld")
    from drifting_vla.envs.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv("reach-v3", image_size=512, video_size=64)
    try:
        assert env.reset(seed=0)["images"].shape[-2:] == (512, 512)
    finally:
        env.close()
