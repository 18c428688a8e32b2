"""ONNX case: the exported graph in ONNX Runtime against the PyTorch policy, one chunk at batch 1.

The embedded default (dit_s, random weights: speed does not depend on them, two 64x64 cameras,
the packaged MiniLM) is exported with `DriftingPolicy.export_onnx`; both rows then time
`predict_action_chunk` on the same observation, the whole path (uint8 images in, raw-unit chunk
out), on the CPU with one thread each: `torch.set_num_threads(1)` and ONNX Runtime's
`intra_op_num_threads=1` (batch-1 ops are too small to split, and threads fight a loaded
machine; benchmarks/model.py says more). The ONNX row's speed-up is over the PyTorch row of the
same run, each row the median of 5 rounds run alternately; `max_abs_diff` is the two chunks' largest difference given the same noise. PyTorch's
language encoder caches each instruction's features after the first call, so neither row pays for
text. Runs on the CPU whatever `--device` says: the comparison is between the two runtimes.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from drifting_vla.benchmarks.serve import _observation, _random_checkpoint
from drifting_vla.benchmarks.timing import Row, time_call
from drifting_vla.inference.policy import DriftingPolicy

ROUNDS = 5


def run(args) -> list[Row]:
    del args
    from drifting_vla.inference.onnx_policy import OnnxPolicy

    with tempfile.TemporaryDirectory() as tmp:
        policy = DriftingPolicy.from_checkpoint(_random_checkpoint(Path(tmp), "cpu"), device="cpu")
        obs = _observation(policy.cfg["data"])
        path = policy.export_onnx(Path(tmp) / "policy.onnx", instructions=[obs["instruction"]])
        onnx_policy = OnnxPolicy.from_file(path, threads=1)
        noise = torch.randn((1, policy.horizon, policy.model.noise_dim), generator=torch.Generator().manual_seed(0))
        difference = np.abs(onnx_policy.predict_action_chunk(obs, noise=noise.numpy())
                            - policy.predict_action_chunk(obs, generator=torch.Generator().manual_seed(0))).max()
        size_mib = path.stat().st_size / 2**20
        torch_s, onnx_s = alternating(lambda: policy.predict_action_chunk(obs), lambda: onnx_policy.predict_action_chunk(obs))
    base = "dit_s chunk, batch 1, CPU: PyTorch DriftingPolicy"
    return [
        Row("onnx", base, torch_s, extra={"threads": 1, "rounds": ROUNDS}),
        Row("onnx", "dit_s chunk, batch 1, CPU: ONNX Runtime OnnxPolicy", onnx_s, base,
            {"threads": 1, "rounds": ROUNDS, "max_abs_diff": f"{difference:.1e}", "file_MiB": f"{size_mib:.1f}"}),
    ]


def alternating(torch_call, onnx_call) -> tuple[float, float]:
    """Median seconds of each call over ROUNDS alternating rounds (one `time_call` each), with
    torch on one thread: on a shared machine the load drifts, and alternating spreads that drift
    over both rows instead of charging it to whichever ran second."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rounds = [(time_call(torch_call), time_call(onnx_call)) for _ in range(ROUNDS)]
    finally:
        torch.set_num_threads(threads)
    return statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)
