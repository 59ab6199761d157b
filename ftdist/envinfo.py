"""`ftdist env`: what a bug report needs, in one paste."""

from __future__ import annotations

import importlib.metadata
import os
import platform

from ftdist.redaction import REDACTED, is_secret_key, redact_text

PACKAGES = ("ftdist", "torch", "accelerate", "transformers", "datasets", "evaluate", "deepspeed", "wandb", "safetensors")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    import torch
    import torch.distributed as dist

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
    info["deepspeed_ops"] = _deepspeed_ops()
    # values too: a URL with a password (HF_ENDPOINT=https://user:pw@host) or a token under any name
    info["slurm"] = {k: redact_text(v) for k, v in sorted(os.environ.items())
                     if k.startswith("SLURM_") and not is_secret_key(k)}
    info["env"] = {k: (REDACTED if is_secret_key(k) else redact_text(v)) for k, v in sorted(os.environ.items())
                   if k.startswith(("ACCELERATE_", "DS_", "CUDA_VISIBLE", "NCCL_", "OMP_NUM", "HF_", "WANDB_", "MASTER_", "FTDIST_"))}
    return info


def _deepspeed_ops() -> dict:
    try:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if __import__("torch").cuda.is_available() else "cpu")
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
    if info["env"]:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    return "\n".join(lines)
