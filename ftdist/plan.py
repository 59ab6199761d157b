"""What a recipe means on a given world: global batch -> per-device batch x accumulation x world size.

Computed in one place, printed at start and saved in the run folder, so a user always knows
what batch the optimizer saw. The global batch is fixed by the recipe; scale changes only the
accumulation (axolotl multiplies the batch by the world size instead; that is the bug to avoid).
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
