"""The drifting field and loss against the paper (docs/drifting.md): each test names the mistake it catches."""

from __future__ import annotations

import math

import pytest
import torch

from drifting_vla.objectives.drifting_field import compute_drift
from drifting_vla.objectives.losses import DriftingLoss


def reference_algorithm2(x, y_pos, y_neg, temperature, self_masked):
    """Algorithm 2 of the paper, one problem, written plainly: x [N,D], y_pos [P,D], y_neg [M,D]."""
    x, y_pos, y_neg = x.double(), y_pos.double(), y_neg.double()
    n, p = x.shape[0], y_pos.shape[0]
    d_pos = torch.sqrt(((x[:, None, :] - y_pos[None]) ** 2).sum(-1))
    d_neg = torch.sqrt(((x[:, None, :] - y_neg[None]) ** 2).sum(-1))
    if self_masked:
        d_neg = d_neg + torch.eye(n, dtype=d_neg.dtype) * 1e6
    logits = torch.cat([-d_pos / temperature, -d_neg / temperature], dim=1)
    a_row = torch.softmax(logits, dim=1)
    a_col = torch.softmax(logits, dim=0)
    a = torch.sqrt(a_row * a_col)
    a_pos, a_neg = a[:, :p], a[:, p:]
    w_pos = a_pos * a_neg.sum(1, keepdim=True)
    w_neg = a_neg * a_pos.sum(1, keepdim=True)
    return (w_pos @ y_pos - w_neg @ y_neg).float()


@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
@pytest.mark.parametrize("self_masked", [True, False])
def test_field_matches_a_plain_algorithm2_when_the_floor_is_off(temperature, self_masked):
    g = torch.Generator().manual_seed(0)
    x, y_pos, y_extra = torch.randn(3, 6, 5, generator=g), torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, 5, generator=g)
    y_neg = None if self_masked else y_extra
    field = compute_drift(x, y_pos, y_neg, temperature=temperature, affinity_floor=0.0)
    for b in range(3):
        expected = reference_algorithm2(x[b], y_pos[b], x[b] if self_masked else y_extra[b], temperature, self_masked)
        torch.testing.assert_close(field[b], expected, rtol=1e-4, atol=1e-5)


def test_field_is_mean_shift_difference_scaled_by_affinity_mass():
    """V_i = s+_i s-_i (mean-shift+_i - mean-shift-_i): the identity in docs/drifting.md."""
    g = torch.Generator().manual_seed(1)
    x, y_pos, y_neg = torch.randn(1, 5, 3, generator=g), torch.randn(1, 4, 3, generator=g), torch.randn(1, 6, 3, generator=g)
    t = 0.7
    logits = -torch.cdist(x[0], torch.cat([y_neg[0], y_pos[0]])) / t
    a = torch.sqrt(torch.softmax(logits, 1) * torch.softmax(logits, 0))
    a_neg, a_pos = a[:, :6], a[:, 6:]
    s_pos, s_neg = a_pos.sum(1, keepdim=True), a_neg.sum(1, keepdim=True)
    mean_shift_pos = a_pos @ y_pos[0] / s_pos - x[0]
    mean_shift_neg = a_neg @ y_neg[0] / s_neg - x[0]
    expected = s_pos * s_neg * (mean_shift_pos - mean_shift_neg)
    field = compute_drift(x, y_pos, y_neg, temperature=t, affinity_floor=0.0)
    torch.testing.assert_close(field[0], expected, rtol=1e-4, atol=1e-6)


def test_field_flips_sign_when_roles_swap():
    g = torch.Generator().manual_seed(2)
    x, data, generated = torch.randn(4, 8, 6, generator=g), torch.randn(4, 8, 6, generator=g), torch.randn(4, 8, 6, generator=g)
    forward = compute_drift(x, data, generated, temperature=0.5)
    swapped = compute_drift(x, generated, data, temperature=0.5)
    torch.testing.assert_close(forward, -swapped, rtol=1e-4, atol=1e-6)


