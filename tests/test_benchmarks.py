"""The gpu benchmark case goes through every code path on a CPU, so a GPU lease (minutes, drawn
by chance) is never spent finding a typo: `scripts/benchmark.py gpu --smoke --device cpu`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_smoke(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "gpu", "--smoke", "--device", "cpu", "--json", str(out), *flags],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, json.loads(out.read_text())


def _measured(rows: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in rows if r["seconds"] is not None}


def test_gpu_smoke_measures_every_section_but_cuda_graphs_on_a_cpu(tmp_path):
    done, rows = _gpu_smoke(tmp_path)
    not_measured = [r for r in rows if r["seconds"] is None]
    assert [(r["name"], r["extra"]) for r in not_measured] == [("tiny inference, CUDA graphs", {"skipped": "CUDA graphs need a CUDA device"})]
    measured = _measured(rows)
    assert any(name.startswith("bf16 matmul") for name in measured)
    for variant in ("eager", "compile"):
        for source in ("images", "feature cache"):
            flow, drifting = (measured[f"tiny B=4 {variant}, {source}: {o}"] for o in ("flow_matching G=1", "drifting G=8"))
            assert drifting["baseline"] == flow["name"]
            assert {"obs/s", "frozen_encoders", "network", "drift_field", "optimizer", "TFLOP/step", "MFU"} <= drifting["extra"].keys()
        for where in ("end to end", "head only"):
            title = f"tiny chunk, {variant}, {where}"
            for label in ("flow_matching nfe=10", "diffusion/ddim nfe=10", "diffusion/ddpm nfe=100"):
                assert f"{title}: {label}" in measured
            drifting = measured[f"{title}: drifting nfe=1"]
            assert drifting["baseline"] == f"{title}: flow_matching nfe=10"
            assert {"vs_ddim10", "vs_ddpm100", "control_hz"} <= drifting["extra"].keys()
            assert ("encoders_share" in drifting["extra"]) == (where == "end to end")
    assert "tiny chunk, eager, head only: drifting nfe=1" in done.stdout  # the table is printed at the end


def test_gpu_sections_that_do_not_fit_the_budget_are_skipped_and_said_so(tmp_path):
    _, rows = _gpu_smoke(tmp_path, "--budget-s", "0")
    assert rows and all(r["seconds"] is None and "skipped" in r["extra"] for r in rows)


@pytest.mark.slow
def test_gpu_smoke_runs_the_quickstart_end_to_end(tmp_path):
    pytest.importorskip("metaworld", reason="the quickstart needs the [sim] extra")
    _, rows = _gpu_smoke(tmp_path, "--quickstart")
    quickstart = _measured(rows)["quickstart end to end (collect, train, evaluate)"]
    assert quickstart["extra"]["episodes"] == 1 and 0.0 <= quickstart["extra"]["success_rate"] <= 1.0
