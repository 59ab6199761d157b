"""One setup path: `components(recipe, plan)` for everything a recipe means on a world size (used by the dry
run and `ftdist plan` too), and `build(recipe) -> Run` for a training run on this process's Accelerator."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ftdist import (
    averaging,
    checkpoint,
    config,
    data,
    decisions,
    imagefeed,
    images,
    lr_find,
    metrics,
    mfu,
    optim,
    portable,
    runfolder,
    tasks,
    tracking,
)
from ftdist import backend as backendlib
from ftdist import model as modellib
from ftdist import plan as planlib
from ftdist.collate import TextFeed
from ftdist.collectives import world_from_env
from ftdist.errors import FtdistError
from ftdist.sampler import GlobalBatchSampler, balanced_weights
from ftdist.unfreeze import Schedule

log = logging.getLogger("ftdist")


@dataclass
class RunState:
    """Everything resumable that is not a tensor: saved as JSON next to accelerate's save_state."""

    step: int = 0                 # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0
    stage: int = 0                # unfreeze stage in force
    unfreeze_steps: dict = field(default_factory=dict)  # layer group index (str) -> first step it trained
    best: float | None = None
    best_step: int | None = None
    nonfinite_in_row: int = 0
    skipped_steps: int = 0
    metric_history: list = field(default_factory=list)
    world_size: int = 1
    backend: str = ""             # single, ddp, zero2, zero3: with world_size, what wrote a checkpoint
    param_groups: list = field(default_factory=list)  # stage's optimizer groups by fully-qualified name
    log_window: tracking.Window = field(default_factory=tracking.Window)  # the steps since the last log
    train_time_s: float = 0.0     # training time of every start, up to this checkpoint (time after it was lost)

    def __post_init__(self):
        if isinstance(self.log_window, dict):  # as read back from a checkpoint's JSON
            self.log_window = tracking.Window(**self.log_window)


@dataclass
class Components:
    """What a recipe means on a given world: data, model, layer groups, batches, schedule, task."""

    recipe: config.Recipe
    plan: planlib.Plan
    tokenizer: Any
    splits: data.Splits
    net: torch.nn.Module
    groups: list[modellib.LayerGroup]
    sampler: GlobalBatchSampler
    schedule: Schedule
    task: tasks.Task
    steps_per_epoch: int
    total_steps: int
    feed: Any = None  # the loaders' rows, batch sampler and collators: collate.TextFeed or imagefeed.ImageFeed

    def describe(self, backend: str, zero_stage: int | None, resumed_from: Path | None = None) -> dict:
        """The plan as saved to plan.json and printed by training and the dry run."""
        return planlib.describe(self, backend, zero_stage, resumed_from)


