"""Neighbour positives: the index finds true nearest neighbours of the same task in the training
split only, and their chunks enter each observation's own drift problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from drifting_vla.data.collate import collate_samples
from drifting_vla.data.neighbours import NeighbourIndex, NeighbourPositives
from drifting_vla.formats.validation import training_config
from drifting_vla.objectives.losses import DriftingLoss
from drifting_vla.objectives.methods import build_objective

STEPS = 6


class ToyDemos(Dataset):
    """Episodes on known points: step t of an episode with offset o has proprio (o + t, 0) and
    blank images, so the descriptor distance is |o + t - o' - t'| (scaled). Every action of the
    chunk is 100 e + t: a test reads which episode e and step t a positive came from."""

    def __init__(self, episodes: list[tuple[str, int, float]]) -> None:
        self.rows = [(task, e, offset, t) for task, e, offset in episodes for t in range(STEPS)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        task, e, offset, t = self.rows[i]
        return {
            "images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
            "proprio": torch.tensor([offset + t, 0.0]),
            "instruction": task,
            "actions": torch.full((2, 2), 100.0 * e + t),
            "action_mask": torch.ones(2, dtype=torch.bool),
            "task": task,
        }

    def episode_ids(self) -> np.ndarray:
        return np.array([e for _, e, _, _ in self.rows])

    def row(self, e: int, t: int) -> int:
        return next(i for i, (_, ep, _, step) in enumerate(self.rows) if (ep, step) == (e, t))


# Task "a": episodes 0, 1, 2 at offsets 0, 0.1, 0.3. Task "b" at offset 0.05 would be nearer to
# episode 0 than episode 1 is, were tasks mixed.
TRAIN = [("a", 0, 0.0), ("a", 1, 0.1), ("a", 2, 0.3), ("b", 3, 0.05), ("b", 4, 0.5)]


def codes(chunks: torch.Tensor) -> list[int]:
    """The 100 e + t code of each chunk [n, T, A]."""
    return [int(c) for c in chunks[:, 0, 0]]


def test_index_returns_the_nearest_observations_of_the_same_task_from_other_episodes():
    data = ToyDemos(TRAIN)
    index = NeighbourIndex(data, k=3)
    neighbours = index.neighbours()
    # Episode 0, step 2 (at 2.0): episode 1 step 2 (2.1), episode 2 step 2 (2.3), episode 2 step 1 (1.3).
    assert codes(index.chunks[neighbours[data.row(0, 2)]]) == [102, 202, 201]
    # Episode 3 of task b, step 0 (at 0.05): only task b's other episode, step 0 (0.5), then 1 (1.5), 2 (2.5).
    assert codes(index.chunks[neighbours[data.row(3, 0)]]) == [400, 401, 402]


def test_with_the_own_episode_allowed_an_observation_is_still_never_its_own_neighbour():
    data = ToyDemos(TRAIN)
    index = NeighbourIndex(data, k=2, exclude_own_episode=False)
    # Episode 0, step 2 (2.0): episode 1 step 2 (2.1), then episode 2 step 2 (2.3); its own steps 1, 3 are 1.0 away.
    assert codes(index.chunks[index.neighbours()[data.row(0, 2)]]) == [102, 202]
    index = NeighbourIndex(ToyDemos([("a", 0, 0.0)]), k=2, exclude_own_episode=False)
    assert codes(index.chunks[index.neighbours()[2]]) in ([1, 3], [3, 1])


def test_index_agrees_with_brute_force_on_random_observations():
    gen = torch.Generator().manual_seed(0)

    class Random(ToyDemos):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            item["proprio"] = torch.rand(3, generator=gen)
            item["images"] = torch.randint(0, 256, (2, 3, 16, 16), generator=gen, dtype=torch.uint8)
            return item

    data = Random([(task, e, 0.0) for e, task in enumerate("aabbbcc")])
    index = NeighbourIndex(data, k=4)
    tasks, episodes = np.array([r[0] for r in data.rows]), data.episode_ids()
    distances = torch.cdist(index.embeddings, index.embeddings)
    for i, found in enumerate(index.neighbours()):
        allowed = torch.from_numpy((tasks == tasks[i]) & (episodes != episodes[i]))
        expected = distances[i].masked_fill(~allowed, float("inf")).sort().values[:4]
        torch.testing.assert_close(distances[i, found], expected)
        assert allowed[found].all()


def test_only_training_episodes_are_ever_positives():
    train = ToyDemos(TRAIN)
    val = ToyDemos([("a", 9, 0.02), ("b", 8, 0.06)])
    objective = build_objective(training_config(OmegaConf.create({"drifting": {"positives": {"source": "neighbours", "k": 2}}})))
    train_set, val_set = objective.training_datasets(train, val)
    train_episodes = {e for _, e, _ in TRAIN}
    for dataset in (train_set, val_set):
        for i in range(len(dataset)):
            assert {code // 100 for code in codes(dataset[i]["neighbour_actions"])} <= train_episodes
    # A validation observation gets its nearest training observations: episode 9 step 2 (2.02) -> 2, 102.
    assert codes(val_set[val.row(9, 2)]["neighbour_actions"]) == [2, 102]


def test_too_few_candidates_is_an_error_naming_the_keys():
    with pytest.raises(ValueError, match="exclude_own_episode"):
        NeighbourIndex(ToyDemos([("a", 0, 0.0), ("a", 1, 0.1)]), k=STEPS + 1).neighbours()


class FixedSamples(torch.nn.Module):
    """A 'network' whose chunks are given: the field then depends on the positives alone."""

    def __init__(self, samples: torch.Tensor) -> None:
        super().__init__()
        self.samples = samples

    def forward(self, obs, noise):
        return self.samples

    def to_actions(self, x):
        return x


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_neighbour_chunks_enter_each_observations_own_drift_problem(weight):
    positives = {"source": "neighbours", "k": 2, "weight": weight}
    objective = build_objective(training_config(OmegaConf.create({"num_samples": 4, "drifting": {"positives": positives}})))
    data, _ = objective.training_datasets(ToyDemos(TRAIN), None)
    rows = [data.row(0, 2), data.row(3, 0)]
    batch = collate_samples([data[i] for i in rows])
    actions = batch["actions"] / 500  # any scaling, as long as the positives get the same
    obs = {"task": batch["task"], "neighbour_actions": batch["neighbour_actions"] / 500}
    samples = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0)) * 0.1
    out = objective(FixedSamples(samples), obs, actions, objective.training_inputs(2, 2, 2, torch.Generator()))

    known = torch.tensor([[102.0, 202.0], [400.0, 401.0]])[..., None, None].expand(2, 2, 2, 2) / 500
    # The objective's own loss (the configured temperatures), fed the expert and its neighbours by hand.
    expected = objective.loss(samples, torch.cat([actions[:, None], known], 1), pos_weight=torch.tensor([1.0, weight, weight]))
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.metrics["lambda_V"], expected.metrics["lambda_V"])
    alone = objective.loss(samples, actions[:, None])
    assert not torch.allclose(out.loss, alone.loss)


def test_a_lighter_extra_positive_pulls_the_samples_less():
    samples = torch.randn(1, 8, 1, generator=torch.Generator().manual_seed(0)) * 0.1
    positives = torch.tensor([[[0.0], [1.0]]])  # the expert at 0, a neighbour at 1
    pull = [
        float(DriftingLoss(grouping="chunk")(samples, positives, pos_weight=torch.tensor([1.0, w])).raw_field.mean())
        for w in (1.0, 0.25)
    ]
    assert pull[0] > pull[1]


def test_missing_neighbour_chunks_in_a_batch_is_an_error():
    objective = build_objective(training_config(OmegaConf.create({"num_samples": 4, "drifting": {"positives": {"source": "neighbours"}}})))
    inputs = objective.training_inputs(1, 2, 2, torch.Generator())
    with pytest.raises(ValueError, match="training_datasets"):
        objective(FixedSamples(torch.zeros(1, 4, 2, 2)), {"task": ["a"]}, torch.zeros(1, 2, 2), inputs)




def test_neighbour_table_survives_a_checkpoint_and_refuses_another_shape():
    objective = build_objective(training_config(OmegaConf.create({"drifting": {"positives": {"source": "neighbours", "k": 2}}})))
    train, _ = objective.training_datasets(ToyDemos(TRAIN), None)
    saved = {key: value.flip(1) for key, value in objective.state_dict().items()}
    objective.load_state_dict(saved)
    assert torch.equal(train.neighbours, saved["neighbours"])
    with pytest.raises(ValueError, match="positives.k"):
        objective.load_state_dict({"neighbours": saved["neighbours"][:, :1]})
    assert isinstance(train, NeighbourPositives)
