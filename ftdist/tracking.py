"""Trackers (through accelerate): the JSON-lines log, wandb's run id, what each step logs."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate.tracking import GeneralTracker

from ftdist import mfu
from ftdist.redaction import redact, redact_name

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


def run_name(run) -> str:
    """The run's name for trackers and their folders (TensorBoard names a folder after it): redacted."""
    return redact_name(run.recipe.log.run_name or run.run_dir.name)


def start(run) -> None:
    """Start the trackers under the run's redacted name, with the redacted recipe as their config."""
    run.acc.init_trackers(run_name(run), config=flatten(redact(run.recipe.to_dict())), init_kwargs=tracker_kwargs(run))


def tracker_kwargs(run) -> dict:
    """wandb resumes the same run after a restart: its id is kept in the run folder."""
    r = run.recipe
    if "wandb" not in r.log.trackers:
        return {}
    run_id_file = run.run_dir / "wandb_run_id"
    if run.acc.is_main_process and not run_id_file.exists():
        import uuid
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(uuid.uuid4().hex[:12])
    run.acc.wait_for_everyone()
    run_id = run_id_file.read_text().strip()
    import wandb

    # names and tags redacted: a token pasted as the run name or a tag must reach no tracker record.
    # x_disable_meta: wandb otherwise records the process command line, where an override could hold a secret
    return {"wandb": {"name": run_name(run), "tags": [redact_name(t) if isinstance(t, str) else t for t in r.log.tags],
                      "id": run_id,
                      "resume": "allow", "dir": str(run.run_dir), "settings": wandb.Settings(x_disable_meta=True)}}


def log_transition(run, stage: int) -> None:
    """What the last stage cost (frozen blocks below the lowest trainable one build no graph), and the new one."""
    acc, prev, step = run.acc, run.stage_stats, run.state.step
    talk = acc.is_main_process and not run.quiet
    if prev and prev["steps"]:
        acc.log({"stage/index": prev["stage"], "stage/steps": prev["steps"], "stage/trainable_params": prev["trainable"],
                 "stage/mean_step_time_s": prev["time"] / prev["steps"]}, step=step)
        if talk:
            log.info("stage %d done: %d steps, %.3f s/step, %s trainable params", prev["stage"], prev["steps"],
                     prev["time"] / prev["steps"], f"{prev['trainable']:,}")
    acc.log({"train/stage": stage, "train/trainable_params": run.trainable}, step=step)
    if talk:
        log.info("step %d: unfreeze stage %d -> trainable %s params (%s)", step, stage, f"{run.trainable:,}",
                 ", ".join(run.groups[g].name for g in run.schedule.trainable_groups(stage)))


@dataclass
class Window:
    """Optimizer steps added up: those since the last log (the run state keeps it, so a resumed run logs what
    the uninterrupted one would have), or all of this process's steps (the cumulative rates).

    The loss is weighted as the loss itself is normalised: a step's global mean loss times its global item
    count (examples or labelled tokens, under the task's weights) is its loss sum, and the window's loss is
    sum(loss sums) / sum(items). That is the same at every world size and accumulation, and a window of
    one step is that step's loss. A skipped step (non-finite loss or gradient) adds to neither the loss nor
    the grad norm; it is counted in train/skipped_steps."""

    loss_sum: float = 0.0
    items: float = 0.0
    grad_norm_sum: float = 0.0
    grad_norm_max: float = 0.0
    stepped: int = 0  # steps with a finite grad norm
    steps: int = 0
    time_s: float = 0.0  # loading and optimizer steps only: evaluation and checkpoints are not training speed
    samples: int = 0  # this rank's real examples, padded tokens and real tokens
    tokens: int = 0
    real_tokens: int = 0

    def add(self, loss: float, items: float, grad_norm: float, dt: float, samples: int, tokens: int,
            real_tokens: int) -> None:
        if math.isfinite(loss):
            self.loss_sum += loss * items
            self.items += items
        if math.isfinite(grad_norm):
            self.grad_norm_sum += grad_norm
            self.grad_norm_max = max(self.grad_norm_max, grad_norm)
            self.stepped += 1
        self.steps += 1
        self.time_s += dt
        self.samples += samples
        self.tokens += tokens
        self.real_tokens += real_tokens

    def loss(self) -> float:
        return self.loss_sum / self.items if self.items else float("nan")

    def grad_norm(self) -> float:
        return self.grad_norm_sum / self.stepped if self.stepped else float("nan")


