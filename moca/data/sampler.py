"""Task-aware batching for Stage 2: every global batch comes from one subset, identically on every rank.

In-batch negatives only mean something when the documents of a batch come from the same task (captions
against captions, passages against passages). MoCa's paper claims task-homogeneous batches; its released code
does not enforce them. :class:`TaskBatchSampler` does, with no communication between ranks: the choice of the
subset at step ``s`` and the order of each subset's records are pure functions of ``(seed, s)`` and
``(seed, subset, epoch)``, so every rank computes the same global batch and takes its own contiguous slice.

* Subset of step s: drawn with probability proportional to its weight from ``random.Random(f"{seed}/step/{s}")``.
* Records of a subset: a permutation per epoch; each time the subset is drawn it hands out the next
  ``global_batch_size`` records. When fewer than that remain, the subset starts a new epoch (the tail is
  skipped this epoch and comes first in no particular way later: each epoch is a fresh permutation), so a
  batch never mixes epochs, never repeats a record, and never mixes subsets.
* Rank r of W takes records ``[r * b, (r + 1) * b)`` of the global batch, b = global_batch_size / W.

The state (step, per-subset epoch and cursor) is a small dict: a resumed run draws the same batches.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import List, Optional, Sequence


@dataclass
class TaskDraw:
    """One step's draw: the subset, the global batch (record indices within the subset) and this rank's share."""

    step: int
    subset: int
    name: str
    global_indices: List[int]
    indices: List[int]


class TaskBatchSampler:
    """Draws one subset per step and a global batch from it (see the module docstring).

    Args:
        sizes: number of records of each subset.
        weights: sampling weight of each subset (> 0; normalised here).
        global_batch_size: records per step over all ranks; a multiple of ``world_size`` and at most the
            size of every subset.
        world_size, rank: this process's place.
        seed: seeds the subset choices and the per-epoch orders.
        shuffle: permute each subset per epoch (else file order).
        names: subset names (for messages and draws).
    """

    def __init__(self, sizes: Sequence[int], weights: Optional[Sequence[float]], global_batch_size: int,
                 world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 names: Optional[Sequence[str]] = None):
        sizes = [int(s) for s in sizes]
        if not sizes:
            raise ValueError("TaskBatchSampler: no subsets")
        weights = [1.0] * len(sizes) if weights is None else [float(w) for w in weights]
        names = [f"subset{i}" for i in range(len(sizes))] if names is None else list(names)
        if len(weights) != len(sizes) or len(names) != len(sizes):
            raise ValueError(f"TaskBatchSampler: {len(sizes)} subsets but {len(weights)} weights and {len(names)} names")
        if any(not w > 0 for w in weights):
            raise ValueError(f"TaskBatchSampler: weights must be > 0, got {weights}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"TaskBatchSampler: bad rank {rank} of world size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(f"TaskBatchSampler: global_batch_size ({global_batch_size}) must be a positive multiple "
                             f"of the number of processes ({world_size})")
        small = [f"{n} ({s} records)" for n, s in zip(names, sizes) if s < global_batch_size]
        if small:
            raise ValueError(f"TaskBatchSampler: subsets smaller than the global batch of {global_batch_size}: "
                             f"{', '.join(small)}; a batch must come from one subset without repeating a record")
        self.sizes, self.names, self.seed, self.shuffle = sizes, names, seed, shuffle
        total = sum(weights)
        self.probs = [w / total for w in weights]
        self.global_batch_size, self.world_size, self.rank = global_batch_size, world_size, rank
        self.local_batch_size = global_batch_size // world_size
        self.step = 0
        self.epochs = [0] * len(sizes)
        self.cursors = [0] * len(sizes)
        self._orders: dict = {}

    def _order(self, subset: int, epoch: int) -> List[int]:
        key = (subset, epoch)
        if key not in self._orders:
            idx = list(range(self.sizes[subset]))
            if self.shuffle:
                random.Random(f"{self.seed}/subset/{subset}/epoch/{epoch}").shuffle(idx)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != subset}   # keep one epoch per subset
            self._orders[key] = idx
        return self._orders[key]

    def subset_of_step(self, step: int) -> int:
        """The subset drawn at ``step`` (a pure function of the seed and the step)."""
        rng = random.Random(f"{self.seed}/step/{step}")
        return rng.choices(range(len(self.sizes)), weights=self.probs)[0]

    def next(self) -> TaskDraw:
        """The next step's draw (advances the state)."""
        s = self.subset_of_step(self.step)
        G = self.global_batch_size
        if self.cursors[s] + G > self.sizes[s]:
            self.epochs[s] += 1
            self.cursors[s] = 0
        order = self._order(s, self.epochs[s])
        glob = order[self.cursors[s]:self.cursors[s] + G]
        self.cursors[s] += G
        b = self.local_batch_size
        draw = TaskDraw(self.step, s, self.names[s], glob, glob[self.rank * b:(self.rank + 1) * b])
        self.step += 1
        return draw

    def __iter__(self):
        while True:
            yield self.next()

    def state_dict(self) -> dict:
        return {"step": self.step, "epochs": list(self.epochs), "cursors": list(self.cursors), "seed": self.seed,
                "sizes": list(self.sizes), "global_batch_size": self.global_batch_size,
                "world_size": self.world_size, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        for key in ("sizes", "global_batch_size", "world_size", "rank", "seed"):
            mine = getattr(self, key)
            theirs = state.get(key, mine)
            if (list(theirs) if isinstance(mine, list) else theirs) != mine:
                raise ValueError(f"sampler state has {key}={theirs}, this run has {mine}: it belongs to another run")
        self.step = int(state["step"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.cursors = [int(c) for c in state["cursors"]]