@dataclass
class Run(Components):
    """A training run: the components, this process's Accelerator and backend, and the run state."""

    acc: Any = None
    backend: backendlib.Backend | None = None
    run_dir: Path = Path(".")
    recipe_yaml: str = ""
    quiet: bool = False
    matmul_params: int = 0
    train_loader: DataLoader | None = None
    eval_loader: Any = None
    state: RunState = field(default_factory=RunState)
    resume_from: Path | None = None
    start_step: int = 0  # the step this process started from: the checkpoint's on resume
    # rebuilt at unfreeze transitions
    model: Any = None
    optimizer: Any = None
    raw_optimizer: Any = None
    scheduler: Any = None
    clip_params: list = field(default_factory=list)
    trainable: int = 0
    stage_stats: dict = field(default_factory=dict)
    ema: averaging.EMA | None = None
    lr_found: Any = None  # lr_find.Found, when train.lr=auto ran the range test
    time_before: float = 0.0  # training time of the earlier starts, as the checkpoint resumed from says
    started: float | None = None  # perf_counter when this start's loop began
    _portable_s: float | None = None  # time the last save spent on the whole-tensor copy

    def loader(self, ds):
        """An evaluation loader over `ds`, sharded over the ranks."""
        loader = DataLoader(self.feed.dataset(ds), batch_size=self.recipe.eval.per_device_batch_size, shuffle=False,
                            collate_fn=self.feed.collator(train=False), sampler=[(i, True) for i in range(len(ds))])
        return self.acc.prepare_data_loader(loader)

    def start_clock(self) -> float:
        self.started = time.perf_counter()
        return self.started

    def stage_for(self, step: int) -> int:
        return self.state.stage if self.recipe.unfreeze.on_plateau else self.schedule.stage_at(step)

    def enter_stage(self, stage: int, first: bool = False) -> None:
        """Make `stage` trainable on every rank and (re)build what the backend needs for it."""
        acc, r, st = self.acc, self.recipe, self.state
        initial = set(self.schedule.trainable_groups(0))
        for g in self.schedule.trainable_groups(stage):
            # first step each group trains (drives its optional LR re-warmup); saved for resume
            st.unfreeze_steps.setdefault(str(g), 0 if g in initial else st.step)
        self.trainable = self.backend.prepare(self, stage, first)
        # rebuilt at every transition on every backend: a group's optional re-warmup starts at its unfreeze step
        self.rebuild_scheduler()
        # the model's trainable tensors, for clipping: changes only here, so not re-listed every step
        self.clip_params = [p for p in self.model.parameters() if p.requires_grad]
        st.stage = stage
        names = {id(p): n for n, p in self.net.named_parameters()}
        st.param_groups = [{"name": g["name"], "params": [names[id(p)] for p in g["params"] if id(p) in names]}
                           for g in self.raw_optimizer.param_groups]
        if not first:
            tracking.log_transition(self, stage)
            if r.train.check_sync:
                backendlib.check_sync(acc, self.model, st.step, "transition")
        self.stage_stats = {"stage": stage, "steps": 0, "time": 0.0, "trainable": self.trainable}

    def rebuild_scheduler(self) -> None:
        ufs = {int(k): v for k, v in self.state.unfreeze_steps.items()}
        self.scheduler = optim.build_scheduler(self.raw_optimizer, self.recipe.train, self.recipe.unfreeze,
                                               self.total_steps, ufs, last_step=self.state.step)

    def save(self) -> Path:
        t0 = time.perf_counter()
        self._portable_s = None
        if self.started is not None:
            self.state.train_time_s = self.time_before + t0 - self.started
        # label names kept with the checkpoint: eval/predict on a checkpoint folder name the classes
        state = {**asdict(self.state), "label_names": self.splits.label_names}
        path = checkpoint.save(self.acc, str(self.run_dir), self.state.step, state, self.recipe_yaml,
                               self.recipe.checkpoint.keep_last, extra=self._save_extra)
        if self.acc.is_main_process:
            extra = (f" (whole-tensor copy {(path / portable.PORTABLE_FILE).stat().st_size / 1e6:.1f} MB in "
                     f"{self._portable_s:.2f}s)" if self._portable_s is not None else "")
            log.debug("checkpoint %s saved in %.2fs%s", path.name, time.perf_counter() - t0, extra)
        return path

    def _save_extra(self, folder: Path) -> None:
        """Where the backend's own files are tied to this world size, a whole-tensor copy beside them; the EMA."""
        if self.ema is not None:
            self.ema.save(self, folder)
        t0 = time.perf_counter()
        fs = self.backend.full_state(self)
        if fs is not None and self.acc.is_main_process:
            portable.write(folder, fs)
            self._portable_s = time.perf_counter() - t0


def _layer_groups(net, u: config.UnfreezeConfig) -> list[modellib.LayerGroup]:
    try:
        return modellib.layer_groups(net, u.group_patterns)
    except FtdistError:
        if u.schedule == "full" and u.lr_decay == 1.0 and not u.group_patterns:
            # nothing needs layer structure: one group holding everything
            return [modellib.LayerGroup("all", [n for n, _ in net.named_parameters()])]
        raise


