"""`data.skip_corrupt=true`: train past damaged episode files, and still resume exactly.

Datasets check what they can cheaply when they open (RLBench: every pickle, each camera's folder
and last frame; LeRobot: every data file, each episode's rows and that its videos exist), and with
`skip_corrupt` they leave out the episodes that fail. A frame damaged in the middle of an episode
is found only when a sample decodes it, perhaps at step 53 of training; checking every frame when
the dataset opens would decode the whole dataset at every start (RLBench 18 tasks: about a million
PNGs).

So a sample whose files cannot be read is replaced where it is found:

    dataset[key] raises CorruptEpisodeError  ->  dataset[j], j drawn from sample_rng(key)
                                                 (the next draw while j is damaged too)

The replacement is a function of the key (seed, epoch, index) and of the files alone, never of what
this process happened to read before: the killed run and its resume, every loader worker and every
rank replace the same sample by the same one, so a resume stays bit-identical. Each damaged file
is reported once per process with what to do about it; the sample it belonged to is skipped for
the whole run.
"""

from __future__ import annotations

import logging

from torch.utils.data import Dataset

from drifting_vla.data.interface import DemoDataset
from drifting_vla.data.rlbench_pickle import CorruptEpisodeError
from drifting_vla.data.sampler import SampleKey, sample_rng

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 32
"""Draws before giving up: with a tenth of the samples damaged, 32 draws all damaged happen once
in 10^32; a failure here means most of the data is damaged, which no skipping should hide."""


class SkipCorruptSamples(Dataset):
    """The wrapped dataset, with each sample whose files are damaged replaced by a readable one."""

    def __init__(self, dataset: DemoDataset) -> None:
        self.dataset = dataset
        self.reported: set[str] = set()  # this process's damaged files, each logged once

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict:
        try:
            return self.dataset[key]
        except CorruptEpisodeError as error:
            self._report(key, error)
        draws, draw = sample_rng(key), getattr(key, "draw", 0)
        for _ in range(MAX_REPLACEMENTS):
            replacement = SampleKey(int(draws.integers(len(self.dataset))), draw)
            try:
                return self.dataset[replacement]
            except CorruptEpisodeError as error:
                self._report(replacement, error)
                last = error
        raise CorruptEpisodeError(
            f"sample {int(key)} and {MAX_REPLACEMENTS} replacements drawn for it all have damaged files (the last: "
            f"{last}): most of the data is damaged. Download or export it again."
        )

    def _report(self, key: int, error: CorruptEpisodeError) -> None:
        if str(error) not in self.reported:
            self.reported.add(str(error))
            log.warning("data.skip_corrupt=true: sample %d is replaced by another (the same in every run): %s",
                        int(key), error)

    def __getattr__(self, name: str):
        """all_actions(), all_proprio(), all_instructions(), ...: the wrapped dataset's."""
        if name in ("dataset", "reported"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
