"""Serve bounds case: what one client can cost the server and the others (the hostile probe's two heavy clients), on
loopback, `scripts/serve.py` in a subprocess with the serve case's random dit_s checkpoint.

Each figure is measured against its baseline in the same run:

- memory: the server's resident set before and after 5,000 requests, each with another
  instruction (4 clients), with the instruction cache unbounded (`instruction_cache` larger than
  the requests: every instruction kept, as before the LRU) and at its default (1024);
- a small client's p99 and worst latency (over 150 requests, or what 30 s allow) alone, then
  beside a client sending 6 MiB instructions back to back, each another (the instruction cache
  cannot help): with `max_instruction_chars` past 6 Mi characters (each reaches the tokenizer on
  the model thread, as before the limit) and at its default (1000: `too_large` while decoding);
- the small client's p99 beside a client sending the largest frames a 16 MiB message holds
  (two cameras of 1600 x 1600), which the decode threads unpack and resize off the event loop.

Bounded loops: each stretch sends a fixed number of requests or runs a fixed number of seconds.
"""

from __future__ import annotations

import multiprocessing as mp
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from drifting_vla.benchmarks.serve import _observation, _random_checkpoint, _rss_mib, _start_server
from drifting_vla.benchmarks.timing import Row
from drifting_vla.inference.policy import DriftingPolicy
from drifting_vla.serving import PolicyClient, PolicyError

DISTINCT_REQUESTS = 5_000
SMALL_REQUESTS = 150  # the small client's requests per stretch, or as many as STRETCH_S allows
STRETCH_S = 30.0
HUGE_INSTRUCTION = "x" * 6 * 2**20
LARGE_FRAME = 1600  # 2 x 3 x 1600 x 1600 bytes = 14.6 MiB, under the 16 MiB message cap


def run(args) -> list[Row]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = _random_checkpoint(Path(tmp), args.device)
        obs = _observation(DriftingPolicy.from_checkpoint(checkpoint).cfg["data"])
        return [
            *_memory_rows(checkpoint, args.device, obs),
            *_neighbour_rows(checkpoint, args.device, obs),
        ]


def _memory_rows(checkpoint: Path, device: str, obs: dict) -> list[Row]:
    rows = []
    for label, cache in (("unbounded (as before)", DISTINCT_REQUESTS * 10), ("LRU of 1024 (default)", 1024)):
        process, url = _start_server(checkpoint, device, f"instruction_cache={cache}")
        try:
            before = _rss_mib(process.pid)
            t0 = time.perf_counter()
            _distinct_instructions(url, obs, DISTINCT_REQUESTS, clients=4)
            seconds = time.perf_counter() - t0
            after = _rss_mib(process.pid)
        finally:
            process.terminate()
            process.communicate(timeout=60)
        rows.append(Row("serve_bounds", f"{DISTINCT_REQUESTS:,} distinct instructions, cache {label} (time: all)", seconds,
                        rows[0].name if rows else None,
                        {"rss_MiB_before": f"{before:.0f}", "rss_MiB_after": f"{after:.0f}",
                         "growth_MiB": f"{after - before:.0f}"}))
    return rows


def _distinct_instructions(url: str, obs: dict, requests: int, clients: int) -> None:
    bar = tqdm(total=requests, desc="distinct instructions", unit="req", dynamic_ncols=True)

    def client_loop(first: int) -> None:
        with PolicyClient(url) as client:
            for i in range(first, requests, clients):
                client.predict({**obs, "instruction": f"open the drawer, variant {i:05d}"})
                bar.update(1)

    workers = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    bar.close()


def _neighbour_rows(checkpoint: Path, device: str, obs: dict) -> list[Row]:
    large = {**obs, "images": np.random.default_rng(0).integers(0, 256, (len(obs["images"]), 3, LARGE_FRAME, LARGE_FRAME),
                                                                 dtype=np.uint8)}
    stretches = (
        ("alone", None, 1000),
        ("beside 6 MiB instructions, max_instruction_chars past them (as before)", {**obs, "instruction": HUGE_INSTRUCTION},
         2 * len(HUGE_INSTRUCTION)),
        ("beside 6 MiB instructions, max_instruction_chars=1000 (default)", {**obs, "instruction": HUGE_INSTRUCTION}, 1000),
        (f"beside {LARGE_FRAME}x{LARGE_FRAME} frames (decoded off the event loop)", large, 1000),
    )
    rows = []
    for label, heavy, limit in tqdm(stretches, desc="small client's p99", unit="stretch"):
        process, url = _start_server(checkpoint, device, f"max_instruction_chars={limit}")
        try:
            latencies, heavy_replies = _small_beside(url, obs, heavy)
            p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
        finally:
            process.terminate()
            process.communicate(timeout=60)
        extra = {"p50_ms": f"{1e3 * p50:.1f}", "max_ms": f"{1e3 * max(latencies):.1f}", "requests": len(latencies)}
        if heavy is not None:
            extra["heavy_client_replies"] = heavy_replies
        rows.append(Row("serve_bounds", f"small client p99, {label}", p99, rows[0].name if rows else None, extra))
    return rows


def _small_beside(url: str, obs: dict, heavy: dict | None) -> tuple[list[float], str]:
    """The small client's latencies over SMALL_REQUESTS requests (or STRETCH_S seconds) while
    (with `heavy`) another client, in a process of its own (its packing must not take this
    process's interpreter lock from the small client), sends `heavy` back to back; and what the
    heavy one's requests got."""
    context = mp.get_context("spawn")
    stop, outcomes = context.Event(), context.Queue()
    worker = context.Process(target=_heavy_loop, args=(url, heavy, stop, outcomes)) if heavy is not None else None
    with PolicyClient(url) as client:
        for _ in range(10):
            client.predict(obs)
        if worker is not None:
            worker.start()
            time.sleep(2.0)  # the heavy client connected and under way
        latencies, deadline = [], time.perf_counter() + STRETCH_S
        while len(latencies) < SMALL_REQUESTS and time.perf_counter() < deadline:
            t0 = time.perf_counter()
            client.predict(obs)
            latencies.append(time.perf_counter() - t0)
    stop.set()
    summary = "-"
    if worker is not None:
        summary = outcomes.get(timeout=180)
        worker.join(timeout=60)
    return latencies, summary


def _heavy_loop(url: str, heavy: dict, stop, outcomes) -> None:
    counts: dict[str, int] = {}
    with PolicyClient(url, timeout_s=180) as client:
        while not stop.is_set():
            sent = sum(counts.values())
            if len(heavy["instruction"]) == len(HUGE_INSTRUCTION):  # another each time: no cache can answer it
                heavy = {**heavy, "instruction": f"{sent:08d}" + heavy["instruction"][8:]}
            try:
                client.predict(heavy)
                counts["chunk"] = counts.get("chunk", 0) + 1
            except PolicyError as error:
                counts[error.kind] = counts.get(error.kind, 0) + 1
    outcomes.put(", ".join(f"{count} {kind}" for kind, count in sorted(counts.items())) or "-")
