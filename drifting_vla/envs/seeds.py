"""Which env seeds an evaluation runs: the data config's evaluation seeds (or the ones asked for),
never a seed its demonstrations were collected on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def evaluation_seeds(data_cfg: Mapping, episodes: int | None = None, seeds: Mapping | None = None,
                     range_key: str = "data.eval_seeds") -> list[int]:
    """The first `episodes` (default: all) of the seed range `seeds` ({start, count}: seeds start ..
    start + count - 1; default `data.eval_seeds`), refusing any seed of `data.train_seeds`: a policy
    is never scored on the episodes it was trained on. Errors name the keys that set the range:
    `seeds.start` / `seeds.count` (scripts/simulate_eval.py) when `seeds` is given, else `range_key`
    (`data.simulator.eval_seeds` when the range comes from a dataset's simulator)."""
    if seeds is None and not data_cfg.get("eval_seeds"):
        raise KeyError("the data config has no eval_seeds: set data.eval_seeds={start: S, count: N} (the seeds S .. S+N-1, "
                       "apart from data.train_seeds), or evaluate a checkpoint on seeds of your choice with "
                       "scripts/simulate_eval.py seeds.start=S seeds.count=N")
    key = "seeds" if seeds is not None else range_key
    chosen = seeds if seeds is not None else data_cfg["eval_seeds"]
    start, count = int(chosen["start"]), int(chosen["count"])
    episodes = count if episodes is None else int(episodes)
    if not 1 <= episodes <= count:
        more = "raise seeds.count" if seeds is not None else (
            f"raise {key}.count, or give scripts/simulate_eval.py a range of its own with seeds.start=S seeds.count=N")
        raise ValueError(f"episodes={episodes} per task, but {key}.count={count} gives {count} seeds; lower episodes or {more}")
    chosen_seeds = list(range(start, start + episodes))
    overlap = training_seeds_among(chosen_seeds, data_cfg)
    if overlap:
        train = data_cfg["train_seeds"]
        first, last = int(train["start"]), int(train["start"]) + int(train["count"]) - 1
        shown = ", ".join(map(str, overlap[:5])) + (f", ... ({len(overlap)} in all)" if len(overlap) > 5 else "")
        raise ValueError(
            f"evaluation seeds {shown} are training seeds (data.train_seeds: {first} .. {last}), and a policy is never "
            f"evaluated on the episodes it was trained on: move {key}.start to {last + 1} or above"
            + (f", or end the range below {first}" if first > 0 else "")
        )
    return chosen_seeds


def training_seeds_among(seeds: Sequence[int], data_cfg: Mapping) -> list[int]:
    """The seeds of `seeds` that `data.train_seeds` ({start, count}) holds; [] without it."""
    train = data_cfg.get("train_seeds")
    if not train:
        return []
    first, count = int(train["start"]), int(train["count"])
    return [s for s in seeds if first <= s < first + count]
