"""Serving: the wire protocol, the policy server, the client and asynchronous chunk execution."""

import json
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest
import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from drifting_vla.evaluation.results import read_episodes
from drifting_vla.evaluation.rollout import evaluate
from drifting_vla.formats.checkpoint import seal_checkpoint
from drifting_vla.serving import (
    AsyncChunkExecutor,
    ChunkedPolicy,
    ChunkQueue,
    PolicyClient,
    PolicyError,
    ProtocolError,
    ServerBusy,
)
from drifting_vla.serving.protocol import check_observation, pack, unpack
from drifting_vla.serving.server import predict_chunks
from tests.helpers import (
    INSTRUCTION,
    ROOT,
    CountingGenerator,
    Running,
    SlowPolicy,
    env_batch,
    observation,
    served_policy,
    tiny_policy,
)


@pytest.fixture
def running():
    servers = []

    def start(policy=None, **config):
        servers.append(Running(policy or served_policy(), **config))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()




# ----------------------------------------------------------------------------------------------
# Protocol


def test_arrays_round_trip_through_msgpack_bit_for_bit():
    message = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.uint8), "s": "x", "n": 3}
    out = unpack(pack(message))
    np.testing.assert_array_equal(out["a"], message["a"])
    assert out["a"].dtype == np.float32 and out["b"].dtype == np.uint8 and out["s"] == "x" and out["n"] == 3


@pytest.mark.parametrize("frame", [b"\xc1garbage", b"\x93\x01\x02\x03", "a text frame"])
def test_frames_that_are_not_a_msgpack_map_are_protocol_errors(frame):
    with pytest.raises(ProtocolError):
        unpack(frame)


