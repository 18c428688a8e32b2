"""The 2D lab: see the drifting objective work, and compare one step with many.

    python scripts/toy2d.py                                  # every mode on 8 gaussians
    python scripts/toy2d.py --mode generator --target ring
    python scripts/toy2d.py --mode particles --temperatures 0.05 --noise 0.1 --animation mp4
    python scripts/toy2d.py --mode diffusion --diffusion-steps 25 --target checkerboard
    python scripts/toy2d.py --target image --image my_logo.png

Writes into --out: PNG frames with the drift arrows, an animation per mode, summary.png (final
samples side by side) and metrics.json (energy distance, modes covered, NFE, wall time).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drifting_vla.lab.dynamics import (
    LAB_AFFINITY_FLOOR,
    reverse_diffusion,
    run_particles,
    train_generator,
)
from drifting_vla.lab.metrics import energy_distance, modes_covered
from drifting_vla.lab.render import write_frames, write_summary
from drifting_vla.lab.targets import TARGETS, make_target

MODES = ("particles", "generator", "diffusion")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=(*MODES, "all"), default="all")
    p.add_argument("--target", choices=TARGETS, default="gaussians")
    p.add_argument("--image", type=Path, help="image whose dark pixels are the target (--target image)")
    p.add_argument("--clusters", type=int, default=8, help="gaussians in the mixture / modes counted for other targets")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.02, 0.05, 0.2])
    p.add_argument("--affinity-floor", type=float, default=LAB_AFFINITY_FLOOR,
                   help="the release's floor on A_row*A_col; 0 (default here) is Algorithm 2, see LAB_AFFINITY_FLOOR")
    p.add_argument("--particles", type=int, default=256, help="particles, or generated samples per training step")
    p.add_argument("--positives", type=int, default=256, help="target samples per step")
    p.add_argument("--steps", type=int, default=300, help="particle steps")
    p.add_argument("--step-size", type=float, default=1.0, help="particle step along the raw field")
    p.add_argument("--noise", type=float, default=0.0, help="Brownian noise on particles")
    p.add_argument("--train-steps", type=int, default=1500, help="generator training steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--diffusion-steps", type=int, default=100, help="solver steps of the diffusion baseline")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--animation", choices=("gif", "mp4", "none"), default="gif")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/toy2d"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    target = make_target(args.target, clusters=args.clusters, seed=args.seed, image=args.image)
    reference = target.sample(args.eval_samples, torch.Generator().manual_seed(args.seed + 1))
    runs = []
    for mode in MODES if args.mode == "all" else (args.mode,):
        if mode == "particles":
            runs.append(run_particles(target, particles=args.particles, positives=args.positives, steps=args.steps,
                                      step_size=args.step_size, noise=args.noise, temperatures=args.temperatures,
                                      affinity_floor=args.affinity_floor, frames=args.frames, seed=args.seed))
        elif mode == "generator":
            runs.append(train_generator(target, samples=args.particles, positives=args.positives, steps=args.train_steps,
                                        lr=args.lr, temperatures=args.temperatures, affinity_floor=args.affinity_floor, frames=args.frames,
                                        eval_samples=args.eval_samples, seed=args.seed))
        else:
            for method in ("sde", "ode"):
                runs.append(reverse_diffusion(target, method=method, steps=args.diffusion_steps,
                                              samples=args.eval_samples, frames=args.frames, seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    metrics = {
        run.mode: {
            "energy_distance": energy_distance(run.samples, reference),
            "modes_covered": modes_covered(run.samples, target),
            "modes_total": len(target.modes),
            "nfe": run.nfe,
            "wall_seconds": round(run.seconds, 3),
        }
        for run in runs
    }
    for run in runs:
        write_frames(run, reference, args.out / run.mode, args.animation)
    write_summary(runs, metrics, reference, args.out / "summary.png")
    (args.out / "metrics.json").write_text(json.dumps({"target": args.target, "runs": metrics}, indent=2))
    print(f"{'mode':<16}{'energy dist':>12}{'modes':>8}{'NFE':>6}{'seconds':>9}")
    for mode, m in metrics.items():
        print(f"{mode:<16}{m['energy_distance']:>12.4f}{m['modes_covered']:>5}/{m['modes_total']:<2}{m['nfe']:>6}{m['wall_seconds']:>9.1f}")
    print(f"pictures and metrics.json in {args.out}")
    return metrics


if __name__ == "__main__":
    main()
