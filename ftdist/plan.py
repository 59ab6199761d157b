"""What a recipe means on a given world: global batch -> per-device batch x accumulation x world size.

Computed in one place, printed at start and saved in the run folder, so a user always knows
what batch the optimizer saw. The global batch is fixed by the recipe; scale changes only the
accumulation, never the batch the optimizer sees. `describe` and `render` are the one plan that
training (plan.json and the console) and the dry run print.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ftdist import model as modellib
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
    per_device_asked: int  # train.per_device_batch_size: the most that fits; per_device_batch is what divides

    def to_dict(self) -> dict:
        return asdict(self)

    def lines(self) -> list[str]:
        return [
            f"world size        {self.world_size} ({self.num_nodes} node(s) x {self.procs_per_node} process(es))",
            f"per-device batch  {self.per_device_batch}" + (
                "" if self.per_device_batch == self.per_device_asked else
                f" (train.per_device_batch_size {self.per_device_asked} lowered: the largest size that splits "
                f"the global batch {self.global_batch} over {self.world_size} process(es))"),
            f"accumulation      {self.accumulation}",
            f"global batch      {self.global_batch} = {self.per_device_batch} x {self.accumulation} x {self.world_size}",
        ]


def nearby_globals(global_batch: int, world: int) -> list[int]:
    """The four global batches nearest the asked one that split over `world` processes."""
    return sorted(sorted(range(world, 4 * global_batch + 1, world), key=lambda g: abs(g - global_batch))[:4])


def resolve(train: TrainConfig, world_size: int, num_nodes: int = 1) -> Plan:
    """The plan of `train` on `world_size` processes. per_device_batch_size is a memory bound: the plan uses
    the largest per-device batch up to it that splits the global batch into whole micro-batches, so one
    recipe runs unchanged on 1, 2 or 8 processes with the same global batch."""
    g, b = train.global_batch_size, train.per_device_batch_size
    if num_nodes < 1 or world_size % num_nodes:
        raise RecipeError(f"world size {world_size} is not a multiple of the node count {num_nodes}; "
                          "give the same number of processes on every node")
    fits = [d for d in range(min(b, g), 0, -1) if g % (d * world_size) == 0]
    if not fits:
        raise RecipeError(
            f"train.global_batch_size: {g} cannot be split over world size {world_size}: every process needs a "
            f"whole number of examples per step. Use a global_batch_size that is a multiple of {world_size}, "
            f"e.g. {nearby_globals(g, world_size)}")
    used = fits[0]
    return Plan(world_size, num_nodes, world_size // num_nodes, used, g // (used * world_size), g, b)


def describe(parts, backend: str, zero_stage: int | None, resumed_from=None) -> dict:
    """The plan of a recipe's components (ftdist.run.Components) on `backend`: plan.json's content."""
    r, net, groups, schedule = parts.recipe, parts.net, parts.groups, parts.schedule
    # the dry run's check (`ftdist train` makes it before anything starts): no plan for inputs the model cannot take
    modellib.check_max_length(r.model, r.data.max_length, net.config)
    return {**parts.plan.to_dict(), "precision": r.train.precision, "backend": backend, "zero_stage": zero_stage,
            "steps_per_epoch": parts.steps_per_epoch, "total_steps": parts.total_steps,
            "train_examples": len(parts.splits.train), "label_counts": parts.splits.label_counts,
            "dropped_rows": parts.splits.dropped,
            "layer_groups": [{"name": g.name, "params": g.count(net)} for g in groups],
            "stages": [{"stage": s, "from_step": schedule.transition_step(s),
                        "groups": [groups[i].name for i in schedule.trainable_groups(s)]}
                       for s in range(schedule.n_stages)],
            "resumed_from": str(resumed_from) if resumed_from else None,
            **({"lr": {"value": r.train.lr, "from": "LR range test"}} if getattr(parts, "lr_found", None) else {})}


def render(d: dict, header: str = "plan:", resumed_step: int | None = None) -> list[str]:
    """Console lines of a plan from `describe`."""
    plan = Plan(**{k: d[k] for k in Plan.__dataclass_fields__})
    lines = [header] + ["  " + line for line in plan.lines()] + [
        f"  precision         {d['precision']}   backend {d['backend']}   zero stage {d['zero_stage']}",
        f"  steps             {d['total_steps']} ({d['steps_per_epoch']} steps per epoch, {d['train_examples']} examples)"]
    if d["label_counts"]:
        lines.append("  labels            " + ", ".join(f"{k}: {v}" for k, v in d["label_counts"].items()))
    if d.get("lr"):
        lines.append(f"  lr                {d['lr']['value']:.3g} (train.lr=auto: {d['lr']['from']})")
    if d["resumed_from"]:
        lines.append(f"  resuming from     {d['resumed_from']} (step {resumed_step})")
    lines.append("  layer groups:")
    lines += [f"    {g['name']:<14} {g['params']:>12,} params" for g in d["layer_groups"]]
    lines.append("  unfreeze stages:")
    for s in d["stages"]:
        start = s["from_step"] if s["from_step"] is not None else "plateau"
        lines.append(f"    stage {s['stage']} from step {start}: {', '.join(s['groups'])}")
    return lines


def announce(run) -> None:
    """Log the plan of the run about to train (main process, unless quiet), from the step it starts at."""
    import logging

    if run.acc.is_main_process and not run.quiet:
        d = run.describe(run.acc.distributed_type.value, run.backend.zero_stage, run.resume_from)
        logging.getLogger("ftdist").info("\n".join(render(d, resumed_step=run.state.step)))
