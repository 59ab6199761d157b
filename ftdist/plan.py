"""What a recipe means on a given world: global batch -> per-device batch x accumulation x world size.

Computed in one place, printed at start and saved in the run folder, so a user always knows
what batch the optimizer saw. The global batch is fixed by the recipe; scale changes only the
accumulation, never the batch the optimizer sees. `describe` and `render` are the one plan that
training (plan.json and the console) and the dry run print.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ftdist.config import TrainConfig
from ftdist.errors import RecipeError


@dataclass
class Plan:
    world_size: int
    num_nodes: int
    procs_per_node: int
    per_device_batch: int
    accumulation: int
    global_batch: int

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"world size        {self.world_size} ({self.num_nodes} node(s) x {self.procs_per_node} process(es))",
            f"per-device batch  {self.per_device_batch}",
            f"accumulation      {self.accumulation}",
            f"global batch      {self.global_batch} = {self.per_device_batch} x {self.accumulation} x {self.world_size}",
        ]


def valid_choices(global_batch: int, world: int) -> tuple[list[int], list[int]]:
    """Per-device batches that divide, and global batches near the asked one that divide for some per-device batch."""
    per_device = [b for b in range(1, global_batch + 1) if global_batch % (b * world) == 0]
    globals_ = sorted({g for g in range(world, 4 * global_batch + 1, world)}, key=lambda g: abs(g - global_batch))[:4]
    return per_device, sorted(globals_)


def resolve(train: TrainConfig, world_size: int, num_nodes: int = 1) -> Plan:
    g, b = train.global_batch_size, train.per_device_batch_size
    if g % (b * world_size):
        per_device, globals_ = valid_choices(g, world_size)
        hint = (f"per_device_batch_size in {per_device[-6:]}" if per_device
                else f"a global_batch_size that is a multiple of the world size, e.g. {globals_}")
        raise RecipeError(
            f"train.global_batch_size: {g} is not divisible by per_device_batch_size {b} x world size {world_size} "
            f"= {b * world_size}, so gradient accumulation would not be a whole number. Use {hint}")
    if num_nodes < 1 or world_size % num_nodes:
        raise RecipeError(f"world size {world_size} is not a multiple of the node count {num_nodes}; "
                          "give the same number of processes on every node")
    return Plan(world_size, num_nodes, world_size // num_nodes, b, g // (b * world_size), g)


def describe(parts, backend: str, zero_stage: int | None, resumed_from=None) -> dict:
    """The plan of a recipe's components (ftdist.run.Components) on `backend`: plan.json's content."""
    r, net, groups, schedule = parts.recipe, parts.net, parts.groups, parts.schedule
    return {**parts.plan.to_dict(), "precision": r.train.precision, "backend": backend, "zero_stage": zero_stage,
            "steps_per_epoch": parts.steps_per_epoch, "total_steps": parts.total_steps,
            "train_examples": len(parts.splits.train), "label_counts": parts.splits.label_counts,
            "dropped_rows": parts.splits.dropped,
            "layer_groups": [{"name": g.name, "params": g.count(net)} for g in groups],
            "stages": [{"stage": s, "from_step": schedule.transition_step(s),
                        "groups": [groups[i].name for i in schedule.trainable_groups(s)]}
                       for s in range(schedule.n_stages)],
            "resumed_from": str(resumed_from) if resumed_from else None}


def render(d: dict, header: str = "plan:", resumed_step: int | None = None) -> list[str]:
    """Console lines of a plan from `describe`."""
    plan = Plan(**{k: d[k] for k in Plan.__dataclass_fields__})
    lines = [header] + ["  " + line for line in plan.lines()] + [
        f"  precision         {d['precision']}   backend {d['backend']}   zero stage {d['zero_stage']}",
        f"  steps             {d['total_steps']} ({d['steps_per_epoch']} steps per epoch, {d['train_examples']} examples)"]
    if d["label_counts"]:
        lines.append("  labels            " + ", ".join(f"{k}: {v}" for k, v in d["label_counts"].items()))
    if d["resumed_from"]:
        lines.append(f"  resuming from     {d['resumed_from']} (step {resumed_step})")
    lines.append("  layer groups:")
    lines += [f"    {g['name']:<14} {g['params']:>12,} params" for g in d["layer_groups"]]
    lines.append("  unfreeze stages:")
    for s in d["stages"]:
        start = s["from_step"] if s["from_step"] is not None else "plateau"
        lines.append(f"    stage {s['stage']} from step {start}: {', '.join(s['groups'])}")
    return lines
