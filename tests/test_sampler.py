"""The global-batch sampler: every example once per epoch, the same steps at every world size, exact resume."""

from __future__ import annotations

import numpy as np
import pytest

from ftdist.sampler import GlobalBatchSampler, global_batches, split_global_batch


def long_tailed(n: int, seed: int = 0) -> list[int]:
    """Token lengths like real text: most short, a few very long."""
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(3.0, 0.8, n), 3, 512)]


def ranks(n: int, per_device: int, accum: int, world: int, seed: int = 1, group: bool = True, epoch: int = 0,
          start: int = 0, lengths=None) -> list[list[list[tuple[int, bool]]]]:
    """For each rank, its list of micro-batches for the epoch."""
    lengths = long_tailed(n) if lengths is None else lengths
    out = []
    for r in range(world):
        s = GlobalBatchSampler(lengths, per_device, accum, world, r, seed, group)
        s.set_epoch(epoch, start)
        out.append(list(s))
    return out


def steps(per_rank: list, accum: int) -> list[list[tuple[int, bool]]]:
    """Regroup per-rank micro-batches into optimizer steps: all (index, real) items of each step."""
    n_steps = len(per_rank[0]) // accum
    return [[item for mbs in per_rank for mb in mbs[k * accum:(k + 1) * accum] for item in mb] for k in range(n_steps)]


def real_ids(step_items) -> list[int]:
    return [i for i, real in step_items if real]


# ------------------------------------------------------------------ coverage