def test_object_arrays_are_refused_on_both_sides():
    with pytest.raises(TypeError, match="object arrays"):
        pack({"a": np.array([object()])})
    forged = msgpack.packb({"a": {"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}})
    with pytest.raises(ProtocolError, match="object arrays"):
        unpack(forged)


def test_an_observation_may_come_channels_first_channels_last_or_by_camera_name():
    meta = {"cameras": ["corner", "topview"], "proprio_dim": 4}
    first = observation()
    last = observation(channels_last=True)
    named = {**first, "images": {"topview": last["images"][1], "corner": last["images"][0]}}
    for obs in (first, last, named):
        np.testing.assert_array_equal(check_observation(obs, meta)["images"], first["images"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"images": None}, "no 'images'"),
        ({"images": np.zeros((3, 3, 32, 32), np.uint8)}, "V=2"),
        ({"images": np.zeros((2, 3, 32, 32), np.float32)}, "uint8"),
        ({"images": np.zeros((2, 5, 32, 32), np.uint8)}, r"\[3, H, W\] or \[H, W, 3\]"),
        ({"images": {"corner": np.zeros((32, 32, 3), np.uint8), "wrist": np.zeros((32, 32, 3), np.uint8)}}, "unknown camera"),
        ({"images": {"corner": np.zeros((32, 32, 3), np.uint8)}}, "missing camera"),
        ({"proprio": np.zeros(5, np.float32)}, r"proprio must have shape \[4\]"),
        ({"proprio": np.array([np.nan, 0, 0, 0], np.float32)}, "NaN"),
        ({"instruction": 3}, "instruction must be a string"),
        ({"seed": -1}, "seed must be"),
    ],
)
def test_a_bad_observation_is_an_error_naming_the_problem(change, message):
    obs = {**observation(), **change}
    obs = {k: v for k, v in obs.items() if v is not None}
    with pytest.raises(ProtocolError, match=message):
        check_observation(obs, {"cameras": ["corner", "topview"], "proprio_dim": 4})


# ----------------------------------------------------------------------------------------------
# Chunk execution


def test_chunk_queue_drops_the_actions_whose_time_passed_during_inference():
    queue = ChunkQueue(refill_at=4)
    chunk_a, chunk_b = np.arange(8.0)[:, None], 100 + np.arange(8.0)[:, None]
    assert queue.needs_chunk()
    queue.install(chunk_a, obs_step=0)
    executed = [queue.pop()[0] for _ in range(4)]
    assert queue.needs_chunk() and queue.remaining() == 4  # request B with the observation of step 4
    executed += [queue.pop()[0] for _ in range(2)]  # B is computed during steps 4 and 5
    assert queue.install(chunk_b, obs_step=4) == 2  # b0, b1 were due at steps 4, 5: dropped
    executed += [queue.pop()[0] for _ in range(6)]
    assert executed == [0, 1, 2, 3, 4, 5, 102, 103, 104, 105, 106, 107]
    with pytest.raises(RuntimeError, match="no action left"):
        queue.pop()


class GatedPredict:
    """predict(obs, seed) that returns chunk c (values c*100 + step) only when released."""

    def __init__(self, horizon: int = 8) -> None:
        self.horizon, self.calls, self.gates = horizon, 0, []

    def __call__(self, obs, seed):
        gate = threading.Event()
        self.gates.append(gate)
        calls, self.calls = self.calls, self.calls + 1
        assert gate.wait(10)
        return (calls * 100 + np.arange(self.horizon, dtype=np.float32))[:, None]


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.perf_counter() + timeout_s
    while not condition():
        assert time.perf_counter() < deadline, "timed out"
        time.sleep(0.001)


def test_async_executor_acts_while_the_next_chunk_is_computed_and_compensates_latency():
    predict = GatedPredict(horizon=8)
    executor = AsyncChunkExecutor(predict, horizon=8, refill_at=4)
    def release_the_first_chunk_late():  # once it is asked for: on a loaded machine that can take a while
        wait_until(lambda: predict.gates)
        time.sleep(0.05)
        predict.gates[0].set()

    threading.Thread(target=release_the_first_chunk_late, daemon=True).start()
    executed = [executor.act({"t": 0})[0]]  # waits for the first chunk: a starved step
    executed += [executor.act({"t": t})[0] for t in range(1, 7)]  # the request at step 4 stays in flight
    wait_until(lambda: len(predict.gates) == 2)
    assert executor.starved_steps == 1
    predict.gates[1].set()
    wait_until(lambda: executor._request[0].done())
    executed += [executor.act({"t": t})[0] for t in range(7, 10)]
    assert executed == [0, 1, 2, 3, 4, 5, 6, 103, 104, 105]  # b0..b2 were due at steps 4..6
    assert executor.dropped == 3 and executor.chunks == 2
    for gate in predict.gates:
        gate.set()
    executor.close()


def test_async_executor_asks_again_when_the_server_is_busy():
    answers = iter([ServerBusy("busy", "queue full"), np.zeros((4, 1), np.float32)])

    def predict(obs, seed):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    executor = AsyncChunkExecutor(predict, horizon=4, refill_at=1)
    assert executor.act({}) == 0 and executor.chunks == 1
    executor.close()


def test_chunked_policy_executes_like_the_in_process_chunk_queue():
    in_process = tiny_policy(horizon=8, execution="chunk", execute_steps=3)
    in_process.predict_action_chunk = CountingGenerator(8)
    counting = CountingGenerator(8)

    def predict(obs, seed):  # one observation per call, as through a server
        return counting({k: [v] if k == "instruction" else np.asarray(v)[None] for k, v in obs.items()})[0]

    chunked = ChunkedPolicy(predict, horizon=8, execute_steps=3)
    for policy in (in_process, chunked):
        policy.reset()
    a = [in_process.select_action(env_batch([0, 1])) for _ in range(7)]
    b = [chunked.select_action(env_batch([0, 1])) for _ in range(7)]
    np.testing.assert_array_equal(np.stack(a)[..., 0] % 100, np.stack(b)[..., 0] % 100)


def test_chunked_policy_seeds_differ_per_env_episode_and_chunk_and_repeat_across_runs():
    def record_seeds():
        seeds = []
        policy = ChunkedPolicy(lambda obs, seed: seeds.append(seed) or np.zeros((4, 4)), horizon=4, execute_steps=2, seed=7)
        for _ in range(2):
            policy.reset()
            for _ in range(3):
                policy.select_action(env_batch([0, 1]))
        return seeds

    seeds = record_seeds()
    assert len(seeds) == 8 and len(set(seeds)) == 8 and seeds == record_seeds()


# ----------------------------------------------------------------------------------------------
# The server


def test_the_metadata_arrives_on_connect(running):
    with PolicyClient(running().url) as client:
        meta = client.metadata
    assert meta["cameras"] == ["corner", "topview"] and meta["image_size"] == 32 and meta["proprio_dim"] == 4
    assert meta["horizon"] == 4 and meta["action_dim"] == 4 and meta["control_hz"] == 80
    assert meta["objective"] == "drifting" and meta["nfe"] == 1 and meta["method"] == "drifting nfe=1" and meta["instructions"] == [INSTRUCTION]
    assert [c["name"] for c in meta["action_spec"]["components"]] == ["delta_position", "gripper_effort"]


def test_a_seeded_request_gets_exactly_the_in_process_chunk(running):
    policy = served_policy()
    server = running(policy)
    obs = observation()
    with PolicyClient(server.url) as client:
        chunk = client.predict(obs, seed=11)
        timing = client.last_timing
        again = client.predict(obs, seed=11)
        other = client.predict(obs, seed=12)
    expected = policy.predict_action_chunk(
        {"images": torch.from_numpy(obs["images"])[None], "proprio": torch.from_numpy(obs["proprio"])[None],
         "instruction": [INSTRUCTION]},
        generator=torch.Generator().manual_seed(11),
    )[0]
    assert chunk.shape == (4, 4) and chunk.dtype == np.float32
    np.testing.assert_array_equal(chunk, expected)
    np.testing.assert_array_equal(again, expected)
    assert not np.array_equal(other, expected)
    assert set(timing) == {"decode_ms", "queue_ms", "model_ms", "encode_ms"}


def test_images_channels_last_or_of_another_size_are_accepted(running):
    server = running()
    with PolicyClient(server.url) as client:
        first = client.predict(observation(), seed=1)
        last = client.predict(observation(channels_last=True), seed=1)
        big = client.predict(observation(size=64), seed=1)
    np.testing.assert_array_equal(first, last)
    assert big.shape == (4, 4) and np.isfinite(big).all()


def test_resizing_is_the_training_resize():
    from drifting_vla.data.transforms import resize_image

    big = observation(size=64)
    small = {**big, "images": np.stack([resize_image(f.transpose(1, 2, 0), 32).transpose(2, 0, 1) for f in big["images"]])}
    policy = served_policy()
    server = Running(policy)
    try:
        with PolicyClient(server.url) as client:
            np.testing.assert_array_equal(client.predict(big, seed=3), predict_chunks(policy, [small], 3)[0])
    finally:
        server.stop()


def test_bad_requests_get_an_error_reply_and_the_server_keeps_serving(running):
    server = running()
    bad_frames = [
        b"\x00\xffgarbage",
        "text, not msgpack",
        pack({"images": observation()["images"], "proprio": np.zeros(4, np.float32)}),  # no instruction
        pack({**observation(), "images": np.zeros((2, 3, 32, 32), np.float32)}),
        pack({**observation(), "images": {"wrist": np.zeros((32, 32, 3), np.uint8)}}),
        pack({**observation(), "instruction": "make coffee"}),
        pack({**observation(), "images": np.zeros((2, 3, 0, 0), np.uint8)}),  # nothing to resize
    ]
    with connect(server.url) as raw, PolicyClient(server.url) as bystander:
        unpack(raw.recv(timeout=10))  # metadata
        replies = []
        for frame in bad_frames:
            raw.send(frame)
            replies.append(unpack(raw.recv(timeout=10)))
            assert bystander.predict(observation()).shape == (4, 4)
        raw.send(pack({**observation(), "id": 5}))
        good = unpack(raw.recv(timeout=10))
    assert all(r["error"] == "bad_request" for r in replies), replies
    messages = [r["message"] for r in replies]
    assert "not msgpack" in messages[0] and "binary" in messages[1] and "'instruction'" in messages[2]
    assert "uint8" in messages[3] and "unknown camera" in messages[4] and "unknown instruction" in messages[5]
    assert "images[0] has no pixels (shape [3, 0, 0])" in messages[6]
    assert good["actions"].shape == (4, 4) and good["id"] == 5


def test_a_model_failure_is_an_internal_error_and_the_server_goes_on(running):
    server = running(SlowPolicy(served_policy()))
    with PolicyClient(server.url) as client:
        with pytest.raises(PolicyError, match="internal: RuntimeError: the model broke"):
            client.predict({**observation(), "proprio": np.array([99, 0, 0, 0], np.float32)})
        assert client.predict(observation()).shape == (4, 4)


def test_concurrent_clients_share_one_forward_pass(running):
    policy = SlowPolicy(served_policy(), seconds=0.05)
    server = running(policy, max_wait_ms=50, max_batch=8)
    clients = [PolicyClient(server.url) for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        chunks = list(pool.map(lambda c: c.predict(observation()), clients))
    for client in clients:
        client.close()
    assert all(chunk.shape == (4, 4) for chunk in chunks)
    assert max(policy.batch_sizes[1:]) > 1 and sum(policy.batch_sizes[1:]) == 6  # [0] is the warm-up


def test_past_the_queue_bound_the_server_answers_busy_at_once(running):
    server = running(SlowPolicy(served_policy(), seconds=0.5), max_queue=1, max_batch=1, max_wait_ms=0)
    clients = [PolicyClient(server.url) for _ in range(4)]

    def ask(client):
        started = time.perf_counter()
        try:
            client.predict(observation())
            return "chunk", time.perf_counter() - started
        except ServerBusy:
            return "busy", time.perf_counter() - started

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(ask, clients))
    for client in clients:
        client.close()
    busy = [seconds for kind, seconds in outcomes if kind == "busy"]
    assert busy and max(busy) < 0.4, outcomes  # answered before even one forward pass ends
    assert sum(kind == "chunk" for kind, _ in outcomes) >= 2  # the one running and the one queued


def test_a_token_is_required_when_the_server_has_one(running):
    server = running(token="s3cret")
    with pytest.raises(InvalidStatus, match="401"):
        PolicyClient(server.url)
    with pytest.raises(InvalidStatus, match="401"):
        PolicyClient(server.url, token="wrong")
    with PolicyClient(server.url, token="s3cret") as client:
        assert client.predict(observation()).shape == (4, 4)


def test_stop_answers_the_queued_requests_before_closing(running):
    server = running(SlowPolicy(served_policy(), seconds=0.3))
    clients = [PolicyClient(server.url) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(c.predict, observation()) for c in clients]
        time.sleep(0.1)
        server.server.stop()
        chunks = [f.result(timeout=10) for f in futures]
    assert all(chunk.shape == (4, 4) for chunk in chunks)
    server.thread.join(10)
    assert not server.thread.is_alive()


# ----------------------------------------------------------------------------------------------
# scripts/serve.py and a closed-loop evaluation through it


def start_serve_script(*overrides) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), "port=0", "num_threads=1", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )
    deadline = time.time() + 120
    for line in process.stdout:
        if line.startswith("ready: "):
            return process, line.split()[1]
        if time.time() > deadline:
            break
    process.kill()
    raise AssertionError(f"serve.py did not become ready: {process.stdout.read()}")


