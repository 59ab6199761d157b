"""Trackers (through accelerate), the JSON-lines log, the console summary."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from accelerate.tracking import GeneralTracker

from ftdist.redaction import redact

log = logging.getLogger("ftdist")


class JSONLTracker(GeneralTracker):
    """accelerate tracker writing one JSON object per log call to <run>/metrics.jsonl.

    Built before the Accelerator (log_with takes instances), so it must not touch accelerate's
    PartialState (its `on_main_process` decorator would initialise a non-distributed state);
    accelerate itself calls log() on the main process only.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str, **kwargs):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / "metrics.jsonl"

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "tracker_config.json").write_text(json.dumps(redact(values), indent=1, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        row = {"step": step, "time": round(time.time(), 3), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(row, default=float) + "\n")


def trackers(names: list[str], run_dir: str) -> list:
    out = []
    for n in names:
        if n == "jsonl":
            out.append(JSONLTracker(run_name="ftdist", logging_dir=run_dir))
        elif n == "wandb":
            try:
                import wandb  # noqa: F401
            except ImportError:
                from ftdist.errors import FtdistError
                raise FtdistError("log.trackers: wandb is listed but not installed; pip install 'ftdist[wandb]' "
                                  "or remove it from log.trackers") from None
            out.append("wandb")
        else:
            out.append(n)
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            out[key] = ",".join(map(str, v))
        else:
            out[key] = v
    return out


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])


def truncate_jsonl(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step: they are about to be logged again."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if (json.loads(line).get("step") or 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(line + "\n" for line in keep))


# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def peak_flops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name), None)


def matmul_params(model) -> int:
    """The N of 6N: parameters outside embedding tables (a table lookup costs no FLOPs)."""
    import torch

    tables = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if id(p) not in tables)


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6N for the matmuls (forward 2N + backward 4N) plus attention scores and
    values, 12 * layers * hidden * seq (the PaLM paper's appendix B estimate)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def mfu(n_params: int, layers: int, hidden: int, seq_len: float, real_tokens_per_s: float, n_devices: int,
        device_name: str) -> float | None:
    """Model FLOPs utilisation on real (non-padding) tokens; None on a device without a known peak."""
    peak = peak_flops(device_name)
    if not peak:
        return None
    return flops_per_token(n_params, layers, hidden, seq_len) * real_tokens_per_s / (n_devices * peak)
