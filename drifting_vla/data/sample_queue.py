"""A queue of expert action chunks per task: extra positives for the drifting loss.

The drifting loss compares generated samples with positive (expert) samples of the same
condition. With one expert chunk per observation in a batch, a per-task queue of recent expert
chunks supplies more positives for the same task (as the class-conditional queues of the
drifting paper do per class):

    queue = SampleQueue(capacity_per_task=256)
    queue.push(batch["task"], batch["actions"], batch["action_mask"])   # after each batch
    extra = queue.sample(batch["task"], k=8)                           # [B, k, T, A]
"""

from __future__ import annotations

import torch


class SampleQueue:
    """Fixed-size FIFO of action chunks [T, A] per task, kept on one device."""

    def __init__(self, capacity_per_task: int = 256, device: str | torch.device = "cpu") -> None:
        if capacity_per_task < 1:
            raise ValueError(f"capacity_per_task must be >= 1, got {capacity_per_task}")
        self.capacity = capacity_per_task
        self.device = torch.device(device)
        self._chunks: dict[str, torch.Tensor] = {}
        self._count: dict[str, int] = {}

    def push(self, tasks: list[str], actions: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add chunks actions [B, T, A]; with mask [B, T], only chunks with no padded steps."""
        actions = actions.detach().to(self.device)
        keep = torch.ones(len(tasks), dtype=torch.bool) if mask is None else mask.all(dim=1).cpu()
        for i, task in enumerate(tasks):
            if not keep[i]:
                continue
            if task not in self._chunks:
                self._chunks[task] = actions.new_zeros((self.capacity, *actions.shape[1:]))
                self._count[task] = 0
            self._chunks[task][self._count[task] % self.capacity] = actions[i]
            self._count[task] += 1

    def size(self, task: str) -> int:
        return min(self._count.get(task, 0), self.capacity)

    def sample(self, tasks: list[str], k: int, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """k chunks per task, drawn with replacement: [B, k, T, A]. Every task must hold one.
        `uniform` [B, k] in [0, 1) picks them (the trainer draws it with the step's other random
        inputs, so a resumed or multi-rank run picks the same); None draws it here."""
        empty = sorted({t for t in tasks if self.size(t) == 0})
        if empty:
            raise ValueError(f"SampleQueue holds no chunks yet for task(s) {empty}; push a batch first")
        uniform = torch.rand(len(tasks), k) if uniform is None else uniform.cpu()
        out = []
        for task, u in zip(tasks, uniform, strict=True):
            idx = (u * self.size(task)).long().clamp_max(self.size(task) - 1)
            out.append(self._chunks[task][idx.to(self.device)])
        return torch.stack(out)

    def state_dict(self) -> dict:
        """The queued chunks and write positions, for checkpoints (tensors and ints only)."""
        return {"chunks": dict(self._chunks), "count": dict(self._count)}

    def load_state_dict(self, state: dict) -> None:
        self._chunks = {task: chunks.to(self.device) for task, chunks in state["chunks"].items()}
        self._count = {task: int(n) for task, n in state["count"].items()}
