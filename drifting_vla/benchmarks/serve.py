"""Serve case: the policy server under load on loopback (`scripts/serve.py` in a subprocess).

A checkpoint of the embedded default (dit_s, random weights: speed does not depend on them, two
64x64 cameras) is served with one model thread; 1, 4 and 16 clients (threads of this process, one
`PolicyClient` each) send observations back to back. Rows: per-request latency p50 (p99 and
chunks/s in the notes), each against the same model called in-process at batch 1 (no network)
measured in the same run; `server_p50_ms` is the server's own share (decode, queue, model,
encode). First, on the fresh server, memory: its resident set after 100
requests, after 10,000 and after 20,000 (no growth means nothing is kept per request).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from drifting_vla.benchmarks.inputs import compose_config
from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.data.normalization import Normalizer, compute_stats
from drifting_vla.formats.validation import training_config
from drifting_vla.inference.card import export_description
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.models import build_model
from drifting_vla.objectives import build_objective
from drifting_vla.serving import PolicyClient
from drifting_vla.serving.server import predict_chunks
from drifting_vla.specs import ActionSpec
from drifting_vla.training.checkpoint import gather_training_state, save_checkpoint
from drifting_vla.training.ema import EMA

CLIENTS = (1, 4, 16)
REQUESTS_PER_CLIENT = 200  # after 10 warm-up requests each
MEMORY_REQUESTS = (100, 10_000, 20_000)


def run(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _random_checkpoint(Path(tmp), args.device)
        policy = DriftingPolicy.from_checkpoint(checkpoint, device=args.device)
        obs = _observation(policy.cfg["data"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        base = "in-process predict_action_chunk, batch 1"
        rows = [Row("serve", base, time_call(lambda: predict_chunks(policy, [obs], None)), extra={"threads": 1})]
        torch.set_num_threads(threads)
        process, url = _start_server(checkpoint, args.device)
        try:
            rows.append(_memory_row(url, obs, process.pid))  # first: a fresh server's request count
            for clients in CLIENTS:
                latencies, seconds, server_ms = _load(url, obs, clients, REQUESTS_PER_CLIENT)
                rows.append(Row("serve", f"websocket, {clients} concurrent client(s): p50 latency",
                                statistics.median(latencies), base, {
                                    "p99_ms": f"{1e3 * float(np.percentile(latencies, 99)):.2f}",
                                    "chunks_per_s": f"{len(latencies) / seconds:.0f}",
                                    "server_p50_ms": f"{statistics.median(server_ms):.2f}",
                                }))
        finally:
            process.terminate()
            process.communicate(timeout=60)
    return rows


def _random_checkpoint(root: Path, device: str) -> Path:
    """The embedded default's architecture, random weights, saved as training would."""
    cfg = compose_config(["device=" + device])
    torch.manual_seed(0)
    model = build_model(cfg)
    spec = ActionSpec.from_config(cfg.data.action_spec)
    rng = np.random.default_rng(0)
    stats = compute_stats({"actions": rng.uniform(-1, 1, (64, spec.dim)),
                           "proprio": rng.uniform(-1, 1, (64, int(cfg.data.proprio_dim)))})
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    return save_checkpoint(
        root / "checkpoints",
        step=0,
        state=gather_training_state(model, EMA(model), optimizer),
        **export_description(OmegaConf.to_container(cfg, resolve=True), build_objective(training_config(cfg.training)),
                             str(root / "checkpoints" / "step_00000000")),
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        config=OmegaConf.to_container(cfg, resolve=True),
        normalization=Normalizer.from_stats(stats, spec, proprio_dim=int(cfg.data.proprio_dim)).to_dict(),
    )


def _observation(data: dict) -> dict:
    size = int(data["image_size"])
    rng = np.random.default_rng(0)
    return {
        "images": rng.integers(0, 256, (len(data["cameras"]), 3, size, size), dtype=np.uint8),
        "proprio": rng.uniform(-1, 1, int(data["proprio_dim"])).astype(np.float32),
        "instruction": str(data["instructions"][0]) if data.get("instructions") else "open the drawer",
    }


def _start_server(checkpoint: Path, device: str, *overrides: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "drifting_vla.cli.serve", f"checkpoint={checkpoint}", "port=0",
         "num_threads=1", f"device={device}", *overrides],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    for line in process.stdout:
        if line.startswith("ready: "):
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep the pipe drained
            return process, line.split()[1]
    raise RuntimeError(f"scripts/serve.py exited with {process.wait()} before it was ready")


def _load(url: str, obs: dict, clients: int, requests: int, warmup: int = 10) -> tuple[list[float], float, list[float]]:
    """`clients` threads, each sending `warmup` then `requests` observations back to back:
    the latencies of the `requests`, their wall time, and the server's own ms per request
    (decode + queue + model + encode; the rest of a latency is transport and the client)."""
    connections = [PolicyClient(url) for _ in range(clients)]
    latencies: list[float] = []
    server_ms: list[float] = []
    start = threading.Barrier(clients + 1)

    def client_loop(client: PolicyClient) -> None:
        for _ in range(warmup):
            client.predict(obs)
        start.wait()
        own, server = [], []
        for _ in range(requests):
            t0 = time.perf_counter()
            client.predict(obs)
            own.append(time.perf_counter() - t0)
            server.append(sum(client.last_timing.values()))
        latencies.extend(own)
        server_ms.extend(server)

    workers = [threading.Thread(target=client_loop, args=(c,)) for c in connections]
    for worker in workers:
        worker.start()
    start.wait()
    t0 = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - t0
    for client in connections:
        client.close()
    return latencies, seconds, server_ms


def _memory_row(url: str, obs: dict, pid: int) -> Row:
    """Resident memory of a fresh server after 100, 10,000 and 20,000 requests (4 clients, new
    connections for each stretch; the server's own warm-up forward pass comes before all)."""
    resident, done = {}, 0
    t0 = time.perf_counter()
    for target in MEMORY_REQUESTS:
        _load(url, obs, 4, (target - done) // 4, warmup=0)
        done = target
        resident[f"rss_MiB_after_{target}"] = f"{_rss_mib(pid):.1f}"
    return Row("serve", f"server memory over {done:,} requests (time: all of them)", time.perf_counter() - t0,
               extra=resident)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")
