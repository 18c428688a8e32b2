"""The one-positive probe: its scores mean what they say, training moves them, and the tool writes
its table and picture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from drifting_vla.lab.one_positive import (
    ACTION_DIM,
    MODE_OFFSET,
    ProbeSetting,
    answers,
    run_probe,
    score,
    teacher,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import probe_recipe  # noqa: E402


def test_scores_of_known_samples():
    conditions = torch.randn(10, 16)
    truth = answers(conditions, teacher(), bimodal=True)  # [10, 2, D]
    on_both = truth.clone()  # one sample on each answer
    assert score(on_both, truth) == pytest.approx((0.0, MODE_OFFSET**2, 0.5), abs=1e-6)
    midway = truth.mean(dim=1, keepdim=True)  # regression's answer to bimodal data
    error, spread, _ = score(midway, truth)
    assert error == pytest.approx(MODE_OFFSET**2, rel=1e-5)
    assert spread == 0.0
    unimodal = answers(conditions, teacher(), bimodal=False)
    assert score(unimodal.expand(-1, 4, -1), unimodal) == pytest.approx((0.0, 0.0, None), abs=1e-6)


def test_teacher_is_the_same_for_every_setting():
    c = torch.randn(3, 16)
    assert torch.equal(teacher()(c), teacher()(c))
    assert teacher()(c).shape == (3, ACTION_DIM)


def test_training_fits_the_teacher_and_drifting_keeps_a_spread():
    untrained = run_probe(ProbeSetting("regression", steps=1))
    regression = run_probe(ProbeSetting("regression", steps=300))
    drifting = run_probe(ProbeSetting("drifting", (0.1, 0.3, 1.0), num_samples=4, bimodal=True, steps=100))
    assert regression.error < 0.5 * untrained.error
    assert regression.spread == 0.0 and regression.balance is None
    assert drifting.spread > 0.0 and 0.0 <= drifting.balance <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"objective": "mse"}, "drifting or regression"), ({"num_samples": 1}, "num_samples"), ({"steps": 0}, "steps")],
)
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProbeSetting(**kwargs)


def test_bad_temperature_sets_are_named():
    with pytest.raises(SystemExit):
        probe_recipe.parse_args(["--temperatures", "0.1,x"])
    with pytest.raises(SystemExit):
        probe_recipe.parse_args(["--temperatures", "0.1,-1"])


def test_tool_writes_rows_and_a_picture(tmp_path, capsys):
    probe_recipe.main(["--temperatures", "0.2", "0.1,1", "--steps", "2", "--seeds", "0", "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "probe.json").read_text())
    assert {(r["label"], r["bimodal"]) for r in rows} == {
        (label, bimodal) for label in ("regression", "drifting T=0.2 G=8", "drifting T=0.1,1 G=8") for bimodal in (False, True)
    }
    assert (tmp_path / "probe.png").stat().st_size > 10_000
    assert "drifting T=0.1,1 G=8" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["drifting", "regression"])
def test_a_checkpoint_is_scored_on_the_chunks_its_policy_executes(tmp_path, objective):
    from drifting_vla.data.fixtures import write_rlbench_fixture
    from drifting_vla.inference.policy import DriftingPolicy
    from drifting_vla.lab.one_positive import held_out_batches, score_checkpoint
    from drifting_vla.training.trainer import Trainer
    from tests.helpers import compose_config, overrides_for

    write_rlbench_fixture(tmp_path / "data" / "train", episodes=2, steps=12, seed=0)
    write_rlbench_fixture(tmp_path / "data" / "val", episodes=1, steps=12, seed=1)
    run = tmp_path / "run"
    Trainer(compose_config(overrides_for(tmp_path / "data", run, f"training.objective={objective}", "training.max_steps=2"))).fit()

    one = score_checkpoint(run, batches=2, batch_size=4, samples=1)
    policy = DriftingPolicy.from_checkpoint(run)
    normalize = policy.normalizer.normalize
    errors = []
    for index, batch in held_out_batches(policy, batches=2, batch_size=4):
        chunk = torch.as_tensor(policy.predict_action_chunk(batch, generator=torch.Generator().manual_seed(index)))
        errors.append(((normalize("actions", chunk) - normalize("actions", batch["actions"].float())).square().mean(), len(chunk)))
    assert one.observations == sum(n for _, n in errors) == 8
    assert one.error == pytest.approx(float(sum(e * n for e, n in errors)) / one.observations, rel=1e-4)

    many = score_checkpoint(run, batches=2, batch_size=4, samples=4)
    assert (many.spread > 0) == (objective == "drifting")
    assert many.method == policy.method