def drift_checkpoint(checkpoint):  # noqa: F811
    """The test checkpoint, evaluated on the registered test env `drift` (success depends on actions)."""
    path = checkpoint[0]
    saved = json.loads((path / "config.json").read_text())
    saved["config"]["data"].update(name="drift", max_episode_steps=12)
    (path / "config.json").write_text(json.dumps(saved))
    seal_checkpoint(path)
    return path


def test_remote_evaluation_reaches_the_in_process_success_episode_for_episode(checkpoint):  # noqa: F811
    path = drift_checkpoint(checkpoint)
    process, url = start_serve_script(f"checkpoint={path}")
    try:
        from drifting_vla.inference.policy import DriftingPolicy

        local = DriftingPolicy.from_checkpoint(path)
        data = local.cfg["data"]
        seeds = list(range(12))
        in_process = ChunkedPolicy(lambda obs, s: predict_chunks(local, [obs], s)[0], local.horizon, 2, seed=3)
        with PolicyClient(url) as client:
            remote = ChunkedPolicy(client.predict, client.metadata["horizon"], 2, seed=3)
            results = [
                evaluate(policy, data, tasks=["drift"], seeds=seeds, num_workers=2, progress=False)
                for policy in (in_process, remote)
            ]
        records = [[(r.seed, r.success, r.steps) for r in sorted(s.records, key=lambda r: r.seed)] for s in results]
        assert records[0] == records[1]
        assert 0 < results[0].success_rate < 1, records[0]  # the actions decide: a mix of outcomes
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0 and "drained" in output, output


