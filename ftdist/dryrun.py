"""`./launch ... --dry-run` and `ftdist plan`: the recipe's components on the launch's world, printed with
the same renderer as a training run's plan, and nothing trained."""

from __future__ import annotations

import shlex

from ftdist import config
from ftdist import plan as planlib
from ftdist.errors import FtdistError
from ftdist.redaction import redact_override
from ftdist.run import components


def print_plan(recipe_name: str, overrides: list[str], topo) -> int:
    """Check recipe + accelerate config together and print what would run. `topo`: a launcher.Topology."""
    recipe = config.load(recipe_name, overrides)
    if recipe.train.precision == "fp16" and topo.gpus_per_node == 0:
        raise FtdistError("train.precision: fp16 needs a CUDA GPU and none is visible; use bf16 or no")
    parts = components(recipe, planlib.resolve(recipe.train, topo.world_size, topo.nodes))
    d = topo.preset_info
    # a CPU preset launched as MULTI_GPU (to get torchrun) runs as MULTI_CPU: DDP over gloo
    backend = "MULTI_CPU (DDP over gloo)" if d.use_cpu and d.distributed_type == "MULTI_GPU" else d.distributed_type
    lines = planlib.render(parts.describe(backend, d.zero_stage), header="plan (dry run: nothing is trained)")
    lines += [f"  preset            {topo.preset}   offload {d.offload}", "  command on each node:"]
    for rank in range(topo.nodes):
        lines.append(f"    node {rank}: ./launch {shlex.quote(topo.preset)} {shlex.quote(recipe_name)} "
                     + " ".join(shlex.quote(redact_override(o)) for o in overrides)
                     + (f" --nodes {topo.nodes} --node-rank {rank} --main-address {topo.main_address} "
                        f"--main-port {topo.main_port} --nproc {topo.nproc_per_node}" if topo.nodes > 1 else ""))
    print("\n".join(lines), flush=True)
    return 0
