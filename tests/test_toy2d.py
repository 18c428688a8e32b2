"""The 2D lab: the one-step generator learns a multi-modal target, and the tool writes its pictures."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from drifting_vla.lab.dynamics import reverse_diffusion, run_particles, train_generator
from drifting_vla.lab.metrics import energy_distance, modes_covered
from drifting_vla.lab.targets import make_target

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import toy2d  # noqa: E402


def test_one_step_generator_covers_all_eight_gaussians():
    target = make_target("gaussians")
    run = train_generator(target, samples=128, positives=128, steps=800, frames=2)
    reference = target.sample(2000, torch.Generator().manual_seed(1))
    assert run.nfe == 1
    assert modes_covered(run.samples, target) == 8
    assert energy_distance(run.samples, reference) < 0.05


def test_particles_settle_on_the_target_and_exact_score_diffusion_is_a_fair_baseline():
    target = make_target("gaussians")
    reference = target.sample(2000, torch.Generator().manual_seed(1))
    particles = run_particles(target, particles=256, positives=256, steps=150, frames=2)
    assert modes_covered(particles.samples, target) == 8
    assert energy_distance(particles.samples, reference) < 0.02
    diffusion = reverse_diffusion(target, method="ode", steps=50, samples=1000, frames=2)
    assert diffusion.nfe == 200
    assert energy_distance(diffusion.samples, reference) < 0.02


def test_every_target_builds_and_samples_in_the_plotting_box(tmp_path):
    from PIL import Image

    mask = tmp_path / "mask.png"
    pixels = torch.full((40, 40), 255, dtype=torch.uint8)
    pixels[10:30, 15:25] = 0
    Image.fromarray(pixels.numpy()).save(mask)
    for name in ["gaussians", "ring", "s_curve", "checkerboard", "image"]:
        target = make_target(name, image=mask)
        x = target.sample(500, torch.Generator().manual_seed(0))
        assert x.shape == (500, 2) and x.abs().max() < 3.2, name


def test_tool_writes_frames_animation_summary_and_metrics(tmp_path):
    metrics = toy2d.main(["--mode", "all", "--steps", "20", "--train-steps", "20", "--diffusion-steps", "10",
                          "--particles", "64", "--positives", "64", "--eval-samples", "300", "--frames", "3",
                          "--out", str(tmp_path)])
    assert set(metrics) == {"particles", "generator", "diffusion-sde", "diffusion-ode"}
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["runs"]["diffusion-ode"]["nfe"] == 40 and saved["runs"]["generator"]["nfe"] == 1
    for mode in metrics:
        assert (tmp_path / mode / f"{mode}.gif").stat().st_size > 0
        assert len(list((tmp_path / mode / "frames").glob("*.png"))) >= 2
    assert (tmp_path / "summary.png").stat().st_size > 0
