"""`ftdist env`: what a bug report needs, in one paste.

The environment is shown in two parts: what the user set, and what ftdist set itself (DS_ACCELERATOR=cpu
for DeepSpeed on CPU, ACCELERATE_USE_CPU, the stop file, threads). A bug report that lists ftdist's own
settings as the user's sends the reader after a setting nobody made. Processes started by launch carry the
names it set in FTDIST_SET_ENV; this command's own DeepSpeed probe restores the environment it changed.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

from ftdist.redaction import REDACTED, is_secret_key, redact_text

SET_BY_FTDIST = "FTDIST_SET_ENV"
"""Comma-separated names of the variables launch set (or unset) in the processes it started."""
_SHOWN = ("ACCELERATE_", "DS_", "CUDA_VISIBLE", "NCCL_", "OMP_NUM", "HF_", "WANDB_", "MASTER_", "FTDIST_")
_WHY = {"DS_ACCELERATOR": "DeepSpeed on CPU", "ACCELERATE_USE_CPU": "CPU presets",
        "FTDIST_STOP_FILE": "the launcher's stop requests", "OMP_NUM_THREADS": "cores per CPU process"}

PACKAGES = ("ftdist", "torch", "accelerate", "transformers", "datasets", "evaluate", "deepspeed", "wandb", "safetensors")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _shown_value(key: str, value: str) -> str:
    # values too: a URL with a password (HF_ENDPOINT=https://user:pw@host) or a token under any name
    return REDACTED if is_secret_key(key) else redact_text(value)


def collect() -> dict:
    import torch
    import torch.distributed as dist

    user_env = dict(os.environ)  # before the DeepSpeed probe below sets anything
    info = {"python": platform.python_version(), "platform": platform.platform(),
            "versions": {p: _version(p) for p in PACKAGES}}
    devices = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
               "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        devices["bf16_supported"] = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else \
            bool((torch.ones(2, dtype=torch.bfloat16) @ torch.ones(2, dtype=torch.bfloat16)).item() == 2)
    except Exception:  # noqa: BLE001 - a probe
        devices["bf16_supported"] = False
    info["devices"] = devices
    info["distributed_backends"] = {b: getattr(dist, f"is_{b}_available", lambda: False)() for b in ("gloo", "nccl", "mpi")}
    # DeepSpeed picks its accelerator at import: the probe sets DS_ACCELERATOR if unset, and removes it again
    probe_env = {} if "DS_ACCELERATOR" in os.environ else {"DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu"}
    os.environ.update(probe_env)
    try:
        info["deepspeed_ops"] = _deepspeed_ops()
    finally:
        for k in probe_env:
            os.environ.pop(k, None)
    info["slurm"] = {k: redact_text(v) for k, v in sorted(user_env.items())
                     if k.startswith("SLURM_") and not is_secret_key(k)}
    launched = {k for k in user_env.get(SET_BY_FTDIST, "").split(",") if k} - {SET_BY_FTDIST}
    info["env"] = {k: _shown_value(k, v) for k, v in sorted(user_env.items())
                   if k.startswith(_SHOWN) and k not in launched and k != SET_BY_FTDIST}
    by_ftdist = {k: (_shown_value(k, user_env[k]) + f" (launch: {_WHY.get(k, 'accelerate')})" if k in user_env
                     else f"(unset by launch: {_WHY.get(k, 'accelerate')})") for k in sorted(launched)}
    by_ftdist.update({k: f"{v} (set by `ftdist env` for its DeepSpeed probe; launch sets it for DeepSpeed on CPU)"
                      for k, v in probe_env.items() if k not in by_ftdist})
    info["set_by_ftdist"] = by_ftdist
    return info


def _deepspeed_ops() -> dict:
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as e:  # noqa: BLE001 - deepspeed is optional and its import can fail many ways
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    out = {}
    for name, builder in ALL_OPS.items():
        try:
            out[name] = bool(builder.is_compatible(verbose=False))
        except Exception:  # noqa: BLE001
            out[name] = False
    return out


def render(info: dict) -> str:
    lines = [f"python {info['python']} on {info['platform']}"]
    lines += [f"  {k:<14} {v}" for k, v in info["versions"].items()]
    d = info["devices"]
    lines.append(f"devices: cuda={d['cuda_available']} (cuda {d['cuda_version']}) gpus={d['gpus'] or 'none'} "
                 f"cpus={d['cpu_count']} bf16={d['bf16_supported']}")
    lines.append("distributed backends: " + ", ".join(f"{k}={v}" for k, v in info["distributed_backends"].items()))
    ops = info["deepspeed_ops"]
    if "error" in ops:
        lines.append(f"deepspeed ops: unavailable ({ops['error']})")
    else:
        lines.append("deepspeed ops compatible: " + (", ".join(k for k, v in ops.items() if v) or "none"))
    lines.append("slurm: " + (", ".join(f"{k}={v}" for k, v in info["slurm"].items()) or "not detected"))
    lines.append("environment you set: " + (", ".join(f"{k}={v}" for k, v in info["env"].items()) or "none of note"))
    if info.get("set_by_ftdist"):
        lines.append("set by ftdist: " + ", ".join(f"{k}={v}" for k, v in info["set_by_ftdist"].items()))
    return "\n".join(lines)
