"""Backends behind one small interface: one process, DDP, DeepSpeed ZeRO.

The training loop asks a backend for three things and never branches on which one it has:
    prepare(run, stage, first)     make `stage` trainable and (re)build model + optimizer for it
    check_loss(loss_sum, step)     before each backward (ZeRO steps inside backward)
    step(run, loss_total, count)   clip, reduce the loss, and step the optimizer if every rank is finite
and, for a checkpoint that moves to another world size or backend (ftdist.portable):
    full_state(run)                whole tensors by name (collective), or None where accelerate's files are whole
    load_full_state(run, fs)       after prepare: the optimizer state from whole tensors

Every edit of accelerate's private state is in this module. Checked on accelerate 1.15.0;
tests/test_backend.py fails if those attributes change.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os

import torch

from ftdist import optim, portable, zero_layout
from ftdist.collectives import all_sum, any_rank
from ftdist.config import Recipe
from ftdist.errors import FtdistError, NonFiniteError
from ftdist.unfreeze import apply_stage

log = logging.getLogger("ftdist")


def make_accelerator(recipe: Recipe, accumulation: int, log_with=None, project_dir=None):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    precision = recipe.train.precision
    if precision == "fp16" and not torch.cuda.is_available():
        raise FtdistError("train.precision: fp16 needs a CUDA GPU and none is visible. On CPU use train.precision=bf16 "
                          "(or no)")
    # gloo on CPU: accelerate otherwise picks a backend that is not there and runs each rank as its own
    # one-process job. The timeout bounds how long a dead rank can hang the rest.
    on_cpu = not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if on_cpu:
        # Before deepspeed is first imported: a ZeRO run needs it to form a CPU world, and any other run
        # imports deepspeed too (accelerate's unwrap_model, at export), which otherwise warns on every
        # CPU machine that it was "unable to detect" an accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # (only when there is a world to form: a backend given to a single process makes accelerate
    # believe it is distributed)
    backend = "gloo" if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    pg = InitProcessGroupKwargs(backend=backend, timeout=datetime.timedelta(seconds=recipe.train.timeout_s))
    acc = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accumulation,
                      kwargs_handlers=[pg], log_with=log_with, project_dir=project_dir,
                      # cpu=True is what makes a CPU-only DDP world form (without it each rank runs alone);
                      # DeepSpeed must not get it (it would fall back to plain DDP), DS_ACCELERATOR does the job.
                      cpu=on_cpu and not deepspeed)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != world_env:
        raise FtdistError(f"launcher asked for {world_env} processes but accelerate formed a world of {acc.num_processes}; "
                          "on CPU the processes need the gloo backend (set by ftdist) and, for DeepSpeed, DS_ACCELERATOR=cpu")
    return acc


def for_accelerator(acc, recipe: Recipe, per_device_batch: int) -> Backend:
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        return ZeRO(acc, recipe, per_device_batch)
    return (DDP if acc.num_processes > 1 else Single)(acc, recipe)


class Backend:
    zero_stage: int | None = None
    name = "single"

    def __init__(self, acc, recipe: Recipe):
        self.acc, self.recipe = acc, recipe

    def model_init(self):
        """Context in which the model is built (whole, with one process's seeded init)."""
        return contextlib.nullcontext()

    def prepare(self, run, stage: int, first: bool) -> int:
        """Returns the trainable parameter count (whole tensors, also under ZeRO-3)."""
        net = run.net
        trainable = apply_stage(net, run.groups, run.schedule, stage)
        if first:
            groups = optim.param_groups(net, run.groups, self.recipe.train, self.recipe.unfreeze)
            run.raw_optimizer = optim.build_optimizer(groups, self.recipe.train)
            run.model, run.optimizer = self.acc.prepare(net, run.raw_optimizer)
        else:
            self.rewrap(run)
        return trainable

    def rewrap(self, run) -> None:
        """One process: nothing to do, the optimizer already holds every parameter."""

    def release(self, run) -> None:
        """Forget the prepared model and optimizer (accelerate keeps them in its lists), so that a fresh
        `prepare` starts over: used after the LR range test. The model's own module stays."""
        self.acc._models = [m for m in self.acc._models if m is not run.model]
        self.acc._optimizers = [o for o in self.acc._optimizers if o is not run.optimizer]
        self.acc.step = 0  # accelerate's micro-batch count, which places the accumulation boundaries
        run.model = run.optimizer = run.raw_optimizer = run.scheduler = None

    def restore_weights(self, run, whole: dict) -> None:
        """Put whole tensors (by parameter name) back into the model, as this rank holds them."""
        self.swap(run, {n: self.to_local(whole[n], t) for n, t in self.local_weights(run)})

    def check_loss(self, loss_sum, step: int) -> None:
        """Torch optimizers step after the fact, so a non-finite step can still be skipped: nothing to check."""

    def step(self, run, loss_total: torch.Tensor, count: float) -> tuple[float, float, bool]:
        """Clip, reduce, and step if every rank is finite; returns (global mean loss, grad norm, stepped)."""
        max_norm = self.recipe.train.max_grad_norm or float("inf")
        norm = self.acc.clip_grad_norm_(run.clip_params, max_norm)
        # loss and grad norm come back to the host in one read: one device sync per step on a GPU
        local_loss, grad_norm = torch.stack([loss_total, torch.as_tensor(norm, device=self.acc.device).double()]).tolist()
        loss = all_sum(self.acc, local_loss) / max(count, 1e-12)
        finite = not any_rank(self.acc, not math.isfinite(loss) or not math.isfinite(grad_norm))
        if finite:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, finite

    def local_weights(self, run) -> list[tuple[str, torch.Tensor]]:
        """(name, the tensor this rank holds of it): whole parameters except under ZeRO-3."""
        return [(n, p.data) for n, p in run.net.named_parameters()]

    def to_local(self, full: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """This rank's part of a whole parameter, shaped like `local`."""
        return full.to(local.dtype)

    def whole(self, run, local: dict) -> dict:
        """Whole fp32 CPU tensors of this rank's `local` tensors (as local_weights lays them out)."""
        return {n: t.detach().float().cpu().clone() for n, t in local.items()}

    @torch.no_grad()
    def swap(self, run, local: dict) -> list:
        """Put `local` (this rank's tensors, as local_weights lays them out) into the model; returns what
        was overwritten, as (tensor, old value) pairs to copy back."""
        saved = []
        for n, t in self.local_weights(run):
            saved.append((t, t.clone()))
            t.copy_(local[n].to(t.dtype))
        return saved

    def full_state(self, run) -> portable.FullState | None:
        """None: accelerate's model.safetensors and optimizer.bin already hold whole tensors."""
        return None

    def load_full_state(self, run, fs: portable.FullState) -> None:
        names = {id(p): n for n, p in run.net.named_parameters()}
        for g in run.raw_optimizer.param_groups:
            for p in g["params"]:
                s = portable.adam_state(fs, names[id(p)], g["name"], p)
                if s is not None:
                    run.raw_optimizer.state[p] = s


class Single(Backend):
    pass


class DDP(Backend):
    name = "ddp"

    def rewrap(self, run) -> None:
        """DDP registers only the parameters requiring grad when it wraps the model, so the model is
        re-wrapped at a transition; otherwise a newly unfrozen parameter trains on each rank alone."""
        self.acc._models = [m for m in self.acc._models if m is not run.model]
        run.model = self.acc.prepare_model(run.net)


class ZeRO(Backend):
    """ZeRO keeps in its optimizer partitions only the parameters that are trainable when
    `deepspeed.initialize` runs, and an empty parameter group crashes it. So each stage gets an engine
    built over exactly its trainable groups; at a transition the fp32 master weights and the Adam moments
    and step counts of groups already training are carried into the new engine, per named optimizer
    group, as this rank's flat partitions (same group, same world size: same layout). DeepSpeed's
    per-parameter fragment API links its Adam views lazily and failed across a rebuild, so it is not used."""

    def __init__(self, acc, recipe: Recipe, per_device_batch: int):
        super().__init__(acc, recipe)
        self.zero_stage = acc.state.deepspeed_plugin.zero_stage
        self.name = f"zero{self.zero_stage}"
        # values the recipe owns go into DeepSpeed's config here; the preset has them as "auto"
        cfg = acc.state.deepspeed_plugin.deepspeed_config
        cfg["train_micro_batch_size_per_gpu"] = per_device_batch
        cfg["gradient_clipping"] = recipe.train.max_grad_norm or 0.0
        cfg["train_batch_size"] = per_device_batch * acc.gradient_accumulation_steps * acc.num_processes
        zero = cfg.setdefault("zero_optimization", {})
        if zero.get("stage") == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        if recipe.train.nonfinite == "skip" and acc.is_main_process:
            log.warning("train.nonfinite=skip: DeepSpeed steps inside backward, so a step cannot be skipped after "
                        "the fact; under DeepSpeed a non-finite loss (checked on all ranks before each backward) "
                        "stops the run and keeps the last good checkpoint")

    @contextlib.contextmanager
    def model_init(self):
        """Outside ZeRO-3's zero.Init, so the seeded init equals one process's: accelerate registers the
        DeepSpeed config with transformers whenever ZeRO-3 is on, and transformers then builds models
        partitioned under zero.Init, which initialises each partition differently."""
        import transformers.integrations.deepspeed as hf_ds

        saved = hf_ds._hf_deepspeed_config_weak_ref
        hf_ds.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            hf_ds._hf_deepspeed_config_weak_ref = saved

    def prepare(self, run, stage: int, first: bool) -> int:
        carried = None
        if not first:
            carried = self._collect(run)
            self._teardown(run)
        trainable = apply_stage(run.net, run.groups, run.schedule, stage)
        only = run.schedule.trainable_groups(stage)
        raw = optim.build_optimizer(optim.param_groups(run.net, run.groups, self.recipe.train, self.recipe.unfreeze,
                                                       only), self.recipe.train)
        engine, ds_opt = self.acc.prepare(run.net, raw)
        if carried is not None:
            self._restore(engine, raw, carried)
        run.model, run.optimizer, run.raw_optimizer = engine, ds_opt, raw
        return trainable

    def check_loss(self, loss_sum, step: int) -> None:
        if any_rank(self.acc, not torch.isfinite(loss_sum).item()):
            raise NonFiniteError(f"non-finite loss at step {step} under DeepSpeed, which steps inside "
                                 "backward, so the step cannot be skipped; the last good checkpoint is kept. "
                                 "Lower train.lr or check the data")

    def step(self, run, loss_total, count):
        # the engine clipped and stepped inside backward at the accumulation boundary
        loss = all_sum(self.acc, loss_total.item()) / max(count, 1e-12)
        norm = run.model.get_global_grad_norm()
        return loss, float(norm) if norm is not None else float("nan"), True

    def local_weights(self, run):
        if self.zero_stage != 3:
            return super().local_weights(run)
        return [(n, p.ds_tensor.data) for n, p in run.net.named_parameters()]

    def to_local(self, full, local):
        """ZeRO-3 keeps each parameter flattened, zero-padded to a multiple of the world size, one equal
        slice per rank (checked against the optimizer's own gather by `averaging.check_layout`)."""
        if self.zero_stage != 3:
            return super().to_local(full, local)
        n, rank = local.numel(), self.acc.process_index
        flat = torch.zeros(n * self.acc.num_processes, dtype=local.dtype)
        flat[:full.numel()] = full.flatten().to(local.dtype)
        return flat[rank * n:(rank + 1) * n].view_as(local).to(local.device)

    def whole(self, run, local: dict) -> dict:
        """Collective under ZeRO-3: every rank's slices of `local` all-gathered into whole fp32 tensors.
        Not deepspeed.zero.GatheredParameters: it hands back a parameter that ZeRO-3 keeps whole
        (ds_persist, under stage3_param_persistence_threshold) as it was before the last optimizer step."""
        if self.zero_stage != 3:
            return super().whole(run, local)
        import torch.distributed as dist

        out = {}
        for n, p in run.net.named_parameters():
            t = local[n].contiguous().flatten()
            buf = torch.empty(t.numel() * self.acc.num_processes, dtype=t.dtype, device=t.device)
            dist.all_gather_into_tensor(buf, t)
            out[n] = buf[:p.ds_numel].view(p.ds_shape).float().cpu()
        return out

    def swap(self, run, local: dict) -> list:
        """Also the whole copy of each parameter ZeRO-3 keeps gathered at the moment (a persistent one): forward
        passes and exports read that copy. Collective."""
        saved = super().swap(run, local)
        if self.zero_stage == 3:
            whole = self.whole(run, local)
            for n, p in run.net.named_parameters():
                if p.data.numel() == p.ds_numel > 0:
                    saved.append((p.data, p.data.clone()))
                    p.data.copy_(whole[n].view_as(p.data).to(p.dtype))
        return saved

    def _layouts(self, run):
        names = [g["name"] for g in run.raw_optimizer.param_groups]
        return zero_layout.layouts(run.model.optimizer, names, self.acc.num_processes)

    def full_state(self, run) -> portable.FullState:
        """Every rank's slices gathered into whole tensors (all ranks call it; each gets the same result).
        Trainable weights come from the fp32 master partitions, exact also under bf16."""
        names = {id(p): n for n, p in run.net.named_parameters()}
        fs = portable.FullState({})
        for lay, flat in zip(self._layouts(run), zero_layout.fp32_flats(run.model.optimizer)):
            shapes = [getattr(p, "ds_shape", p.shape) for p in lay.params]
            for p, t, shape in zip(lay.params, lay.from_flats(zero_layout.all_gather_flat(flat, lay.sizes)), shapes):
                fs.weights[names[id(p)]] = t.view(shape)
            state = run.raw_optimizer.state.get(flat)
            if state:
                fs.steps[lay.group] = float(state["step"])
                for k in portable.MOMENTS:
                    whole = lay.from_flats(zero_layout.all_gather_flat(state[k], lay.sizes))
                    for p, t, shape in zip(lay.params, whole, shapes):
                        fs.moments.setdefault(names[id(p)], {})[k] = t.view(shape)
        rest = [(n, p) for n, p in run.net.named_parameters() if n not in fs.weights]
        with gathered([p for _, p in rest]):
            for n, p in rest:
                fs.weights[n] = p.detach().float().cpu().clone()
        return fs

    def load_full_state(self, run, fs: portable.FullState) -> None:
        """The model was built from fs's weights; put the fp32 masters and Adam state into this rank's
        partitions. The layout is checked on the weights first: a mismatch is an error, not a scramble."""
        names = {id(p): n for n, p in run.net.named_parameters()}
        rank = self.acc.process_index
        for lay, flat in zip(self._layouts(run), zero_layout.fp32_flats(run.model.optimizer)):
            pnames = [names[id(p)] for p in lay.params]
            built = lay.to_flat([fs.weights[n] for n in pnames], rank, flat)
            bit16 = lay.params[0].dtype
            if not torch.equal(built.to(bit16).to(flat.dtype), flat):
                raise FtdistError(f"resuming on ZeRO-{self.zero_stage}: DeepSpeed {_ds_version()} lays out optimizer "
                                  f"group {lay.group} differently from what ftdist expects, so the optimizer state "
                                  "cannot be placed safely. Resume on the backend and world size that wrote the "
                                  "checkpoint, and please report this with `ftdist env`")
            flat.data.copy_(built)
            if lay.group in fs.steps and all(n in fs.moments for n in pnames):
                run.raw_optimizer.state[flat] = {
                    "step": torch.tensor(fs.steps[lay.group], dtype=torch.float32),
                    **{k: lay.to_flat([fs.moments[n][k] for n in pnames], rank, flat) for k in portable.MOMENTS}}

    @staticmethod
    def _flats(zero_opt, inner) -> list[tuple[str, torch.Tensor]]:
        """(optimizer group name, flat fp32 master partition) for this rank, in ZeRO's order."""
        if hasattr(zero_opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: sub-groups map to param groups
            return [(inner.param_groups[zero_opt.sub_group_to_group_id[i]]["name"], flat)
                    for i, flat in enumerate(zero_opt.fp32_partitioned_groups_flat)]
        return [(inner.param_groups[i]["name"], flat) for i, flat in enumerate(zero_opt.single_partition_of_fp32_groups)]

    def _collect(self, run) -> dict:
        """Per named optimizer group: this rank's flat fp32 master partition(s) and their Adam state."""
        inner = run.raw_optimizer
        out: dict[str, list] = {}
        for name, flat in self._flats(run.model.optimizer, inner):
            state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inner.state.get(flat, {}).items()}
            out.setdefault(name, []).append((flat.detach().clone(), state))
        return out

    def release(self, run) -> None:
        self._teardown(run)
        self.acc.step = 0
        run.raw_optimizer = run.scheduler = None

    def _teardown(self, run) -> None:
        engine = run.model
        self.acc._models.clear()
        self.acc._optimizers.clear()
        self.acc.deepspeed_engine_wrapped = None
        engine.destroy()
        run.model = run.optimizer = None

    def _restore(self, engine, raw, carried) -> None:
        flats: dict[str, list] = {}
        for name, flat in self._flats(engine.optimizer, raw):
            flats.setdefault(name, []).append(flat)
        for name, new in flats.items():
            saved = carried.get(name)
            if saved is None:
                continue  # newly unfrozen: fresh Adam state, exactly like torch AdamW's first step for it
            if len(saved) != len(new) or any(f.shape != d.shape for f, (d, _) in zip(new, saved)):
                raise RuntimeError(f"ZeRO rebuild: optimizer group {name} changed its partitioning")
            for flat, (data, state) in zip(new, saved):
                flat.data.copy_(data)
                if state:
                    raw.state[flat] = state


def _ds_version() -> str:
    import deepspeed

    return deepspeed.__version__


@contextlib.contextmanager
def gathered(params):
    """Whole parameters for reading, also under ZeRO-3 (a no-op for parameters that are not partitioned)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def param_checksums(acc, model) -> torch.Tensor:
    """float64 sum and sum of squares per parameter (full tensors, gathered under ZeRO-3)."""
    params = list(acc.unwrap_model(model).parameters())
    with gathered(params):
        return _sums(params)


def _sums(params) -> torch.Tensor:
    out = torch.empty(2 * len(params), dtype=torch.float64)
    for i, p in enumerate(params):
        d = p.detach().double().cpu()
        out[2 * i], out[2 * i + 1] = d.sum(), (d * d).sum()
    return out.to(params[0].device)


def check_sync(acc, model, step: int, where: str) -> None:
    """Parameter checksums compared across ranks; loud failure if any rank drifted."""
    if acc.num_processes == 1:
        return
    sums = param_checksums(acc, model)
    gathered = [torch.zeros_like(sums) for _ in range(acc.num_processes)]
    torch.distributed.all_gather(gathered, sums)
    bad = [i for i, g in enumerate(gathered) if not torch.equal(g, gathered[0])]
    if bad:
        raise FtdistError(f"sync check failed at step {step} ({where}): parameters on rank(s) {bad} "
                          "differ from rank 0. This is a bug; please report it with `ftdist env`")