def test_field_is_unchanged_when_everything_is_translated():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 8, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    shift = torch.tensor([50.0, -20.0, 7.0, 3.0])
    torch.testing.assert_close(
        compute_drift(x + shift, y + shift, temperature=0.4), compute_drift(x, y, temperature=0.4), rtol=1e-3, atol=1e-4
    )


def test_field_vanishes_when_generated_matches_data_and_not_when_shifted():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(1, 512, 2, generator=g)
    same = torch.randn(1, 512, 2, generator=g)
    shifted = same + torch.tensor([3.0, 0.0])
    rms_same = compute_drift(same, data, temperature=1.0).square().mean().sqrt()
    field_shifted = compute_drift(shifted, data, temperature=1.0)
    rms_shifted = field_shifted.square().mean().sqrt()
    assert rms_shifted > 10 * rms_same
    assert field_shifted[0, :, 0].mean() < 0, "samples shifted to +x must be pulled back toward -x"


def test_problem_field_does_not_depend_on_other_problems_data():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(3, 8, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    before = compute_drift(x, y, temperature=0.5)
    x2, y2 = x.clone(), y.clone()
    x2[1] += 10 * torch.randn(8, 4, generator=g)
    y2[1] = 100.0
    after = compute_drift(x2, y2, temperature=0.5)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]])


def test_field_math_runs_in_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 8, 4, generator=g).bfloat16(), torch.randn(2, 1, 4, generator=g).bfloat16()
    field = compute_drift(x, y, temperature=0.2)
    assert field.dtype == torch.float32
    torch.testing.assert_close(field, compute_drift(x.float(), y.float(), temperature=0.2))


def test_default_floor_is_the_releases_and_barely_moves_small_problems():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(4, 8, 16, generator=g), torch.randn(4, 1, 16, generator=g)
    exact = compute_drift(x, y, temperature=1.0, affinity_floor=0.0)
    floored = compute_drift(x, y, temperature=1.0)
    assert torch.allclose(exact, floored, rtol=0.05, atol=0.05 * exact.abs().mean().item())
    assert not torch.equal(exact, floored)


# ----------------------------------------------------------------------------------------- loss


def _loss_inputs(seed=0, b=6, g=8, t=4, a=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, g, t, a, generator=gen, requires_grad=True), torch.randn(b, 1, t, a, generator=gen) + 0.5


def test_loss_gradient_is_the_normalized_field_times_the_documented_constant():
    x, y = _loss_inputs()
    out = DriftingLoss()(x, y)
    out.loss.backward()
    d = x[0, 0].numel()
    s_in = out.metrics["feature_scale"] / math.sqrt(d)
    expected = -2.0 * out.field / (x.numel() * s_in**2)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-9)


def test_loss_value_sits_between_one_and_nine_and_metrics_are_reported():
    x, y = _loss_inputs()
    out = DriftingLoss()(x, y)
    assert 1.0 <= out.loss.item() <= 9.0
    for key in ["lambda_V", "raw_drift_norm", "feature_scale", "raw_drift_norm/0.02", "raw_drift_norm/0.05", "raw_drift_norm/0.2"]:
        assert torch.isfinite(out.metrics[key]) and out.metrics[key] > 0, key


def test_each_temperature_is_normalized_before_summing():
    x, y = _loss_inputs(seed=1)
    temps = (0.02, 0.2)
    combined = DriftingLoss(temps)(x, y).field
    separately = sum(DriftingLoss((t,))(x, y).field for t in temps)
    torch.testing.assert_close(combined, separately, rtol=1e-4, atol=1e-6)
    for t in temps:
        field = DriftingLoss((t,))(x, y)
        s_in = field.metrics["feature_scale"] / math.sqrt(x[0, 0].numel())
        assert (field.field / s_in).square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-4)


