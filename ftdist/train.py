"""The training loop on one Accelerator, readable top to bottom.

    setup()  builds everything from the recipe (plan, data, model, layer groups, schedule)
    fit()    runs optimizer steps; each step is one *global batch*:
               1. take this rank's `accum` micro-batches of the step
               2. count the real items (examples or labelled tokens) over all ranks
               3. forward/backward each micro-batch with loss = sum / global count
               4. agree on non-finite values, clip, step, schedule
               5. unfreeze transition, eval, checkpoint, preemption check (between steps only)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ftdist import checkpoint, config, data, faults, optim, runtime, track
from ftdist import model as modellib
from ftdist import plan as planlib
from ftdist.errors import FtdistError, NonFiniteError
from ftdist.sampler import GlobalBatchSampler, balanced_weights
from ftdist.redaction import redact
from ftdist.unfreeze import Schedule, apply_stage, decide_plateau

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
    param_groups: list = field(default_factory=list)  # stage's optimizer groups by fully-qualified name


class Collator:
    """Dynamic padding per micro-batch; keeps `real` (placeholder rows are False) and `idx` (sample ids).

    Pads with numpy into the tensors DataCollatorWithPadding / DataCollatorForTokenClassification make
    (same values and dtypes, tested against them): the tokenizer's pad() walks every row in Python, about
    2 ms per batch of 32 on one CPU core, 1% of a small model's step and more on a GPU without workers."""

    def __init__(self, tokenizer, task: str):
        if tokenizer.pad_token_id is None:
            raise FtdistError(f"model.name_or_path: the tokenizer ({type(tokenizer).__name__}) has no pad token, and "
                              "dynamic padding needs one. Set tokenizer.pad_token in the model folder's "
                              "tokenizer_config.json (for GPT-style models, often the eos token)")
        self.pad_values = {"input_ids": tokenizer.pad_token_id, "labels": -100,
                           "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)}
        self.left = tokenizer.padding_side == "left"
        self.task = task

    def _pad(self, key: str, seqs) -> torch.Tensor:
        longest = max(len(s) for s in seqs)
        out = np.full((len(seqs), longest), self.pad_values.get(key, 0), dtype=np.int64)
        for i, s in enumerate(seqs):
            if len(s):
                if self.left:
                    out[i, longest - len(s):] = s
                else:
                    out[i, :len(s)] = s
        return torch.from_numpy(out)

    def __call__(self, items):
        rows = [row for row, _ in items]
        batch = {}
        for key in rows[0]:
            if key in ("idx", "length"):
                continue
            values = [row[key] for row in rows]
            if key == "labels" and self.task != "token-classification":
                batch[key] = torch.tensor(values)  # int64 class ids, float32 regression targets
            else:
                batch[key] = self._pad(key, values)
        batch["real"] = torch.tensor([r for _, r in items], dtype=torch.bool)
        batch["idx"] = torch.tensor([row["idx"] for row in rows])
        return batch


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        i, real = key
        return self.ds[i], real

    def __getitems__(self, keys):
        # one Arrow slice per micro-batch instead of one row lookup per example
        cols = self.ds[[i for i, _ in keys]]
        rows = [dict(zip(cols, values)) for values in zip(*cols.values())]
        return [(row, real) for row, (_, real) in zip(rows, keys)]


def loss_sum_and_count(task: str, logits, batch, class_weights):
    """Summed loss over the real items of one micro-batch, and their (weighted) count."""
    labels, real = batch["labels"], batch["real"]
    if task == "regression":
        per = (logits.squeeze(-1).float() - labels.float()) ** 2
        w = real.float()
    elif task == "token-classification":
        per = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        w = ((labels != -100) & real[:, None]).float()
    else:
        per = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        w = real.float() * (class_weights[labels] if class_weights is not None else 1.0)
    # where() rather than a product: a placeholder row with an inf loss must not turn 0 * inf into NaN
    return torch.where(w > 0, per * w, torch.zeros_like(per)).sum(), w.sum()


def class_weights(counts: list[int], kind: str, beta: float = 0.999):
    if kind == "none":
        return None
    c = torch.tensor(counts, dtype=torch.float32).clamp(min=1)
    if kind == "balanced":  # sklearn's n / (k * count)
        w = c.sum() / (len(c) * c)
    else:  # effective number of samples (Cui et al. 2019)
        w = (1 - beta) / (1 - beta ** c)
        w = w * len(c) / w.sum()
    return w


class Trainer:
    def __init__(self, recipe: config.Recipe, quiet: bool = False):
        self.recipe, self.quiet = recipe, quiet
        self.recipe_yaml = config.dump(recipe)
        self.run_dir = Path(recipe.log.output_dir)

    # ------------------------------------------------------------ setup
    def setup(self) -> None:
        r = self.recipe
        world, nodes = runtime.world_from_env()
        self.plan = planlib.resolve(r.train, world, nodes)
        names = track.trackers(r.log.trackers, str(self.run_dir))
        self.acc = acc = runtime.make_accelerator(r, self.plan.accumulation, log_with=names, project_dir=str(self.run_dir))
        runtime.configure_deepspeed(acc, r, self.plan.per_device_batch)
        from accelerate.utils import set_seed

        set_seed(r.train.seed)
        self.tokenizer = modellib.load_tokenizer(r.model)
        self.splits = data.build(r.data, self.tokenizer, acc.main_process_first)
        # Built whole on every rank, then partitioned by deepspeed.initialize: the same seeded init as
        # one process (ZeRO-3's zero.Init would initialise each partition differently).
        with runtime.full_model_init(acc):
            self.net = modellib.build(r.model, r.data.task, self.splits.label_names)
        self.matmul_params = track.matmul_params(self.net)  # for MFU; counted whole, before ZeRO-3 partitions
        self.groups = self._groups()
        weights = balanced_weights(self.splits.train["labels"][:]) if r.data.oversample else None
        self.sampler = GlobalBatchSampler(self.splits.train["length"][:], self.plan.per_device_batch, self.plan.accumulation,
                                          acc.num_processes, acc.process_index, r.train.seed, r.data.group_by_length,
                                          weights)
        self.steps_per_epoch = self.sampler.steps_per_epoch()
        self.total_steps = r.train.max_steps or r.train.epochs * self.steps_per_epoch
        self.schedule = Schedule(r.unfreeze, len(self.groups), self.steps_per_epoch)
        self.collate = Collator(self.tokenizer, r.data.task)
        # On GPU, two workers collate the next micro-batches while the device computes; on CPU they would
        # only take cores from the math.
        workers = 2 if torch.cuda.is_available() else 0
        self.train_loader = DataLoader(PairDataset(self.splits.train), batch_sampler=self.sampler, collate_fn=self.collate,
                                       num_workers=workers, pin_memory=torch.cuda.is_available(),
                                       # kept across epochs (the batch sampler runs in this process, so
                                       # set_epoch still applies); otherwise every epoch forks two new workers
                                       persistent_workers=workers > 0)
        self.weights = self.weights_cpu = None  # class weights: on the device for the loss, on the CPU for the count
        if r.data.task == "classification":
            counts = [self.splits.label_counts[n] for n in self.splits.label_names]
            self.weights_cpu = class_weights(counts, r.data.class_weights)
            self.weights = None if self.weights_cpu is None else self.weights_cpu.to(acc.device)
        self.eval_loader = None
        if self.splits.validation is not None:
            self.eval_loader = self._eval_loader(self.splits.validation)
        # Resume: the stage must be known before the optimizer (and DeepSpeed's partitions) are built.
        self.state = RunState(world_size=acc.num_processes)
        self.resume_from = checkpoint.resolve_resume(str(self.run_dir), r.checkpoint.resume)
        if self.resume_from is not None:
            saved = checkpoint.read_state(self.resume_from)
            known = {f for f in RunState.__dataclass_fields__}
            self.state = RunState(**{k: v for k, v in saved.items() if k in known})
        elif r.unfreeze.on_plateau:
            self.state.stage = 0
        if runtime.is_deepspeed(acc) and r.train.nonfinite == "skip" and acc.is_main_process:
            log.warning("train.nonfinite=skip: DeepSpeed steps inside backward, so a step cannot be skipped after "
                        "the fact; under DeepSpeed a non-finite loss (checked on all ranks before each backward) "
                        "stops the run and keeps the last good checkpoint")
        self._build_for_stage(self._stage_for(self.state.step), first=True)
        if self.resume_from is not None:
            checkpoint.load(acc, self.resume_from)
            self.state.world_size = acc.num_processes
            # LR is a function of the step under this recipe (load_state restored the saved LRs)
            ufs = {int(k): v for k, v in self.state.unfreeze_steps.items()}
            self.scheduler = optim.build_scheduler(self.raw_optimizer, r.train, r.unfreeze, self.total_steps, ufs,
                                                   last_step=self.state.step)
            if acc.is_main_process:
                track.truncate_jsonl(self.run_dir / "metrics.jsonl", self.state.step)
        acc.init_trackers(r.log.run_name or self.run_dir.name, config=track.flatten(redact(r.to_dict())),
                          init_kwargs=self._tracker_kwargs())
        self._write_plan()

    def _groups(self):
        try:
            return modellib.layer_groups(self.net, self.recipe.unfreeze.group_patterns)
        except FtdistError:
            u = self.recipe.unfreeze
            if u.schedule == "full" and u.lr_decay == 1.0 and not u.group_patterns:
                # nothing needs layer structure: one group holding everything
                return [modellib.LayerGroup("all", [n for n, _ in self.net.named_parameters()])]
            raise

    def _tracker_kwargs(self) -> dict:
        r = self.recipe
        if "wandb" not in r.log.trackers:
            return {}
        run_id_file = self.run_dir / "wandb_run_id"
        if self.acc.is_main_process and not run_id_file.exists():
            import uuid
            self.run_dir.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text(uuid.uuid4().hex[:12])
        self.acc.wait_for_everyone()
        run_id = run_id_file.read_text().strip()
        import wandb

        # x_disable_meta: wandb otherwise records the process command line, where an override could hold a secret
        return {"wandb": {"name": r.log.run_name or self.run_dir.name, "tags": r.log.tags, "id": run_id,
                          "resume": "allow", "dir": str(self.run_dir), "settings": wandb.Settings(x_disable_meta=True)}}

    def _eval_loader(self, ds):
        loader = DataLoader(PairDataset(ds), batch_size=self.recipe.eval.per_device_batch_size, shuffle=False,
                            collate_fn=self.collate, sampler=[(i, True) for i in range(len(ds))])
        return self.acc.prepare_data_loader(loader)

    def _stage_for(self, step: int) -> int:
        if self.recipe.unfreeze.on_plateau:
            return self.state.stage
        return self.schedule.stage_at(step)

    # ------------------------------------------------------------ stage / backend
    def _build_for_stage(self, stage: int, first: bool = False) -> None:
        """Make `stage` trainable on every rank and (re)build what the backend needs for it.

        - 1 process: flip requires_grad; the optimizer already holds every parameter.
        - DDP: DDP registers only parameters requiring grad when it wraps the model, so the model is
          re-wrapped; otherwise a newly unfrozen parameter trains on each rank alone and ranks drift.
        - DeepSpeed: ZeRO partitions only parameters trainable at initialize, so the engine is
          rebuilt with the new trainable set, carrying the optimizer state of groups already training.
        """
        acc, r = self.acc, self.recipe
        initial = set(self.schedule.trainable_groups(0))
        for g in self.schedule.trainable_groups(stage):
            # first step each group trains (drives its optional LR re-warmup); saved for resume
            self.state.unfreeze_steps.setdefault(str(g), 0 if g in initial else self.state.step)
        if runtime.is_deepspeed(acc):
            from ftdist import zero
            self.model, self.optimizer, self.raw_optimizer = zero.build(self, stage, first)
        else:
            net = self.net
            self.trainable = apply_stage(net, self.groups, self.schedule, stage)
            if first:
                pgroups = optim.param_groups(net, self.groups, r.train, r.unfreeze)
                self.raw_optimizer = optim.build_optimizer(pgroups, r.train)
                self.model, self.optimizer = acc.prepare(net, self.raw_optimizer)
            elif acc.num_processes > 1:
                acc._models = [m for m in acc._models if m is not self.model]
                self.model = acc.prepare_model(net)
        # Rebuilt at every transition on every backend: a group's optional re-warmup starts at its unfreeze step.
        ufs = {int(k): v for k, v in self.state.unfreeze_steps.items()}
        self.scheduler = optim.build_scheduler(self.raw_optimizer, r.train, r.unfreeze, self.total_steps, ufs,
                                               last_step=self.state.step)
        # the model's trainable tensors, for clipping: changes only here, so not re-listed every step
        self.clip_params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                             for p in self.net.parameters() if p.requires_grad)
        self.state.stage = stage
        self.state.param_groups = [{"name": g["name"], "params": self._names(g["params"])}
                                   for g in self.raw_optimizer.param_groups]
        if not first:
            # what the last stage cost: frozen blocks below the lowest trainable one build no graph
            prev = getattr(self, "stage_stats", None)
            if prev and prev["steps"]:
                acc.log({"stage/index": prev["stage"], "stage/steps": prev["steps"], "stage/trainable_params": prev["trainable"],
                         "stage/mean_step_time_s": prev["time"] / prev["steps"]}, step=self.state.step)
                if acc.is_main_process and not self.quiet:
                    log.info("stage %d done: %d steps, %.3f s/step, %s trainable params", prev["stage"], prev["steps"],
                             prev["time"] / prev["steps"], f"{prev['trainable']:,}")
            acc.log({"train/stage": stage, "train/trainable_params": self.trainable}, step=self.state.step)
            if acc.is_main_process and not self.quiet:
                log.info("step %d: unfreeze stage %d -> trainable %s params (%s)", self.state.step, stage,
                         f"{self.trainable:,}", ", ".join(self.groups[g].name for g in self.schedule.trainable_groups(stage)))
        self.stage_stats = {"stage": stage, "steps": 0, "time": 0.0, "trainable": self.trainable}
        if r.train.check_sync and not first:
            self.check_sync("transition")

    def _names(self, params) -> list[str]:
        ids = {id(p): n for n, p in self.net.named_parameters()}
        return [ids[id(p)] for p in params if id(p) in ids]

    def check_sync(self, where: str) -> None:
        """Parameter checksums compared across ranks; loud failure if any rank drifted."""
        acc = self.acc
        if acc.num_processes == 1:
            return
        from ftdist import zero
        sums = zero.param_checksums(self)
        gathered = [torch.zeros_like(sums) for _ in range(acc.num_processes)]
        torch.distributed.all_gather(gathered, sums)
        bad = [i for i, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
        if bad:
            raise FtdistError(f"sync check failed at step {self.state.step} ({where}): parameters on rank(s) {bad} "
                              "differ from rank 0. This is a bug; please report it with `ftdist env`")

    # ------------------------------------------------------------ the loop
    def fit(self) -> dict:
        acc, r, st = self.acc, self.recipe, self.state
        from tqdm.auto import tqdm

        self._print_plan()  # before the bar, which would otherwise share its first line
        bar = tqdm(total=self.total_steps, initial=st.step, disable=not (acc.is_main_process and r.log.progress)
                   or self.quiet, desc="train", dynamic_ncols=True)
        preempt = runtime.Preemption()
        started, samples, tokens, real_tokens = time.perf_counter(), 0, 0, 0
        last_eval: dict = {}
        self.model.train()
        while st.step < self.total_steps:
            self.sampler.set_epoch(st.epoch, st.step_in_epoch)
            it = iter(self.train_loader)
            while st.step_in_epoch < self.steps_per_epoch and st.step < self.total_steps:
                window = [next(it) for _ in range(self.plan.accumulation)]
                t0 = time.perf_counter()
                faults.maybe_fail(st.step + 1, acc.process_index)
                loss, grad_norm, ok = self.train_step(window)
                dt = time.perf_counter() - t0
                st.step += 1
                st.step_in_epoch += 1
                self.stage_stats["steps"] += 1
                self.stage_stats["time"] += dt
                n_real = sum(int(b["real"].sum()) for b in window)
                samples += n_real
                tokens += sum(int(b["input_ids"].numel()) for b in window)
                real_tokens += sum(int(b["attention_mask"].sum()) for b in window)
                bar.update(1)
                if st.step % r.log.every_steps == 0 or st.step == 1:
                    self.log_step(loss, grad_norm, dt, samples, tokens, real_tokens, started)
                self.record_step(loss, window)
                self.after_step(last_eval)
                if preempt.requested(acc):
                    path = self.save()
                    if acc.is_main_process:
                        log.warning("stop requested: checkpoint %s saved at step %d; exiting %d (requeue to resume)",
                                    path, st.step, runtime.PREEMPTED_EXIT)
                    preempt.mark_done(acc)
                    acc.end_training()
                    # Under ./launch the marker carries the news (launch exits 99): exiting 0 here keeps
                    # torchrun from printing a failure report for every node. Run bare, exit 99 ourselves.
                    raise SystemExit(0 if preempt.stop_file else runtime.PREEMPTED_EXIT)
            if st.step_in_epoch >= self.steps_per_epoch:
                st.epoch += 1
                st.step_in_epoch = 0
                just_evaluated = bool(r.eval.every_steps) and st.step % r.eval.every_steps == 0
                if self.eval_loader is not None and not just_evaluated:
                    last_eval = self.evaluate_and_track()
        bar.close()
        train_time = time.perf_counter() - started
        return self.finish(train_time, samples, last_eval)

    def train_step(self, window):
        """One optimizer step over this rank's micro-batches; returns (global mean loss, grad norm, stepped)."""
        acc, r, st = self.acc, self.recipe, self.state
        device = acc.device
        # The normaliser is the real item count of the whole global batch, all ranks and micro-batches:
        # loss = sum / count gives the same gradient at every world size and accumulation
        # (per-micro-batch means would weight short micro-batches more: HF Trainer's pre-2024 bug).
        # Counted on the CPU copies: no device sync.
        local = 0.0
        for b in window:
            if r.data.task == "token-classification":
                local += float(((b["labels"] != -100) & b["real"][:, None]).sum())
            elif self.weights is not None:
                local += float((b["real"].float() * self.weights_cpu[b["labels"]]).sum())
            else:
                local += float(b["real"].sum())
        count = runtime.all_sum(acc, local)
        window = [{k: v.to(device, non_blocking=True) for k, v in b.items() if k != "idx"} for b in window]
        # DDP and ZeRO average gradients over ranks, and accelerate/DeepSpeed divide by accumulation:
        # multiplying back gives exactly d(sum over the global batch)/count.
        scale = acc.num_processes * self.plan.accumulation / max(count, 1e-12)
        loss_total = torch.zeros((), dtype=torch.float64, device=device)
        for b in window:
            with acc.accumulate(self.model):
                inputs = {k: v for k, v in b.items() if k not in ("labels", "real", "idx")}
                with acc.autocast():
                    logits = self.model(**inputs).logits
                loss_sum, _ = loss_sum_and_count(r.data.task, logits, b, self.weights)
                loss_sum = faults.maybe_nan(loss_sum, st.step + 1, acc.process_index)
                if runtime.is_deepspeed(acc):
                    # DeepSpeed steps inside backward at the boundary: check before each backward, on all ranks.
                    if runtime.any_rank(acc, not torch.isfinite(loss_sum).item()):
                        raise NonFiniteError(f"non-finite loss at step {st.step + 1} under DeepSpeed, which steps inside "
                                             "backward, so the step cannot be skipped; the last good checkpoint is kept. "
                                             "Lower train.lr or check the data")
                acc.backward(loss_sum * scale)
                loss_total += loss_sum.detach().double()
        if runtime.is_deepspeed(acc):
            loss = runtime.all_sum(acc, loss_total.item()) / max(count, 1e-12)
            norm = self.model.get_global_grad_norm()
            grad_norm = float(norm) if norm is not None else float("nan")
            self.scheduler.step()
            return loss, grad_norm, True
        max_norm = r.train.max_grad_norm or float("inf")
        norm = acc.clip_grad_norm_(self.clip_params, max_norm)
        # loss and grad norm come back to the host in one read: one device sync per step on a GPU
        local_loss, grad_norm = torch.stack([loss_total, torch.as_tensor(norm, device=device).double()]).tolist()
        loss = runtime.all_sum(acc, local_loss) / max(count, 1e-12)
        if runtime.any_rank(acc, not math.isfinite(loss) or not math.isfinite(grad_norm)):
            return self._skip(loss)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.nonfinite_in_row = 0
        return loss, grad_norm, True

    def _skip(self, loss):
        st, r = self.state, self.recipe
        self.optimizer.zero_grad(set_to_none=True)
        st.skipped_steps += 1
        st.nonfinite_in_row += 1
        if r.train.nonfinite == "abort" or st.nonfinite_in_row >= r.train.max_nonfinite:
            why = ("train.nonfinite=abort" if r.train.nonfinite == "abort"
                   else f"{st.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite={r.train.max_nonfinite})")
            raise NonFiniteError(f"non-finite loss or gradient at step {st.step + 1}: stopping ({why}). The last good "
                                 f"checkpoint in {checkpoint.ckpt_root(str(self.run_dir))} is kept. Lower train.lr, "
                                 "enable clipping, or check the data")
        if self.acc.is_main_process:
            log.warning("step %d: non-finite loss or gradient on some rank; step skipped (%d in a row)",
                        st.step + 1, st.nonfinite_in_row)
        self.scheduler.step()  # keep the LR schedule a function of the step count
        return loss, float("nan"), False

    def record_step(self, loss, window) -> None:
        """Per-step record for parity/resume tests: loss and the sample ids of this rank (FTDIST_TRACE_DIR)."""
        trace = os.environ.get("FTDIST_TRACE_DIR")
        if not trace:
            return
        ids = [int(i) for b in window for i, real in zip(b["idx"], b["real"]) if real]
        path = Path(trace) / f"rank{self.acc.process_index}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.state.step, "loss": loss, "ids": ids, "stage": self.state.stage,
                                "trainable": self.trainable, "world": self.acc.num_processes}) + "\n")

    def after_step(self, last_eval: dict) -> None:
        r, st = self.recipe, self.state
        if not r.unfreeze.on_plateau:
            new = self._stage_for(st.step)
            if new != st.stage:
                self._build_for_stage(new)
        if r.eval.every_steps and st.step % r.eval.every_steps == 0 and self.eval_loader is not None:
            last_eval.update(self.evaluate_and_track())
            if r.unfreeze.on_plateau and st.stage < self.schedule.n_stages - 1:
                if decide_plateau(self.acc, st.metric_history, r.eval.greater_is_better):
                    self._build_for_stage(st.stage + 1)
        if r.checkpoint.every_steps and st.step % r.checkpoint.every_steps == 0:
            self.save()
        if r.train.check_sync and st.step % r.train.check_sync == 0:
            self.check_sync("periodic")

    # ------------------------------------------------------------ eval, logging, saving
    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        from ftdist import metrics

        acc, r = self.acc, self.recipe
        self.model.eval()
        preds, refs, loss_sum, count = [], [], 0.0, 0.0
        for b in loader:
            inputs = {k: v for k, v in b.items() if k not in ("labels", "real", "idx")}
            with acc.autocast():
                logits = self.model(**inputs).logits.float()
            labels = b["labels"]
            if r.data.task == "token-classification":
                logits = acc.pad_across_processes(logits, dim=1, pad_index=0)
                labels = acc.pad_across_processes(labels, dim=1, pad_index=-100)
            logits, labels = acc.gather_for_metrics((logits, labels))
            real = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
            s, c = loss_sum_and_count(r.data.task, logits, {"labels": labels, "real": real}, None)
            loss_sum += float(s)
            count += float(c)
            if r.data.task == "regression":
                preds += logits.squeeze(-1).tolist()
                refs += labels.float().tolist()
            elif r.data.task == "token-classification":
                names = self.splits.label_names
                for p_row, l_row in zip(logits.argmax(-1).tolist(), labels.tolist()):
                    keep = [(names[p], names[t]) for p, t in zip(p_row, l_row) if t != -100]
                    preds.append([p for p, _ in keep])
                    refs.append([t for _, t in keep])
            else:
                preds += logits.argmax(-1).tolist()
                refs += labels.tolist()
        self.model.train()
        out = metrics.compute(r.eval.metrics, preds, refs)
        out["loss"] = loss_sum / max(count, 1.0)
        out["n_examples"] = len(refs)
        return out

    def evaluate_and_track(self) -> dict:
        r, st = self.recipe, self.state
        result = self.evaluate(self.eval_loader)
        value = result[r.eval.best_metric]
        st.metric_history.append(value)
        better = st.best is None or (value > st.best if r.eval.greater_is_better else value < st.best)
        if better:
            st.best, st.best_step = value, st.step
        self.acc.log({f"eval/{k}": v for k, v in result.items()}, step=st.step)
        if self.acc.is_main_process and not self.quiet:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "n_examples")
            log.info("eval step %d epoch %d: %s%s", st.step, st.epoch, shown, "  (best)" if better else "")
        if better and self.eval_loader is not None:
            self.save_best(result)
        return result

    def save_best(self, result: dict) -> None:
        """The best model so far is exported (safetensors) to <run>/best."""
        checkpoint.export(self.acc, self.model, self.tokenizer, self.run_dir / "best", self.recipe_yaml,
                          {"step": self.state.step, **result})

    def log_step(self, loss, grad_norm, dt, samples, tokens, real_tokens, started) -> None:
        acc, st = self.acc, self.state
        elapsed = time.perf_counter() - started
        values = {"train/loss": loss, "train/grad_norm": grad_norm, "train/step_time_s": dt,
                  "train/samples_per_s": samples * acc.num_processes / max(elapsed, 1e-9),
                  "train/tokens_per_s": real_tokens * acc.num_processes / max(elapsed, 1e-9),
                  "train/real_token_fraction": real_tokens / max(tokens, 1),
                  "train/trainable_params": self.trainable, "train/stage": st.stage,
                  "train/epoch": st.epoch + st.step_in_epoch / self.steps_per_epoch,
                  "train/skipped_steps": st.skipped_steps}
        for g in self.raw_optimizer.param_groups:
            values[f"lr/{g['name']}"] = g["lr"]
        if torch.cuda.is_available():
            values["train/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
            cfg = self.net.config
            seq = tokens / max(samples, 1)  # mean padded length
            m = track.mfu(self.matmul_params, getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0), seq,
                          values["train/tokens_per_s"], acc.num_processes, torch.cuda.get_device_name(0))
            if m is not None:
                values["train/mfu"] = m
        else:
            import resource
            values["train/peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        acc.log(values, step=st.step)

    def save(self) -> Path:
        return checkpoint.save(self.acc, str(self.run_dir), self.state.step, asdict(self.state), self.recipe_yaml,
                               self.recipe.checkpoint.keep_last)

    def _write_plan(self) -> None:
        if not self.acc.is_main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "recipe.yaml").write_text(self.recipe_yaml)
        (self.run_dir / "plan.json").write_text(json.dumps(self.plan_dict(), indent=1))

    def plan_dict(self) -> dict:
        return {**self.plan.to_dict(), "precision": self.recipe.train.precision,
                "backend": self.acc.distributed_type.value, "zero_stage": runtime.zero_stage(self.acc),
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "train_examples": len(self.splits.train), "label_counts": self.splits.label_counts,
                "dropped_rows": self.splits.dropped,
                "layer_groups": [{"name": g.name, "params": g.count(self.net)} for g in self.groups],
                "stages": [{"stage": s, "from_step": self.schedule.transition_step(s),
                            "groups": [self.groups[i].name for i in self.schedule.trainable_groups(s)]}
                           for s in range(self.schedule.n_stages)],
                "resumed_from": str(self.resume_from) if self.resume_from else None}

    def _print_plan(self) -> None:
        if not self.acc.is_main_process or self.quiet:
            return
        p = self.plan_dict()
        lines = ["plan:"] + ["  " + line for line in self.plan.lines()] + [
            f"  precision         {p['precision']}   backend {p['backend']}   zero stage {p['zero_stage']}",
            f"  steps             {p['total_steps']} ({p['steps_per_epoch']} per epoch, {p['train_examples']} examples)"]
        if p["label_counts"]:
            lines.append("  labels            " + ", ".join(f"{k}: {v}" for k, v in p["label_counts"].items()))
        if p["resumed_from"]:
            lines.append(f"  resuming from     {p['resumed_from']} (step {self.state.step})")
        for s in p["stages"]:
            lines.append(f"  stage {s['stage']} from step {s['from_step']}: {', '.join(s['groups'])}")
        log.info("\n".join(lines))

    def finish(self, train_time: float, samples: int, last_eval: dict) -> dict:
        acc, r, st = self.acc, self.recipe, self.state
        final = {}
        if self.eval_loader is not None:
            final["validation"] = self.evaluate(self.eval_loader)
        if self.splits.test is not None:
            final["test"] = self.evaluate(self._eval_loader(self.splits.test))
        if r.checkpoint.every_steps and st.step % r.checkpoint.every_steps:
            self.save()  # (a multiple of every_steps was just saved by after_step)
        metrics = {"train_time_s": train_time, "samples_per_s": samples * acc.num_processes / max(train_time, 1e-9),
                   "steps": st.step, "skipped_steps": st.skipped_steps, "best_metric": r.eval.best_metric,
                   "best": st.best, "best_step": st.best_step, **final}
        if r.checkpoint.export:
            checkpoint.export(acc, self.model, self.tokenizer, self.run_dir / "model", self.recipe_yaml, metrics)
        if acc.is_main_process:
            (self.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
            acc.log({f"final/{k}": v for k, v in track.flatten(final).items() if isinstance(v, (int, float))}, step=st.step)
            # the summary shows even under --quiet ("warnings and the final summary only")
            rows = [("train time", f"{train_time:.1f} s"), ("samples/s", f"{metrics['samples_per_s']:.1f}"),
                    ("steps", str(st.step)),
                    (f"best {r.eval.best_metric}", f"{st.best:.4f} at step {st.best_step}" if st.best is not None else "-")]
            for split, res in final.items():
                rows.append((f"final {split}", "  ".join(f"{k}={v:.4f}" for k, v in res.items() if k != "n_examples")))
            rows.append(("model", str(self.run_dir / "model") if r.checkpoint.export else "(export off)"))
            print(track.summary_table(rows), flush=True)
        acc.end_training()
        if acc.is_main_process and "jsonl" in r.log.trackers:
            from ftdist import report
            report.build(self.run_dir)
        return metrics


def run(recipe: config.Recipe, quiet: bool = False) -> dict:
    trainer = Trainer(recipe, quiet=quiet)
    trainer.setup()
    return trainer.fit()