def test_simulate_eval_through_the_server_prints_the_in_process_success(checkpoint, tmp_path):  # noqa: F811
    path = drift_checkpoint(checkpoint)
    process, url = start_serve_script(f"checkpoint={path}")
    try:
        summaries = []
        for name, source in (("local", f"checkpoint={path}"), ("remote", f"remote={url}")):
            out = tmp_path / name
            result = subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "simulate_eval.py"), source, "seed=5", "episodes=6",
                 "execute_steps=2", "workers=1", "videos_per_task=0", "progress=false", "num_threads=1", "plugins=[tests.fake_envs]",
                 f"output={out}", f"hydra.run.dir={tmp_path / 'hydra'}", *([f"checkpoint={path}"] if name == "remote" else [])],
                capture_output=True, text=True, timeout=300, cwd=ROOT,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            episodes = read_episodes(out)
            summaries.append((json.loads((out / "summary.json").read_text()), [(e["seed"], e["success"], e["steps"]) for e in episodes]))
        (local, local_episodes), (remote, remote_episodes) = summaries
        assert local["success_rate"] == remote["success_rate"] and local["episodes"] == remote["episodes"] == 6
        assert local_episodes == remote_episodes
        assert "remote_token" not in remote["eval"]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert process.returncode == 0


def test_serve_script_drains_and_exits_on_sigterm(checkpoint):  # noqa: F811
    process, url = start_serve_script(f"checkpoint={checkpoint[0]}")
    with PolicyClient(url) as client:
        assert client.predict(observation()).shape == (4, 4)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0]
    assert process.returncode == 0 and "drained: 1 requests served" in output, output


@pytest.mark.slow
def test_remote_metaworld_evaluation_reaches_the_in_process_success(checkpoint):  # noqa: F811
    """The same on the real simulator (Meta-World reach-v3, 32x32 cameras, 10 steps)."""
    path = checkpoint[0]
    process, url = start_serve_script(f"checkpoint={path}")
    try:
        from drifting_vla.inference.policy import DriftingPolicy

        local = DriftingPolicy.from_checkpoint(path)
        in_process = ChunkedPolicy(lambda obs, s: predict_chunks(local, [obs], s)[0], local.horizon, 2, seed=1)
        with PolicyClient(url) as client:
            remote = ChunkedPolicy(client.predict, client.metadata["horizon"], 2, seed=1)
            results = [
                evaluate(policy, local.cfg["data"], episodes=2, num_workers=2, max_episode_steps=10, progress=False)
                for policy in (in_process, remote)
            ]
        records = [[(r.seed, r.success, r.steps, r.error) for r in sorted(s.records, key=lambda r: r.seed)] for s in results]
        assert records[0] == records[1] and all(r[3] is None for r in records[0])
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
