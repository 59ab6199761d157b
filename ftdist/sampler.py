"""Seeded global-batch sampling: the same examples in every optimizer step at every world size.

Why not accelerate's sharded sampler: it deals batches to ranks, so the set of examples in an
optimizer step changes with the world size and accumulation, and it can replay the wrong
permutation on resume (accelerate #4233). Here the unit is the *global batch* (the examples of
one optimizer step). It is a pure function of (seed, epoch, step), cut into world x accum
micro-batches, and rank r takes micro-batches r, r+world, ... So 1 process x accum 4 and
2 processes x accum 2 see exactly the same examples per step, and resuming at step k of an
epoch is just starting the same list at k.

The last global batch of an epoch may be short. It is split as evenly as possible; a rank whose
micro-batch would be empty gets one placeholder example with real=False, which contributes
zero loss but keeps every rank running the same number of forward/backward passes (an
uneven count hangs the collectives).
"""

from __future__ import annotations

import numpy as np

MEGA_BATCHES = 50  # length grouping sorts within windows of 50 global batches, like HF's LengthGroupedSampler


def global_batches(lengths, global_batch: int, seed: int, epoch: int, group_by_length: bool,
                   weights=None) -> list[list[int]]:
    """Every index exactly once, cut into global batches, for one epoch.

    With `weights` (oversampling), the epoch is instead len(lengths) draws with replacement,
    probability proportional to the weight: still a pure function of (seed, epoch), so every rank
    computes the same epoch and takes disjoint micro-batches of it.
    """
    rng = np.random.default_rng([seed, epoch])
    if weights is None:
        perm = rng.permutation(len(lengths))
    else:
        w = np.asarray(weights, dtype=np.float64)
        perm = rng.choice(len(lengths), size=len(lengths), replace=True, p=w / w.sum())
    if not group_by_length:
        return [perm[i:i + global_batch].tolist() for i in range(0, len(perm), global_batch)]
    lengths = np.asarray(lengths)
    window = global_batch * MEGA_BATCHES
    batches = []
    for start in range(0, len(perm), window):
        chunk = perm[start:start + window]
        # stable sort, longest first: ties keep the random order
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches += [chunk[i:i + global_batch].tolist() for i in range(0, len(chunk), global_batch)]
    full = [b for b in batches if len(b) == global_batch]
    short = [b for b in batches if len(b) < global_batch]
    order = rng.permutation(len(full))
    # the short batch (at most one) goes last so that every other step has a full global batch
    return [full[i] for i in order] + short


def split_global_batch(batch: list[int], n_chunks: int) -> list[list[tuple[int, bool]]]:
    """Cut one global batch into n_chunks micro-batches of near-equal size; pad empties with a placeholder."""
    parts = np.array_split(np.asarray(batch, dtype=np.int64), n_chunks)
    out = []
    for p in parts:
        out.append([(int(i), True) for i in p] if len(p) else [(int(batch[0]), False)])
    return out


class GlobalBatchSampler:
    """Batch sampler for one rank: yields micro-batches of (index, real) pairs, accum per optimizer step."""

    def __init__(self, lengths, per_device: int, accum: int, world: int, rank: int, seed: int,
                 group_by_length: bool = True, weights=None):
        self.lengths = list(lengths)
        self.weights = weights
        self.per_device, self.accum, self.world, self.rank = per_device, accum, world, rank
        self.global_batch = per_device * accum * world
        self.seed, self.group_by_length = seed, group_by_length
        self.epoch, self.start_step = 0, 0

    def steps_per_epoch(self) -> int:
        return -(-len(self.lengths) // self.global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def batches(self) -> list[list[int]]:
        return global_batches(self.lengths, self.global_batch, self.seed, self.epoch, self.group_by_length, self.weights)

    def __iter__(self):
        for batch in self.batches()[self.start_step:]:
            chunks = split_global_batch(batch, self.world * self.accum)
            for a in range(self.accum):
                yield chunks[a * self.world + self.rank]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start_step) * self.accum

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "start_step": self.start_step, "seed": self.seed}


def balanced_weights(labels) -> np.ndarray:
    """Per-example weight 1/count(label): every class is drawn equally often in expectation."""
    labels = np.asarray(labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for one rank's optimizer step (its dropout masks): independent streams for every
    (seed, step, rank)."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
