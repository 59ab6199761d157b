"""DeepSpeed ZeRO specifics: building the engine for an unfreeze stage, and parameter checksums.

ZeRO keeps in its optimizer partitions only the parameters that are trainable when
`deepspeed.initialize` runs, and an empty parameter group crashes it. So each stage gets an
engine built over exactly its trainable groups; at a transition the fp32 master weights and
the Adam moments and step counts of groups already training are carried into the new engine
through DeepSpeed's tensor-fragment API (safe_get/set_full_*), which works for ZeRO-1/2/3.
"""

from __future__ import annotations

import torch

from ftdist import optim
from ftdist.unfreeze import apply_stage

OPT_KEYS = ("exp_avg", "exp_avg_sq")


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


def _named_trainable(engine):
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def _collect(trainer) -> dict:
    """Full fp32 weights and Adam state of every trainable parameter, plus each group's step count."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = trainer.model
    params, steps = {}, {}
    for name, p in _named_trainable(engine):
        params[name] = {"fp32": safe_get_full_fp32_param(p).detach().cpu().clone()}
        for key in OPT_KEYS:
            value = safe_get_full_optimizer_state(p, key)
            if value is not None:
                params[name][key] = value.detach().cpu().clone()
    inner = trainer.raw_optimizer
    for g in inner.param_groups:
        for flat in g["params"]:
            step = inner.state.get(flat, {}).get("step")
            if step is not None:
                steps[g["name"]] = step.clone() if torch.is_tensor(step) else step
    return {"params": params, "steps": steps}


def _teardown(trainer) -> None:
    acc = trainer.acc
    engine = trainer.model
    acc._models.clear()
    acc._optimizers.clear()
    acc.deepspeed_engine_wrapped = None
    engine.destroy()
    trainer.model = trainer.optimizer = None


def _restore(engine, raw, carried) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    saved = carried["params"]
    for name, p in _named_trainable(engine):
        if name not in saved:
            continue  # newly unfrozen: fresh Adam state, like torch's AdamW on its first step
        safe_set_full_fp32_param(p, saved[name]["fp32"].to(p.device if p.numel() else "cpu"))
        for key in OPT_KEYS:
            if key in saved[name]:
                safe_set_full_optimizer_state(p, saved[name][key], key)
    for g in raw.param_groups:
        step = carried["steps"].get(g["name"])
        if step is None:
            continue
        for flat in g["params"]:
            if flat in raw.state:
                raw.state[flat]["step"] = step.clone() if torch.is_tensor(step) else step


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
