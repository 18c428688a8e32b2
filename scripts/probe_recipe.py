"""Probe drifting recipes in the one-positive regime in minutes, before a CPU hour on a suite.

    python scripts/probe_recipe.py                                    # the default grid, 2 seeds
    python scripts/probe_recipe.py --temperatures 0.02,0.05,0.2 0.1,0.3,1.0 --samples 8 32 --seeds 0 1 2

    python scripts/probe_recipe.py --checkpoints runs/drifting runs/regression   # trained runs, held-out demos

Every temperature set x G, plus regression, on unimodal and bimodal data (`lab/one_positive.py`).
Writes into --output: probe.json (one row per cell and seed) and probe.png (error per recipe, one
panel per kind of data, each seed a dot, regression as the reference line); prints a table. With
--checkpoints it scores those runs' policies on their held-out demonstrations instead, with the
same error and spread, and writes checkpoints.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from drifting_vla.lab.one_positive import ProbeSetting, run_probe, score_checkpoint  # noqa: E402


def temperature_set(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a temperature set is comma-separated numbers like 0.02,0.05,0.2, got {text!r}") from None
    if not values or any(not t > 0 for t in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--temperatures", type=temperature_set, nargs="+",
                   default=[(0.02, 0.05, 0.2), (0.02, 0.05, 0.2, 1.0), (0.1, 0.3, 1.0)],
                   help="temperature sets, each comma-separated (default: the paper's, it + 1.0, and 0.1,0.3,1.0)")
    p.add_argument("--samples", type=int, nargs="+", default=[8], help="G values (default: 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per cell (default: 3000, the quickstart's)")
    p.add_argument("--output", type=Path, default=Path("probe"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument("--checkpoints", type=Path, nargs="+", help="score these runs (or checkpoints) on their held-out demos instead")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> list[ProbeSetting]:
    cells = []
    for bimodal in (False, True):
        for seed in args.seeds:
            cells.append(ProbeSetting("regression", bimodal=bimodal, steps=args.steps, seed=seed))
            cells += [ProbeSetting("drifting", temps, g, bimodal, args.steps, seed=seed)
                      for temps in args.temperatures for g in args.samples]
    return cells


def write_plot(rows: list[dict], path: Path) -> None:
    labels = list(dict.fromkeys(r["label"] for r in rows if r["objective"] == "drifting"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.55 * len(labels) + 2.2), dpi=120, layout="constrained")
    for ax, bimodal in zip(axes, (False, True), strict=True):
        kind = [r for r in rows if r["bimodal"] == bimodal]
        reference = [r["error"] for r in kind if r["objective"] == "regression"]
        for y, label in enumerate(labels):
            errors = [r["error"] for r in kind if r["label"] == label]
            ax.barh(y, np.mean(errors), color="tab:red", alpha=0.35)
            ax.plot(errors, [y] * len(errors), "o", color="tab:red")
        ax.axvline(np.mean(reference), color="tab:gray", linestyle="--", label=f"regression ({np.mean(reference):.3f})")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlabel("error: squared distance to the nearest true answer, per dim")
        ax.set_title("bimodal: two answers, one shown per condition" if bimodal else "unimodal: one answer per condition")
        ax.legend(loc="lower right")
    axes[1].set_yticklabels([])
    fig.suptitle("One positive per condition: drifting recipes against regression (bars: mean; dots: seeds)")
    fig.savefig(path)
    plt.close(fig)


def score_checkpoints(paths: list[Path], output: Path) -> None:
    rows = [score_checkpoint(path).as_dict() for path in tqdm(paths, desc="checkpoints", unit="run")]
    (output / "checkpoints.json").write_text(json.dumps(rows, indent=2))
    width = max(len(r["checkpoint"]) for r in rows)
    print(f"{'checkpoint':{width}} {'method':22} {'error':>8} {'spread':>8} {'error of the mean':>18}")
    for r in rows:
        print(f"{r['checkpoint']:{width}} {r['method']:22} {r['error']:8.4f} {r['spread']:8.4f} {r['error'] - r['spread']:18.4f}")
    print(f"wrote {output / 'checkpoints.json'} ({rows[0]['observations']} held-out observations each)")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.checkpoints:
        score_checkpoints(args.checkpoints, args.output)
        return
    rows = [run_probe(s).as_dict() for s in tqdm(settings(args), desc="probe", unit="cell")]
    (args.output / "probe.json").write_text(json.dumps(rows, indent=2))
    write_plot(rows, args.output / "probe.png")
    print(f"{'data':9} {'recipe':34} {'error':>14} {'spread':>8} {'balance':>8}")
    for bimodal in (False, True):
        for label in dict.fromkeys(r["label"] for r in rows):
            cell = [r for r in rows if r["label"] == label and r["bimodal"] == bimodal]
            errors = [r["error"] for r in cell]
            balance = "" if not bimodal else f"{np.mean([r['balance'] for r in cell]):8.2f}"
            print(f"{'bimodal' if bimodal else 'unimodal':9} {label:34} {np.mean(errors):7.4f} ±{np.std(errors):.4f} "
                  f"{np.mean([r['spread'] for r in cell]):8.4f} {balance}")
    print(f"wrote {args.output / 'probe.json'} and {args.output / 'probe.png'}")


if __name__ == "__main__":
    main()