def components(r: config.Recipe, plan: planlib.Plan, rank: int = 0, main_process_first=None,
               model_init=contextlib.nullcontext) -> Components:
    tokenizer = modellib.load_processor(r.model, r.data.task)  # images: the model's image processor
    derive = r.data.max_length is None and r.data.task != images.TASK  # images are not truncated
    limit = modellib.position_limit(modellib.load_config(r.model)) if derive else None
    if r.data.task == images.TASK:
        splits = images.build(r.data, main_process_first)
        feed = imagefeed.ImageFeed(tokenizer, imagefeed.augment_of(r.data, r.train.seed))
    else:
        splits = data.build(r.data, tokenizer, main_process_first, limit)
        feed = TextFeed(tokenizer, r.data.task == "token-classification")
    if derive:
        r.data.max_length = splits.max_length  # written to the run's recipe.yaml and shown in the plan
        if rank == 0:
            log.info("data.max_length: %d, from the train data (99th percentile of token lengths%s)", splits.max_length,
                     f", at most the model's {limit}" if limit else "")
    if r.eval.decision == "auto":  # resolved here, so the run's recipe.yaml records what was done
        r.eval.decision = decisions.resolve_auto(r.data.task, splits.label_counts, splits.validation is not None)
        if rank == 0 and r.eval.decision != "none":
            log.info("eval.decision: %s (auto: imbalanced train labels; fitted on validation after training)",
                     r.eval.decision)
    with model_init():
        net = modellib.build(r.model, r.data.task, splits.label_names)
    groups = _layer_groups(net, r.unfreeze)
    weights = balanced_weights(splits.train["labels"][:]) if r.data.oversample else None
    counts = splits.label_counts
    if r.data.task == "token-classification" and r.data.class_weights != "none":
        counts = tasks.token_label_counts(splits.train["labels"][:], splits.label_names)
    if rank == 0 and r.data.oversample and r.data.class_weights != "none":
        log.warning("data.oversample and data.class_weights are both on: oversampling already shows the rare "
                    "classes as often as the common ones, so weighting their loss too counts them twice. Keep one "
                    "(or set data.class_weights=none)")
    sampler = GlobalBatchSampler(splits.train["length"][:], plan.per_device_batch, plan.accumulation, plan.world_size,
                                 rank, r.train.seed, r.data.group_by_length, weights)
    steps_per_epoch = sampler.steps_per_epoch()
    return Components(r, plan, tokenizer, splits, net, groups, sampler, Schedule(r.unfreeze, len(groups), steps_per_epoch),
                      tasks.make(r.data, splits.label_names, counts, r.train), steps_per_epoch,
                      r.train.max_steps or r.train.epochs * steps_per_epoch, feed)


def resume_point(run: Run) -> Path | None:
    """The checkpoint to resume from, after checking its recipe; refuses to start over on another run."""
    r, run_dir = run.recipe, run.run_dir
    path = checkpoint.resolve_resume(str(run_dir), r.checkpoint.resume)
    if path is not None:
        runfolder.check_allowed(r.checkpoint.allow_changes)
        saved = path / "recipe.yaml"
        changes = runfolder.recipe_changes(saved.read_text() if saved.is_file() else "", run.recipe_yaml,
                                           r.checkpoint.allow_changes)
        if changes:
            runfolder.refuse_changes(path, changes)
    elif checkpoint.complete_checkpoints(str(run_dir)) or runfolder.finished(run_dir):
        raise FtdistError(f"log.output_dir: {str(run_dir)!r} holds another run ("
                          + ("finished" if runfolder.finished(run_dir) else "with checkpoints")
                          + "); starting a new run there would mix the two. Resume it with checkpoint.resume=latest, "
                          "or give a new log.output_dir")
    return path


