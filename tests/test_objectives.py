"""Objectives: each one learns, and each one samples what it learned.

The overfitting tests train the tiny network on one fixed batch of 4 observations, each with its
own expert chunk, and check through `objective.sample` (the policy's path) that the chunks come
back; a sampler that disagrees with its training loss cannot pass them.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

from drifting_vla.formats.validation import training_config
from drifting_vla.models.drifting_vla import DriftingVLA, build_model
from drifting_vla.objectives.methods import OBJECTIVES, build_objective
from tests.helpers import observation_batch, tiny_cfg


@pytest.fixture
def one_thread():
    """A tiny network runs fastest on one thread, and a busy machine cannot stall it at barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _objective(name: str, **overrides):
    return build_objective(training_config(OmegaConf.create({"objective": name, "num_samples": 8, **overrides})))


def _fixed_batch():
    gen = torch.Generator().manual_seed(0)
    obs = observation_batch(batch=4)
    obs["instruction"] = list(obs["instruction"])
    obs["task"] = ["reach-v3"] * 4
    actions = torch.rand(4, 4, 4, generator=gen) * 1.6 - 0.8  # normalized units, inside [-1, 1]
    return obs, actions


def _sample_error(objective, model, obs, actions) -> float:
    with torch.no_grad():
        chunks = objective.sample(model, model.encode_condition(obs), 4, generator=torch.Generator().manual_seed(1))
    return float((chunks - actions[:, None]).square().mean())


@pytest.mark.parametrize(
    "name, overrides, steps, max_error, min_drop",
    [
        ("drifting", {}, 300, 0.01, 10),
        ("regression", {}, 300, 0.005, 10),
        ("flow_matching", {}, 600, 0.02, 10),
        ("diffusion", {"diffusion": {"prediction_type": "sample"}}, 600, 0.005, 10),
        # Epsilon prediction memorizes slowly on a tiny network: x0 = (x - sqrt(1 - ab) eps) / sqrt(ab)
        # amplifies its errors at the noisy end (measured: 0.08 at 600 steps, 0.04 at 1500).
        ("diffusion", {}, 600, 0.12, 3),
    ],
)
def test_each_objective_overfits_a_fixed_batch_and_samples_its_expert_chunks(name, overrides, steps, max_error, min_drop, one_thread):
    torch.manual_seed(0)
    model = build_model(tiny_cfg(horizon=4))
    objective = _objective(name, **overrides)
    obs, actions = _fixed_batch()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=3e-3)
    error_before = _sample_error(objective, model, obs, actions)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        inputs = objective.training_inputs(4, model.horizon, model.noise_dim, gen)
        out = objective(model, obs, actions, inputs)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    error_after = _sample_error(objective, model, obs, actions)
    assert error_after < max_error, f"{name}: sampled chunks are {error_after:.4f} (MSE) from the experts"
    assert error_after < error_before / min_drop
    if name != "drifting":  # the normalized drifting loss sits near a constant by construction
        assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 / 5


def test_flow_matching_beta_times_follow_pi0s_distribution():
    objective = _objective("flow_matching")
    t = objective.training_inputs(100_000, 4, 4, torch.Generator().manual_seed(0))["t"]
    assert 0.001 <= float(t.min()) and float(t.max()) <= 1.0
    # Beta(1.5, 1) on [0.001, 1]: mean 0.001 + 0.999 * 1.5 / 2.5 (favours noisy times, t = 1 is noise).
    assert abs(float(t.mean()) - (0.001 + 0.999 * 0.6)) < 0.005
    uniform = _objective("flow_matching", flow_matching={"time_distribution": "uniform"})
    assert abs(float(uniform.training_inputs(100_000, 4, 4, torch.Generator().manual_seed(0))["t"].mean()) - 0.5) < 0.005


def test_diffusion_schedule_is_squaredcos_cap_v2():
    alphas_cumprod = _objective("diffusion").alphas_cumprod
    assert alphas_cumprod.shape == (100,)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    # Reference values of the cosine schedule with 100 steps (diffusers' squaredcos_cap_v2).
    first_beta = 1 - math.cos((0.01 + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert abs(float(alphas_cumprod[0]) - (1 - first_beta)) < 1e-6
    assert float(alphas_cumprod[-1]) < 1e-4


MU, STD = 0.3, 0.5  # a Gaussian "expert" distribution, whose exact denoiser and velocity are known


class ExactGaussianNetwork:
    """Stands in for the network with the exact optimum of each training loss for expert chunks
    a ~ N(MU, STD^2): a sampler that disagrees with its loss cannot reproduce N(MU, STD^2)."""

    horizon, noise_dim = 4, 4

    sample_noise = DriftingVLA.sample_noise  # the network's own noise draw (reads horizon, noise_dim)

    def __init__(self, objective, action_spec):
        self.objective, self.action_spec = objective, action_spec

    def predict(self, condition, x, t):
        t = t[..., None, None]
        if self.objective.name == "flow_matching":  # E[eps - a | x_t], x_t = t eps + (1 - t) a
            var = t**2 + (1 - t) ** 2 * STD**2
            return -MU + (t - (1 - t) * STD**2) / var * (x - (1 - t) * MU)
        k = (t * self.objective.num_train_timesteps).round().long()
        ab = self.objective.alphas_cumprod[k]  # E[eps | x_k], x_k = sqrt(ab) a + sqrt(1 - ab) eps
        return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)


@pytest.mark.parametrize(
    "name, nfe, sampler",
    [("flow_matching", 100, None), ("diffusion", 100, "ddpm"), ("diffusion", 50, "ddim")],
)
def test_samplers_with_the_exact_network_draw_the_expert_distribution(name, nfe, sampler):
    objective = _objective(name, diffusion={"clip_sample": False})
    model = build_model(tiny_cfg(horizon=4)).eval()
    condition = model.encode_condition(observation_batch(batch=1))
    network = ExactGaussianNetwork(objective, model.action_spec)
    samples = objective.sample(network, condition, 4000, nfe, sampler, torch.Generator().manual_seed(0))
    assert abs(float(samples.mean()) - MU) < 0.02
    assert abs(float(samples.std()) - STD) < 0.03


def test_one_step_objectives_have_one_nfe_and_iterative_ones_take_more():
    assert _objective("drifting").resolve() == (1, None)
    assert _objective("regression").resolve() == (1, None)
    assert _objective("flow_matching").resolve() == (10, None)
    assert _objective("diffusion").resolve() == (10, "ddim")
    assert _objective("diffusion").resolve(100, "ddpm") == (100, "ddpm")
    with pytest.raises(ValueError, match="1..100"):
        _objective("diffusion").resolve(101)


def test_every_objective_is_registered_and_an_unknown_one_is_refused_naming_the_key():
    for name in OBJECTIVES:
        assert _objective(name).name == name
    with pytest.raises(ValueError, match="training.objective='gan' is unknown"):
        build_objective(training_config(OmegaConf.create({"objective": "gan"})))