def batch_counts(batches: list) -> tuple[int, int, int]:
    """This rank's real examples, padded tokens and real tokens in a step's micro-batches (images: no tokens)."""
    return (sum(int(b["real"].sum()) for b in batches), sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b),
            sum(int(b["attention_mask"].sum()) for b in batches if "attention_mask" in b))


def record_step(run, out, dt: float, batches: list, since_start: Window) -> None:
    """Add an optimizer step to the log window, the cumulative window and the unfreeze stage's timing."""
    run.stage_stats["steps"] += 1
    run.stage_stats["time"] += dt
    counted = batch_counts(batches)
    for window in (run.state.log_window, since_start):
        window.add(out.loss, out.items, out.grad_norm, dt, *counted)


def log_step(run, window: Window, since_start: Window, elapsed: float) -> None:
    """The log row of a log step: means over `window`, the steps since the last log, and rates named for what they cover: `_window` (those steps' own time) or `_cumulative` (wall time since
    this process's loop started, evaluation and checkpoints included)."""
    import torch

    acc, st = run.acc, run.state
    world = acc.num_processes
    values = {"train/loss": window.loss(), "train/grad_norm": window.grad_norm(),
              "train/grad_norm_max": window.grad_norm_max if window.stepped else float("nan"),
              "train/step_time_s_window": window.time_s / max(window.steps, 1),
              "train/samples_per_s_window": window.samples * world / max(window.time_s, 1e-9),
              "train/tokens_per_s_window": window.real_tokens * world / max(window.time_s, 1e-9),
              "train/samples_per_s_cumulative": since_start.samples * world / max(elapsed, 1e-9),
              "train/tokens_per_s_cumulative": since_start.real_tokens * world / max(elapsed, 1e-9),
              "train/real_token_fraction": since_start.real_tokens / max(since_start.tokens, 1),
              "train/trainable_params": run.trainable, "train/stage": st.stage,
              "train/epoch": st.epoch + st.step_in_epoch / run.steps_per_epoch,
              "train/skipped_steps": st.skipped_steps}
    for g in run.raw_optimizer.param_groups:
        values[f"lr/{g['name']}"] = g["lr"]
    if torch.cuda.is_available():
        values["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        cfg = run.net.config
        seq = window.tokens / max(window.samples, 1)  # mean padded length
        m = mfu.mfu(run.matmul_params, getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0), seq,
                    values["train/tokens_per_s_window"], world, torch.cuda.get_device_name(0))
        if m is not None:
            values["train/mfu_window"] = m
    else:
        import resource
        values["train/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    acc.log(values, step=st.step)


def trace_hook():
    """A per-step hook writing the step's loss and global item count, this rank's sample ids, stage and trainable count to
    $FTDIST_TRACE_DIR/rank<N>.jsonl (parity, resume and golden tests read it); None when unset."""
    trace = os.environ.get("FTDIST_TRACE_DIR")
    if not trace:
        return None

    def record(run, out) -> None:
        ids = [int(i) for b in out.batches for i, real in zip(b["idx"], b["real"]) if real]
        path = Path(trace) / f"rank{run.acc.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": out.step, "loss": out.loss, "items": out.items, "ids": ids, "stage": run.state.stage,
                                "trainable": run.trainable, "world": run.acc.num_processes}) + "\n")
    return record
