"""Where each parameter lives in DeepSpeed ZeRO's flat fp32 partitions, on every rank.

A ZeRO optimizer group (ZeRO-3: sub-group) is one flat fp32 tensor per rank; torch's AdamW keeps its
moments for that flat tensor. To move an optimizer state to another world size or backend, the flat
tensors are translated to and from whole tensors per parameter. A `Segment` says that elements
[lo, hi) of a parameter's flattened tensor sit at `at` in rank `rank`'s flat tensor.

- ZeRO-2 lays a group's parameters end to end (each at its recorded offset) and splits that flat
  tensor into `world` nearly equal parts.
- ZeRO-3 pads each parameter to a multiple of `world` and gives rank r the r-th slice of each; a
  sub-group's flat tensor is those slices end to end.

Every translation is checked against the engine on the weights themselves (`check`): a layout that
disagrees with this DeepSpeed version is an error, never a silently scrambled optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    param: int      # index into FlatLayout.params
    lo: int         # in the parameter's flattened tensor
    hi: int
    at: int         # in the rank's flat tensor


@dataclass
class FlatLayout:
    """One flat tensor per rank for one optimizer (sub-)group."""

    group: str                       # optimizer group name
    params: list                     # the torch parameters, in DeepSpeed's order
    numels: list[int]                # whole sizes
    sizes: list[int]                 # flat size on each rank
    segments: list[list[Segment]]    # per rank

    def to_flat(self, whole: list[torch.Tensor], rank: int, like: torch.Tensor) -> torch.Tensor:
        """This rank's flat tensor, from whole per-parameter tensors (in `params` order)."""
        out = torch.zeros(self.sizes[rank], dtype=like.dtype, device=like.device)
        for s in self.segments[rank]:
            out[s.at:s.at + s.hi - s.lo] = whole[s.param].reshape(-1)[s.lo:s.hi].to(out.dtype)
        return out

    def from_flats(self, flats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole flattened tensors per parameter, from every rank's flat tensor."""
        whole = [torch.zeros(n, dtype=flats[0].dtype) for n in self.numels]
        for rank, segs in enumerate(self.segments):
            for s in segs:
                whole[s.param][s.lo:s.hi] = flats[rank][s.at:s.at + s.hi - s.lo].cpu()
        return whole


def zero2_layouts(zero_opt, group_names: list[str], world: int) -> list[FlatLayout]:
    out = []
    for i, params in enumerate(zero_opt.round_robin_bit16_groups):
        numels = [p.numel() for p in params]
        offsets = zero_opt.round_robin_bit16_offsets[i]
        sizes = [t.numel() for t in zero_opt.get_data_parallel_partitions(zero_opt.bit16_groups_flat[i], i)]
        starts = [sum(sizes[:r]) for r in range(world)]
        segments = []
        for r in range(world):
            lo_r, hi_r = starts[r], starts[r] + sizes[r]
            segs = []
            for j, (off, n) in enumerate(zip(offsets, numels)):
                lo, hi = max(off, lo_r), min(off + n, hi_r)
                if lo < hi:
                    segs.append(Segment(j, lo - off, hi - off, lo - lo_r))
            segments.append(segs)
        out.append(FlatLayout(group_names[i], list(params), numels, sizes, segments))
    return out


def zero3_layouts(zero_opt, group_names: list[str], world: int) -> list[FlatLayout]:
    out = []
    for i, params in enumerate(zero_opt.fp16_groups):
        numels = [p.ds_numel for p in params]
        parts = [p.partition_numel() for p in params]
        size = sum(parts)
        segments = []
        for r in range(world):
            segs, at = [], 0
            for j, (n, ps) in enumerate(zip(numels, parts)):
                lo, hi = min(r * ps, n), min((r + 1) * ps, n)
                if lo < hi:
                    segs.append(Segment(j, lo, hi, at))
                at += ps
            segments.append(segs)
        out.append(FlatLayout(group_names[zero_opt.sub_group_to_group_id[i]], list(params), numels, [size] * world,
                              segments))
    return out


def fp32_flats(zero_opt) -> list[torch.Tensor]:
    """This rank's flat fp32 master tensors, in the order of the layouts above."""
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):
        return list(zero_opt.fp32_partitioned_groups_flat)
    return list(zero_opt.single_partition_of_fp32_groups)


def layouts(zero_opt, group_names: list[str], world: int) -> list[FlatLayout]:
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):
        return zero3_layouts(zero_opt, group_names, world)
    return zero2_layouts(zero_opt, group_names, world)


def all_gather_flat(flat: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's flat tensor (sizes may differ by one element: padded for the collective, then cut)."""
    import torch.distributed as dist

    n = max(sizes)
    padded = torch.zeros(n, dtype=flat.dtype, device=flat.device)
    padded[:flat.numel()] = flat.detach()
    got = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(got, padded)
    return [g[:s] for g, s in zip(got, sizes)]
