"""The robot regime of the drifting objective in seconds: one positive per condition.

A policy's data gives ONE expert chunk per observation, so each drift problem has P = 1 positive
and G generated samples; the 2D lab's targets (many positives, D = 2) never show what that does.
This probe fits a small conditional generator g(c, z) to a synthetic teacher at the size of an
action chunk (D = 64, like 16 steps x 4 action dims) and measures what a rollout feels:

    unimodal   every condition has one answer y(c)                  (the quickstart suite's demos)
    bimodal    each training condition shows y(c) + m or y(c) - m,  (the multimodal suite's routes)
               drawn at random, never both

    error      mean squared distance, per dimension, from a sample to the nearest true answer
    spread     per-dimension variance of the samples of one condition (0 for regression)
    balance    bimodal: the share of samples nearer y(c) + m (0.5 covers both answers)

Regression is the same network fed zeros instead of noise, trained by MSE (as
`training.objective=regression`); it is the reference a unimodal error is read against, and on
bimodal data it lands between the answers (error about m^2 per dimension).

The same scores apply to a trained policy on its held-out demonstrations (`score_checkpoint`),
where every observation has one answer: its expert chunk. There `error - spread` is the error of the
samples' mean, so a run shows whether its policy misses the answer or scatters around it.

    python scripts/probe_recipe.py                 # the default grid, table + probe.png
    python scripts/probe_recipe.py --checkpoints runs/a runs/b     # trained policies, held-out demos
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from drifting_vla.objectives.losses import DriftingLoss

CONDITION_DIM = 16
ACTION_DIM = 64  # one chunk, flattened: 16 steps x 4 action dimensions
MODE_OFFSET = 0.8  # bimodal: answers at y(c) +- MODE_OFFSET in every dimension
TRAIN_CONDITIONS = 20_000
TEST_CONDITIONS = 500
SAMPLES_PER_TEST_CONDITION = 16
BATCH_SIZE = 32


@dataclass(frozen=True)
class ProbeSetting:
    """One cell of the probe: `objective` is drifting or regression; `temperatures` and
    `num_samples` (G) apply to drifting."""

    objective: str = "drifting"
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)
    num_samples: int = 8
    bimodal: bool = False
    steps: int = 3000
    learning_rate: float = 3e-4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in ("drifting", "regression"):
            raise ValueError(f"objective must be drifting or regression, got {self.objective!r}")
        if self.num_samples < 2 and self.objective == "drifting":
            raise ValueError(f"drifting needs num_samples >= 2 (a sample never repels itself), got {self.num_samples}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def label(self) -> str:
        if self.objective == "regression":
            return "regression"
        return f"drifting T={','.join(f'{t:g}' for t in self.temperatures)} G={self.num_samples}"


@dataclass(frozen=True)
class ProbeResult:
    setting: ProbeSetting
    error: float
    spread: float
    balance: float | None
    seconds: float

    def as_dict(self) -> dict:
        return {**asdict(self.setting), "label": self.setting.label, "error": self.error, "spread": self.spread,
                "balance": self.balance, "seconds": self.seconds}


def teacher() -> nn.Module:
    """A fixed smooth map c -> y(c) with unit-scale inputs and outputs of variance about 0.4;
    the same for every setting and seed, so cells differ only in what they train."""
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Linear(CONDITION_DIM, 128), nn.Tanh(), nn.Linear(128, ACTION_DIM))
    with torch.no_grad():
        for p in net.parameters():
            scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.requires_grad_(False)


def answers(conditions: Tensor, y_of: nn.Module, bimodal: bool) -> Tensor:
    """`[N, K, D]`: every true answer of each condition (K = 2 when bimodal)."""
    y = y_of(conditions)[:, None]
    return torch.cat([y + MODE_OFFSET, y - MODE_OFFSET], dim=1) if bimodal else y


def generator_network() -> nn.Module:
    return nn.Sequential(
        nn.Linear(CONDITION_DIM + ACTION_DIM, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, ACTION_DIM)
    )


def generate(net: nn.Module, conditions: Tensor, noise: Tensor) -> Tensor:
    """conditions `[N, C]`, noise `[N, G, D]` -> samples `[N, G, D]`."""
    expanded = conditions[:, None].expand(-1, noise.shape[1], -1)
    return net(torch.cat([expanded, noise], dim=-1))


def score(samples: Tensor, true_answers: Tensor) -> tuple[float, float, float | None]:
    """(error, spread, balance) of samples `[N, G, D]` against answers `[N, K, D]` (module docstring)."""
    distances = (samples[:, :, None] - true_answers[:, None]).square().mean(-1)  # [N, G, K]
    error = distances.min(-1).values.mean().item()
    spread = samples.var(dim=1, unbiased=False).mean().item()
    balance = None if true_answers.shape[1] == 1 else (distances.argmin(-1) == 0).float().mean().item()
    return error, spread, balance


def run_probe(setting: ProbeSetting) -> ProbeResult:
    """Train one generator on the teacher's data and score it on conditions it never saw."""
    start = time.perf_counter()
    y_of = teacher()
    data = torch.Generator().manual_seed(1)
    train_c = torch.randn(TRAIN_CONDITIONS, CONDITION_DIM, generator=data)
    train_answers = answers(train_c, y_of, setting.bimodal)
    shown = torch.randint(train_answers.shape[1], (TRAIN_CONDITIONS,), generator=data)
    train_y = train_answers[torch.arange(TRAIN_CONDITIONS), shown]
    test_c = torch.randn(TEST_CONDITIONS, CONDITION_DIM, generator=torch.Generator().manual_seed(2))

    torch.manual_seed(setting.seed)
    net = generator_network()
    optimizer = torch.optim.AdamW(net.parameters(), lr=setting.learning_rate)
    loss_fn = DriftingLoss(setting.temperatures)
    draws = torch.Generator().manual_seed(setting.seed)
    for _ in range(setting.steps):
        idx = torch.randint(TRAIN_CONDITIONS, (BATCH_SIZE,), generator=draws)
        if setting.objective == "regression":
            loss = (generate(net, train_c[idx], torch.zeros(BATCH_SIZE, 1, ACTION_DIM))[:, 0] - train_y[idx]).square().mean()
        else:
            noise = torch.randn(BATCH_SIZE, setting.num_samples, ACTION_DIM, generator=draws)
            loss = loss_fn(generate(net, train_c[idx], noise), train_y[idx, None]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        if setting.objective == "regression":
            noise = torch.zeros(TEST_CONDITIONS, 1, ACTION_DIM)
        else:
            noise = torch.randn(TEST_CONDITIONS, SAMPLES_PER_TEST_CONDITION, ACTION_DIM, generator=draws)
        error, spread, balance = score(generate(net, test_c, noise), answers(test_c, y_of, setting.bimodal))
    return ProbeResult(setting, error, spread, balance, time.perf_counter() - start)


@dataclass(frozen=True)
class CheckpointScore:
    checkpoint: str
    method: str
    error: float
    spread: float
    observations: int

    def as_dict(self) -> dict:
        return asdict(self)


def held_out_batches(policy, batches: int = 6, batch_size: int = 64):
    """The first `batches` batches of the policy's run's val split, in one fixed shuffled order
    (the same observations for every run of one dataset)."""
    from torch.utils.data import DataLoader

    from drifting_vla.data.collate import collate_samples
    from drifting_vla.data.registry import build_dataset

    val = build_dataset(policy.cfg["data"], "val")
    loader = DataLoader(val, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=collate_samples)
    return zip(range(batches), loader, strict=False)


@torch.no_grad()
def score_checkpoint(path, batches: int = 6, batch_size: int = 64, samples: int = SAMPLES_PER_TEST_CONDITION) -> CheckpointScore:
    """`samples` chunks per held-out observation (`held_out_batches`), drawn as the rollouts draw
    them (`DriftingPolicy.predict_action_chunks`, batch `index` from a generator seeded `index`),
    scored against the expert chunk in normalized units. One sample's error is what the run logs
    as `val/action_mse`, on other observations."""
    from drifting_vla.inference.policy import DriftingPolicy

    policy = DriftingPolicy.from_checkpoint(path)
    normalize = policy.normalizer.normalize
    error_sum, spread_sum, count = 0.0, 0.0, 0
    for index, batch in held_out_batches(policy, batches, batch_size):
        chunks = torch.as_tensor(policy.predict_action_chunks(batch, samples, torch.Generator().manual_seed(index)))
        chunks, expert = normalize("actions", chunks), normalize("actions", batch["actions"].float())
        error, spread, _ = score(chunks.flatten(2), expert.flatten(1)[:, None])
        error_sum, spread_sum, count = error_sum + error * len(expert), spread_sum + spread * len(expert), count + len(expert)
    return CheckpointScore(str(path), policy.method, error_sum / count, spread_sum / count, count)