@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n, g", [(100, 16), (97, 16), (16, 16), (5, 16), (1000, 7), (2000, 8)])
def test_global_batches_cover_every_index_once(n, g, group):
    lengths = long_tailed(n)
    batches = global_batches(lengths, g, seed=3, epoch=0, group_by_length=group)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert len(batches) == -(-n // g)
    assert all(len(b) == g for b in batches[:-1])  # only the last one may be short
    assert len(batches[-1]) == (n % g or g)


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("per_device, accum, world", [(4, 1, 1), (4, 4, 1), (3, 2, 2), (2, 1, 4), (5, 3, 3)])
def test_sampler_yields_every_example_once_per_epoch(per_device, accum, world, group):
    n = 103  # not divisible by any of the global batches above
    per_rank = ranks(n, per_device, accum, world, group=group)
    real = [i for mbs in per_rank for mb in mbs for i, ok in mb if ok]
    assert sorted(real) == list(range(n))
    # every rank runs the same number of micro-batches, accum per step
    assert len({len(m) for m in per_rank}) == 1
    g = per_device * accum * world
    assert len(per_rank[0]) == -(-n // g) * accum
    s = GlobalBatchSampler(long_tailed(n), per_device, accum, world, 0, 1, group)
    assert len(s) == len(per_rank[0]) and s.steps_per_epoch() == -(-n // g)


# ------------------------------------------------------------------ determinism

@pytest.mark.parametrize("group", [False, True])
def test_same_seed_and_epoch_same_order(group):
    lengths = long_tailed(500)
    a = global_batches(lengths, 16, seed=5, epoch=2, group_by_length=group)
    b = global_batches(list(lengths), 16, seed=5, epoch=2, group_by_length=group)
    assert a == b
    assert global_batches(lengths, 16, seed=5, epoch=3, group_by_length=group) != a
    assert global_batches(lengths, 16, seed=6, epoch=2, group_by_length=group) != a


def test_sampler_epoch_changes_order():
    lengths = long_tailed(200)
    s = GlobalBatchSampler(lengths, 4, 2, 1, 0, seed=9)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(0)
    assert list(s) == e0  # iterating again replays the epoch
    s.set_epoch(1)
    e1 = list(s)
    assert e1 != e0
    assert sorted(i for mb in e1 for i, _ in mb) == sorted(i for mb in e0 for i, _ in mb)


# ------------------------------------------------------------------ world-size invariance

@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("n", [160, 171])
def test_step_contents_do_not_depend_on_world_and_accumulation(n, group):
    layouts = [(4, 4, 1), (4, 2, 2), (4, 1, 4)]  # per_device, accum, world: global batch 16 each
    per_layout = []
    for per_device, accum, world in layouts:
        st = steps(ranks(n, per_device, accum, world, seed=11, group=group), accum)
        per_layout.append([sorted(real_ids(s)) for s in st])
    assert per_layout[0] == per_layout[1] == per_layout[2]
    assert len(per_layout[0]) == -(-n // 16)
    batches = global_batches(long_tailed(n), 16, seed=11, epoch=0, group_by_length=group)
    assert per_layout[0] == [sorted(b) for b in batches]


def test_micro_batches_are_per_device_sized_on_full_steps():
    per_rank = ranks(160, 4, 2, 2)
    for mbs in per_rank:
        assert all(len(mb) == 4 and all(ok for _, ok in mb) for mb in mbs)


# ------------------------------------------------------------------ the short last batch

def test_split_global_batch_placeholders_only_when_needed():
    assert split_global_batch([5, 6, 7, 8], 4) == [[(5, True)], [(6, True)], [(7, True)], [(8, True)]]
    parts = split_global_batch([5, 6], 4)
    assert parts == [[(5, True)], [(6, True)], [(5, False)], [(5, False)]]
    parts = split_global_batch(list(range(10)), 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert all(ok for p in parts for _, ok in p)


@pytest.mark.parametrize("n, per_device, accum, world", [
    (16 * 3 + 2, 4, 2, 2),   # last step has 2 examples for 4 micro-batches: 2 placeholders
    (16 * 3 + 5, 4, 2, 2),   # 5 examples for 4 micro-batches: no placeholder
    (16 * 3 + 1, 4, 1, 4),
    (16 * 3 + 3, 2, 8, 1),
])
def test_short_last_batch(n, per_device, accum, world):
    per_rank = ranks(n, per_device, accum, world)
    assert len({len(m) for m in per_rank}) == 1  # same number of forward passes on every rank
    last = [mb for mbs in per_rank for mb in mbs[-accum:]]
    short = n % (per_device * accum * world)
    n_chunks = accum * world
    placeholders = [item for mb in last for item in mb if not item[1]]
    assert len(placeholders) == max(0, n_chunks - short)
    assert all(len(mb) >= 1 for mb in last)
    # placeholders never come with real examples in the same micro-batch, and only in the last step
    assert all(all(ok for _, ok in mb) or len(mb) == 1 for mb in last)
    earlier = [item for mbs in per_rank for mb in mbs[:-accum] for item in mb]
    assert all(ok for _, ok in earlier)
    # real items of the last step: exactly the short remainder, each once
    assert len(real_ids([i for mb in last for i in mb])) == short
    # sizes of the micro-batches of the short step differ by at most one
    sizes = [sum(ok for _, ok in mb) for mb in last]
    assert max(sizes) - min(sizes) <= 1


# ------------------------------------------------------------------ resume

@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_resume_yields_the_tail_of_the_epoch(k, group):
    lengths = long_tailed(203)
    for world in (1, 2):
        for rank in range(world):
            s = GlobalBatchSampler(lengths, 4, 2, world, rank, seed=4, group_by_length=group)
            s.set_epoch(3)
            full = list(s)
            s2 = GlobalBatchSampler(lengths, 4, 2, world, rank, seed=4, group_by_length=group)
            s2.set_epoch(3, k)
            tail = list(s2)
            assert tail == full[k * 2:]
            assert len(s2) == len(tail)
            assert s2.state_dict() == {"epoch": 3, "start_step": k, "seed": 4}


def test_resume_at_the_end_of_an_epoch_yields_nothing():
    s = GlobalBatchSampler(long_tailed(64), 4, 2, 1, 0, seed=1)
    s.set_epoch(0, s.steps_per_epoch())
    assert list(s) == [] and len(s) == 0


# ------------------------------------------------------------------ length grouping

def padded_tokens(per_rank, lengths) -> int:
    """Tokens a dynamic-padding collator computes on: max length x size, summed over micro-batches."""
    return sum(max(lengths[i] for i, _ in mb) * len(mb) for mbs in per_rank for mb in mbs)


def test_length_grouping_reduces_padding():
    lengths = long_tailed(4000, seed=2)
    grouped = padded_tokens(ranks(4000, 8, 2, 2, group=True, lengths=lengths), lengths)
    shuffled = padded_tokens(ranks(4000, 8, 2, 2, group=False, lengths=lengths), lengths)
    real = sum(lengths)
    assert grouped < 0.75 * shuffled
    assert real <= grouped  # padding can only add
    # grouped batches are close to the real token count: little padding left
    assert grouped < 1.25 * real


def test_length_grouping_keeps_batches_random_across_epochs():
    lengths = long_tailed(2000, seed=3)
    a = global_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    b = global_batches(lengths, 16, seed=0, epoch=1, group_by_length=True)
    assert a != b
    # the longest batch is not always first: full batches are shuffled after sorting
    firsts = [max(lengths[i] for i in global_batches(lengths, 16, 0, e, True)[0]) for e in range(5)]
    assert len(set(firsts)) > 1
