"""The finite-action guarantee: no NaN or infinite action reaches a robot or a simulator.

A network in float arithmetic can answer a finite observation with a chunk of NaN: a proprio of
1e20 (a sensor fault, a value in the wrong units) overflows the layers it passes through. So:

- the policy refuses proprio that its normalization cannot represent (`ProprioOutOfRange`, rule in
  `PROPRIO_LIMIT`), and checks every chunk it returns (`NonFiniteActions`), in the one method every
  inference path goes through (`DriftingPolicy.predict_action_chunks`);
- the server answers either with an error kind (`out_of_range`, `non_finite`) and goes on serving;
- the client and every chunk executor check each chunk they receive (`check_finite_chunk`);
- an evaluation ends the episode of the env concerned with the error in its record (an error, not a
  failure of the policy to do the task) and goes on with the others.

Both errors carry `rows`: the rows of the batch they concern, so a batched caller can end exactly
those episodes. Numpy only: the robot-side client imports it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PROPRIO_LIMIT = 1e3
"""The largest |normalized proprio| a policy accepts. The normalizer maps the training range of each
dimension to [-1, 1] (a constant dimension is only centred); a value a thousand half-ranges outside
it is no observation the robot was trained on (wrong units, a sensor fault), and far enough out
(1e20 raw) it overflows the network into NaN. Refused, never clipped: a clipped fault would move
the robot as if the reading were real."""


class PolicyRefusal(RuntimeError):
    """The policy cannot act on these rows of the batch; nothing was executed for any row."""

    def __init__(self, message: str, rows: Sequence[int] = (0,)) -> None:
        super().__init__(message)
        self.rows = [int(r) for r in rows]


class ProprioOutOfRange(PolicyRefusal, ValueError):
    """Proprio outside what the policy's normalization represents (`PROPRIO_LIMIT`)."""


class NonFiniteActions(PolicyRefusal):
    """A chunk holds NaN or infinite actions (the weights, or an input the checks let through)."""


def non_finite_rows(chunks: np.ndarray) -> list[int]:
    """The rows (first dim) of `chunks` [B, ...] that hold a NaN or an infinity."""
    chunks = np.asarray(chunks)
    return np.flatnonzero(~np.isfinite(chunks.reshape(len(chunks), -1)).all(axis=1)).tolist()


def check_finite_chunk(chunk: np.ndarray, where: str, row: int = 0) -> np.ndarray:
    """`chunk` [T, A] as given when every action is finite; else NonFiniteActions naming `where`
    (who produced it) for batch row `row`."""
    chunk = np.asarray(chunk)
    if chunk.dtype.kind not in "fiu":
        raise NonFiniteActions(f"{where} gave a chunk of dtype {chunk.dtype}, not numbers; nothing was executed", [row])
    if not np.isfinite(chunk).all():
        bad = np.argwhere(~np.isfinite(chunk))[0].tolist()
        raise NonFiniteActions(
            f"{where} gave a chunk with non-finite actions (first at index {bad}: {chunk[tuple(bad)]}); nothing "
            "was executed. Check the policy's weights and the observation that produced it", [row])
    return chunk
