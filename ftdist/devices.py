"""Does the machine have the GPUs a preset needs? Refuse before anything starts, or fall back to CPU when asked.

A GPU preset on a machine without CUDA GPUs used to run anyway: accelerate quietly drops to one CPU process,
so `./launch ddp` trained something other than what was asked. launch now refuses it, naming what it found and
the CPU preset to use; `--cpu-fallback` (or FTDIST_CPU_FALLBACK=1, for batch scripts) swaps in that CPU
preset instead, and only when no GPU is found at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ftdist import presets
from ftdist.errors import FtdistError

FALLBACK_ENV = "FTDIST_CPU_FALLBACK"

# The shipped GPU presets and their CPU twins (same backend and ZeRO stage; offload has no meaning on CPU).
CPU_TWIN = {"gpu": "cpu", "ddp": "cpu-2", "zero2": "cpu-zero2", "zero3": "cpu-zero3", "zero3-offload": "cpu-zero3",
            "multinode-ddp": "cpu-2", "multinode-zero3": "cpu-zero3"}
# accelerate distributed types that run on CUDA devices unless the config says use_cpu
_GPU_TYPES = ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP", "MEGATRON_LM")


@dataclass(frozen=True)
class GpuCount:
    """The GPUs this node has for the launch, and where that number came from (for the message)."""

    count: int
    source: str        # e.g. "torch.cuda.device_count()" or "SLURM_GPUS_ON_NODE=0"


@dataclass(frozen=True)
class DeviceChoice:
    """The preset to run after the GPU check: the one asked for, or its CPU twin under --cpu-fallback."""

    preset: str
    fell_back_from: str | None = None   # the GPU preset replaced, when the fallback applied


def count_gpus(env: dict, slurm_gpus: int | None, probed: int | None) -> GpuCount:
    """SLURM's grant when it names one; else `probed` (a caller's count) or torch's."""
    if slurm_gpus is not None:
        name = "SLURM_GPUS_ON_NODE" if env.get("SLURM_GPUS_ON_NODE") else "SLURM_GPUS_PER_NODE"
        return GpuCount(slurm_gpus, f"{name}={env.get(name)}")
    if probed is not None:
        return GpuCount(probed, "torch.cuda.device_count()")
    try:
        import torch
    except ImportError:
        return GpuCount(0, "torch is not installed")
    n = torch.cuda.device_count()
    if n == 0 and torch.version.cuda is None:
        return GpuCount(0, "torch.cuda.device_count(); this torch is a CPU-only build")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    return GpuCount(n, "torch.cuda.device_count()" + (f" with CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""))


def needs_gpu(info: presets.PresetInfo) -> bool:
    return not info.use_cpu and info.distributed_type in _GPU_TYPES


def cpu_twin(preset: str, info: presets.PresetInfo) -> str:
    """The shipped CPU preset closest to `preset` (a config file: by its backend and ZeRO stage)."""
    if preset in CPU_TWIN:
        return CPU_TWIN[preset]
    if info.distributed_type == "DEEPSPEED":
        return "cpu-zero3" if info.zero_stage == 3 else "cpu-zero2"
    return "cpu" if info.distributed_type == "NO" and info.num_machines == 1 else "cpu-2"


def fallback_asked(flag: bool, env: dict) -> bool:
    value = str(env.get(FALLBACK_ENV, "")).strip().lower()
    if value not in ("", "0", "1", "true", "false", "yes", "no", "on", "off"):
        raise FtdistError(f"{FALLBACK_ENV}={env[FALLBACK_ENV]!r} is not a yes/no value; set it to 1 to run a GPU "
                          "preset on CPU when no GPU is found, or unset it")
    return flag or value in ("1", "true", "yes", "on")


def choose(preset: str, info: presets.PresetInfo, gpus: GpuCount, asked: int | None, fallback: bool,
           command: str, asked_by: str = "--nproc") -> DeviceChoice:
    """`preset` if the node has the GPUs it needs; its CPU twin under `fallback` when it has none; else an error
    naming what was found and the CPU preset to use. `asked`: processes per node asked for, if any, and `asked_by`
    where (--nproc, or the config's num_processes);
    `command`: the launch line to suggest, with `{preset}` where the preset goes."""
    if not needs_gpu(info):
        return DeviceChoice(preset)
    found = f"{gpus.count} CUDA GPU{'' if gpus.count == 1 else 's'} on this node ({gpus.source})"
    if gpus.count == 0:
        twin = cpu_twin(preset, info)
        if fallback:
            return DeviceChoice(twin, fell_back_from=preset)
        shown = os.path.basename(preset) if preset.endswith((".yaml", ".yml")) else preset
        raise FtdistError(
            f"preset {shown!r} needs CUDA GPUs, but found {found}; nothing was started. On CPU use preset "
            f"{twin} instead ({command.replace('{preset}', twin)}), or add --cpu-fallback (in a batch job: "
            f"{FALLBACK_ENV}=1) to run {twin} whenever no GPU is found. `ftdist env` shows what torch sees.")
    if asked is not None and asked > gpus.count:
        raise FtdistError(
            f"preset {preset!r} asks for {asked} GPU processes per node ({asked_by} {asked}), but found {found}; "
            f"nothing was started. Use --nproc {gpus.count} or fewer, or run where {asked} GPUs are visible.")
    return DeviceChoice(preset)