def test_normalizing_after_summing_would_give_a_different_field():
    """Guards the test above: the bug it catches changes the field measurably on these inputs."""
    x, y = _loss_inputs(seed=1)
    per_t = [DriftingLoss((t,))(x, y) for t in (0.02, 0.2)]
    raws = [o.field / o.field.square().mean().sqrt() * o.metrics[f"raw_drift_norm/{t:g}"] for o, t in zip(per_t, (0.02, 0.2), strict=True)]
    summed = sum(raws)
    buggy = summed / summed.square().mean().sqrt()
    right = sum(o.field for o in per_t)
    right = right / right.square().mean().sqrt()
    assert (buggy - right).abs().max() > 0.1


def test_per_timestep_problems_equal_one_problem_per_chunk_step():
    x, y = _loss_inputs(seed=2)
    loss = DriftingLoss((0.05,), grouping="timestep")
    field = loss(x, y).field
    flat = DriftingLoss((0.05,))
    for step in range(x.shape[2]):
        # One chunk step alone, every observation a problem: same field up to the global scalars,
        # which the per-timestep run shares across steps; compare directions.
        alone = flat(x[:, :, step : step + 1], y[:, :, step : step + 1]).field[:, :, 0]
        cos = torch.nn.functional.cosine_similarity(alone.flatten(), field[:, :, step].flatten(), dim=0)
        assert cos > 0.95


def test_per_dimension_problems_equal_one_problem_per_action_dimension():
    x, y = _loss_inputs(seed=3)
    field = DriftingLoss((0.05,), grouping="dimension")(x, y).field
    flat = DriftingLoss((0.05,))
    for dim in range(x.shape[3]):
        alone = flat(x[..., dim : dim + 1], y[..., dim : dim + 1]).field[..., 0]
        cos = torch.nn.functional.cosine_similarity(alone.flatten(), field[..., dim].flatten(), dim=0)
        assert cos > 0.95


def test_groupings_keep_each_observation_its_own_problem():
    # Moving only observation 0's expert changes only observation 0's field, for every grouping.
    x, y = _loss_inputs(seed=4)
    moved = y.clone()
    moved[0] += 1.0
    for grouping in ("chunk", "timestep", "dimension"):
        loss = DriftingLoss((0.05, 0.2), grouping=grouping, affinity_floor=0.0)
        before, after = loss(x, y), loss(x, moved)
        # Global scalars (S, lambda) change a little; directions of the other problems must not.
        for b in range(1, x.shape[0]):
            cos = torch.nn.functional.cosine_similarity(before.raw_field[b].flatten(), after.raw_field[b].flatten(), dim=0)
            assert cos > 0.999, grouping


def test_collapsed_samples_keep_a_bounded_gradient():
    # Every sample of every problem on its expert: S -> 0. The release clips S and s_in at 1e-3.
    y = torch.randn(4, 1, 3, 2)
    x = y.expand(-1, 8, -1, -1).clone().requires_grad_(True)
    out = DriftingLoss()(x, y)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(x.grad).all()
    assert x.grad.abs().max() < 1e3


def test_guidance_weight_strengthens_repulsion_from_unconditional_negatives():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 2, generator=gen)
    y = torch.randn(4, 1, 2, generator=gen)
    uncond = torch.randn(4, 16, 2, generator=gen) + torch.tensor([2.0, 0.0])
    away = []
    for w in (0.5, 4.0):
        field = DriftingLoss((0.2,))(x, y, uncond, neg_weight=w).field
        away.append(-field[..., 0].mean().item())
    assert away[1] > away[0]


def test_loss_rejects_inputs_that_pool_different_conditions():
    x, y = _loss_inputs()
    with pytest.raises(ValueError, match="one drift problem per condition"):
        DriftingLoss()(x, y[:3])


def test_loss_field_stays_fp32_inside_a_bf16_autocast_region():
    x, y = _loss_inputs(seed=4)
    reference = DriftingLoss()(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = DriftingLoss()(x, y)
    assert autocast.loss.dtype == torch.float32
    torch.testing.assert_close(autocast.field, reference.field, rtol=1e-5, atol=1e-6)