def build(recipe: config.Recipe, quiet: bool = False, train_step=None) -> Run:
    """Everything a training run needs, on this process's Accelerator, resumed if the run folder has a checkpoint.
    `train_step`: the loop's optimizer step, which the LR range test of train.lr=auto trains with."""
    from accelerate.utils import set_seed

    r, run_dir = recipe, Path(recipe.log.output_dir)
    runfolder.check(run_dir)  # on every rank, before anything is written: they all see the same folder
    world, nodes = world_from_env()
    plan = planlib.resolve(r.train, world, nodes)
    acc = backendlib.make_accelerator(r, plan.accumulation, log_with=tracking.trackers(r.log.trackers, str(run_dir)),
                                      project_dir=str(run_dir))
    backend = backendlib.for_accelerator(acc, r, plan.per_device_batch)
    metrics.prepare(r.eval.metrics)  # a bad or unreachable metric fails now, not at the first evaluation
    auto_lr = r.train.lr == "auto"
    if auto_lr and train_step is None:
        raise FtdistError("train.lr=auto needs the training step for its LR range test: build(recipe, train_step=...)")
    if auto_lr:  # a resumed run keeps the LR it chose; otherwise group LRs are ratios to the head's until the test
        r.train.lr = lr_find.saved_lr(r) or 1.0
    set_seed(r.train.seed)
    parts = components(r, plan, acc.process_index, acc.main_process_first, backend.model_init)
    run = Run(**{f.name: getattr(parts, f.name) for f in fields(parts)}, acc=acc, backend=backend, run_dir=run_dir,
              recipe_yaml=config.dump(r), quiet=quiet, state=RunState(world_size=acc.num_processes),
              # for MFU; counted whole, before ZeRO-3 partitions
              matmul_params=mfu.matmul_params(parts.net))
    # On GPU, two workers collate the next micro-batches while the device computes; on CPU they would
    # only take cores from the math. Collation draws no random numbers, so the count never changes results.
    workers = r.data.loader_workers
    if workers is None:
        workers = 2 if torch.cuda.is_available() else 0
    run.train_loader = DataLoader(parts.feed.dataset(parts.splits.train), batch_sampler=parts.feed.batch_sampler(parts.sampler),
                                  collate_fn=parts.feed.collator(train=True),
                                  num_workers=workers, pin_memory=torch.cuda.is_available(),
                                  # kept across epochs (the batch sampler runs in this process, so set_epoch
                                  # still applies); otherwise every epoch forks two new workers
                                  persistent_workers=workers > 0)
    if parts.splits.validation is not None:
        run.eval_loader = run.loader(parts.splits.validation)
    # Resume: the stage must be known before the optimizer (and DeepSpeed's partitions) are built.
    run.resume_from = resume_point(run)
    if auto_lr and run.resume_from is None:
        run.lr_found = lr_find.range_test(run, train_step)
        r.train.lr = run.lr_found.lr
        run.recipe_yaml = config.dump(r)
    moved = None  # a checkpoint written on another world size or backend: resumed from whole tensors
    if run.resume_from is not None:
        saved = checkpoint.read_state(run.resume_from)
        known = {f.name for f in fields(RunState)}
        run.state = RunState(**{k: v for k, v in saved.items() if k in known})
        if run.state.step >= run.total_steps:
            what = ("nothing to do: log.output_dir {} holds a finished run (trained {} of {} steps, results in "
                    "final_metrics.json)" if runfolder.finished(run_dir) else "log.output_dir {} holds a run that "
                    "trained {} of {} steps and stopped before its final evaluation (evaluate its last checkpoint "
                    "with `ftdist eval`)").format(repr(str(run_dir)), run.state.step, run.total_steps)
            raise FtdistError(f"{what}; nothing was trained and no file was changed. To continue "
                              "it, raise train.max_steps or train.epochs and allow that: checkpoint.allow_changes="
                              "[train.max_steps] (or [train.epochs]); to start over, give a new log.output_dir")
        written_by = (run.state.world_size, run.state.backend or backend.name)
        if acc.is_main_process:
            log.info("resuming from step %d, written by %d process%s (%s), now %d process%s (%s)", run.state.step,
                     written_by[0], "" if written_by[0] == 1 else "es", written_by[1], acc.num_processes,
                     "" if acc.num_processes == 1 else "es", backend.name)
        if written_by != (acc.num_processes, backend.name):
            moved = portable.read(run.resume_from, saved)
            portable.check_model(moved, run.net, run.resume_from)
            portable.load_weights(moved, run.net)  # before the backend wraps or partitions the model
    run.state.backend = backend.name
    run.start_step, run.time_before = run.state.step, run.state.train_time_s
    run.enter_stage(run.stage_for(run.state.step), first=True)
    if run.resume_from is not None:
        # the recipe's hyperparameters, not the checkpoint's: an allowed change (train.lr...) takes effect
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in run.raw_optimizer.param_groups]
        if moved is None:
            checkpoint.load(acc, run.resume_from)
        else:
            backend.load_full_state(run, moved)
        for g, f in zip(run.raw_optimizer.param_groups, fresh):
            g.update(f)
        run.state.world_size = acc.num_processes
        run.rebuild_scheduler()  # LR is a function of the step under this recipe
    if r.train.ema_decay is not None:
        run.ema = averaging.EMA(r.train.ema_decay)
        if run.resume_from is None or not run.ema.load(run, run.resume_from):
            if run.resume_from is not None and acc.is_main_process:
                log.warning("checkpoint %s holds no EMA of the weights: the EMA starts from the weights at step %d",
                            run.resume_from, run.state.step)
            run.ema.start(run)
    if acc.is_main_process:
        runfolder.claim(run_dir)
        # metrics.jsonl never mixes two runs: a resume drops the rows past its checkpoint, a fresh start all of them
        tracking.truncate_jsonl(run_dir / "metrics.jsonl", run.state.step if run.resume_from is not None else -1)
    tracking.start(run)
    if acc.is_main_process:
        (run_dir / "recipe.yaml").write_text(run.recipe_yaml)
        if run.lr_found is not None:
            lr_find.write(run_dir, run.lr_found)
        (run_dir / "plan.json").write_text(json.dumps(run.describe(acc.distributed_type.value, backend.zero_stage,
                                                                   run.resume_from), indent=1))
    return run
