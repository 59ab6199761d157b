"""DeepSpeed ZeRO specifics: building the engine for an unfreeze stage, and parameter checksums.

ZeRO keeps in its optimizer partitions only the parameters that are trainable when
`deepspeed.initialize` runs, and an empty parameter group crashes it. So each stage gets an
engine built over exactly its trainable groups; at a transition the fp32 master weights and
the Adam moments and step counts of groups already training are carried into the new engine,
per named optimizer group, as this rank's flat partitions (same group, same world size: same
layout). DeepSpeed's per-parameter fragment API links its Adam views lazily and failed across a
rebuild here, so it is not used.
"""

from __future__ import annotations

import torch

from ftdist import optim
from ftdist.unfreeze import apply_stage


def build(trainer, stage: int, first: bool):
    acc, r = trainer.acc, trainer.recipe
    carried = None
    if not first:
        carried = _collect(trainer)
        _teardown(trainer)
    net = trainer.net
    apply_stage(net, trainer.groups, trainer.schedule, stage)
    only = trainer.schedule.trainable_groups(stage)
    raw = optim.build_optimizer(optim.param_groups(net, trainer.groups, r.train, r.unfreeze, only), r.train)
    engine, ds_opt = acc.prepare(net, raw)
    if carried is not None:
        _restore(engine, raw, carried)
    return engine, ds_opt, raw


def _flats(zero_opt, inner) -> list[tuple[str, torch.Tensor]]:
    """(optimizer group name, flat fp32 master partition) for this rank, in ZeRO's order."""
    if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups map to param groups
        return [(inner.param_groups[zero_opt.sub_group_to_group_id[i]]["name"], flat)
                for i, flat in enumerate(zero_opt.fp32_partitioned_groups_flat)]
    return [(inner.param_groups[i]["name"], flat) for i, flat in enumerate(zero_opt.single_partition_of_fp32_groups)]


def _collect(trainer) -> dict:
    """Per named optimizer group: this rank's flat fp32 master partition(s) and their Adam state.

    A layer group's optimizer groups hold the same parameters in every stage, and the world size
    does not change, so ZeRO lays the rebuilt group's flat partitions out identically: the saved
    tensors go straight back in. (DeepSpeed's per-parameter fragment API only links the Adam
    views lazily and was not reliable across a rebuild here.)
    """
    inner = trainer.raw_optimizer
    out: dict[str, list] = {}
    for name, flat in _flats(trainer.model.optimizer, inner):
        state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state.get(flat, {}).items()}
        out.setdefault(name, []).append((flat.detach().clone(), state))
    return out


def _teardown(trainer) -> None:
    acc = trainer.acc
    engine = trainer.model
    acc._models.clear()
    acc._optimizers.clear()
    acc.deepspeed_engine_wrapped = None
    engine.destroy()
    trainer.model = trainer.optimizer = None


def _restore(engine, raw, carried) -> None:
    flats: dict[str, list] = {}
    for name, flat in _flats(engine.optimizer, raw):
        flats.setdefault(name, []).append(flat)
    for name, new in flats.items():
        saved = carried.get(name)
        if saved is None:
            continue  # newly unfrozen: fresh Adam state, exactly like torch AdamW's first step for it
        if len(saved) != len(new) or any(f.shape != d.shape for f, (d, _) in zip(new, saved)):
            raise RuntimeError(f"ZeRO rebuild: optimizer group {name} changed its partitioning")
        for flat, (data, state) in zip(new, saved):
            flat.data.copy_(data)
            if state:
                raw.state[flat] = state


def param_checksums(trainer) -> torch.Tensor:
    """float64 sum and sum of squares per parameter (full tensors, gathered under ZeRO-3)."""
    net = trainer.acc.unwrap_model(trainer.model)
    params = list(net.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return _sums(params)
    return _sums(params)


def _sums(params) -> torch.Tensor:
    out = torch.empty(2 * len(params), dtype=torch.float64)
    for i, p in enumerate(params):
        d = p.detach().double().cpu()
        out[2 * i], out[2 * i + 1] = d.sum(), (d * d).sum()
    return out.to(params[0].device)
