"""A checkpoint in a form that no world size or backend owns: whole tensors by parameter name.

What makes a run resumable on another number of processes or another backend is small: the fp32
weights, AdamW's two moments of every trainable parameter and each optimizer group's step count. The
data order, the LR schedule and the dropout masks are functions of (seed, step), and the run state
(epoch position, unfreeze stage) is in ftdist_state.json.

- One process and DDP: accelerate's own files already hold whole tensors (model.safetensors and
  optimizer.bin, whose parameter indices are mapped to names with the group list in ftdist_state.json),
  so nothing more is written.
- ZeRO: every rank holds a slice, laid out for this world size. At each checkpoint the slices are
  gathered and rank 0 writes PORTABLE_FILE next to DeepSpeed's own shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ftdist.errors import CheckpointError

PORTABLE_FILE = "portable.safetensors"
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class FullState:
    weights: dict[str, torch.Tensor]                 # every parameter, whole
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # name -> {exp_avg, exp_avg_sq}
    steps: dict[str, float] = field(default_factory=dict)  # optimizer group name -> AdamW step count


def write(path: Path, fs: FullState) -> None:
    from safetensors.torch import save_file

    tensors = {f"weight/{n}": t.contiguous() for n, t in fs.weights.items()}
    for n, m in fs.moments.items():
        tensors.update({f"{k}/{n}": m[k].contiguous() for k in MOMENTS})
    save_file(tensors, str(path / PORTABLE_FILE), metadata={"steps": json.dumps(fs.steps)})


def read(path: Path, state: dict) -> FullState:
    """The whole-tensor state of checkpoint `path` (state: its ftdist_state.json)."""
    f = path / PORTABLE_FILE
    if f.is_file():
        return _read_portable(f)
    if (path / "model.safetensors").is_file() and (path / "optimizer.bin").is_file():
        return _read_native(path, state)
    raise CheckpointError(f"checkpoint {str(path)!r} holds neither {PORTABLE_FILE} nor model.safetensors + "
                          "optimizer.bin, so it cannot be resumed on another world size or backend. Resume it on the "
                          "world size and backend that wrote it (ftdist_state.json says which), or from a checkpoint "
                          "written by this version of ftdist")


def _read_portable(f: Path) -> FullState:
    from safetensors import safe_open

    try:
        with safe_open(str(f), "pt") as h:
            steps = json.loads((h.metadata() or {}).get("steps", "{}"))
            fs = FullState({}, {}, {str(k): float(v) for k, v in steps.items()})
            for key in h.keys():
                kind, _, name = key.partition("/")
                if kind == "weight":
                    fs.weights[name] = h.get_tensor(key)
                elif kind in MOMENTS:
                    fs.moments.setdefault(name, {})[kind] = h.get_tensor(key)
    except Exception as e:  # noqa: BLE001 - any failure names the file
        raise CheckpointError(f"checkpoint file {str(f)!r} is damaged ({type(e).__name__}); resume from an older "
                              "checkpoint") from None
    return fs


def _read_native(path: Path, state: dict) -> FullState:
    from accelerate.utils import load as torch_load  # torch.load with weights_only=True
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    opt = torch_load(path / "optimizer.bin", map_location="cpu")
    groups = state.get("param_groups") or []
    names = [n for g in groups for n in g["params"]]
    index_groups = opt.get("param_groups", [])
    if len(groups) != len(index_groups) or sum(len(g["params"]) for g in index_groups) != len(names):
        raise CheckpointError(f"checkpoint {str(path)!r}: its optimizer groups do not match the group list in "
                              "ftdist_state.json; resume it on the world size and backend that wrote it")
    fs = FullState(weights)
    for g_named, g_index in zip(groups, index_groups):
        for name, idx in zip(g_named["params"], g_index["params"]):
            s = opt["state"].get(idx)
            if s:
                fs.moments[name] = {k: s[k] for k in MOMENTS}
                fs.steps[g_named["name"]] = float(s["step"])
    return fs


def check_model(fs: FullState, net: torch.nn.Module, path: Path) -> None:
    """The checkpoint is of this model: same parameter names and shapes."""
    have = {n: tuple(p.shape) for n, p in net.named_parameters()}
    saved = {n: tuple(t.shape) for n, t in fs.weights.items()}
    missing = sorted(set(have) - set(saved))
    wrong = sorted(n for n in set(have) & set(saved) if have[n] != saved[n])
    if missing or wrong:
        what = (f"{len(missing)} parameter(s) missing (e.g. {missing[0]})" if missing else
                f"{wrong[0]} has shape {list(saved[wrong[0]])} there, {list(have[wrong[0]])} here")
        raise CheckpointError(f"checkpoint {str(path)!r} is of a different model than model.name/model.config of this "
                              f"recipe: {what}. Resume it with the recipe that wrote it (its recipe.yaml), or start "
                              "a new run in a new log.output_dir")


def load_weights(fs: FullState, net: torch.nn.Module) -> None:
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(fs.weights[n].to(p.dtype))


def adam_state(fs: FullState, name: str, group: str, like: torch.Tensor) -> dict | None:
    """torch AdamW's state for one parameter, or None if it has not stepped yet."""
    m = fs.moments.get(name)
    if m is None or group not in fs.steps:
        return None
    return {"step": torch.tensor(fs.steps[group], dtype=torch.float32),
            **{k: m[k].to(like.device, like.dtype).reshape(like.shape).clone() for k in MOMENTS}}
