"""The training loop, readable top to bottom. `ftdist.run.build(recipe)` has set everything up.

Each optimizer step is one *global batch*:
    1. take this rank's `accumulation` micro-batches of the step
    2. count the real items (examples or labelled tokens) over all ranks: the task's weight rule
    3. forward/backward each micro-batch with loss = sum / global count
    4. the backend clips, agrees on non-finite values across ranks and steps; the schedule steps
    5. between steps only: unfreeze transition, eval, checkpoint, preemption check
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ftdist import averaging, checkpoint, evaluation, faults, plan, report, tracking
from ftdist import backend as backendlib
from ftdist.collectives import all_sum
from ftdist.console import progress_bar, summary_table
from ftdist.errors import NonFiniteError
from ftdist.preempt import Preemption
from ftdist.run import Run
from ftdist.sampler import step_seed
from ftdist.unfreeze import decide_plateau

log = logging.getLogger("ftdist")


class Step(NamedTuple):
    """One optimizer step's result, the same on every rank."""

    loss: float  # the global mean loss: loss sum / items
    grad_norm: float  # nan for a skipped step
    items: float  # the normaliser: the global batch's weighted item count


@dataclass
class StepOutput:
    """What a per-step hook sees: hook(run, out) is called after every optimizer step."""

    step: int
    loss: float
    grad_norm: float
    items: float
    batches: list  # this rank's micro-batches (CPU tensors)


def fit(run: Run, hooks=()) -> dict:
    acc, r, st = run.acc, run.recipe, run.state
    hooks = [h for h in (*hooks, tracking.trace_hook(), averaging.hook(run)) if h is not None]
    evaluation.check_decision(run)  # eval.decision against the classes found: before training, not after
    plan.announce(run)  # before the bar, which would otherwise share its first line
    bar = progress_bar(run.total_steps, st.step, show=acc.is_main_process and r.log.progress and not run.quiet)
    preempt = Preemption()
    started, since_start = run.start_clock(), tracking.Window()
    run.model.train()
    while st.step < run.total_steps:
        run.sampler.set_epoch(st.epoch, st.step_in_epoch)
        it = iter(run.train_loader)
        while st.step_in_epoch < run.steps_per_epoch and st.step < run.total_steps:
            t0 = time.perf_counter()  # a step's time includes waiting for its batches: a slow loader shows
            batches = [next(it) for _ in range(run.plan.accumulation)]
            faults.maybe_fail(st.step + 1, acc.process_index)
            out = train_step(run, batches)
            dt = time.perf_counter() - t0
            st.step += 1
            st.step_in_epoch += 1
            tracking.record_step(run, out, dt, batches, since_start)
            bar.update(1)
            if st.step % r.log.every_steps == 0 or st.step == 1:
                tracking.log_step(run, st.log_window, since_start, time.perf_counter() - started)
                st.log_window = tracking.Window()
            for hook in hooks:
                hook(run, StepOutput(st.step, out.loss, out.grad_norm, out.items, batches))
            after_step(run)
            if preempt.requested(acc):
                stop(run, preempt)
        if st.step_in_epoch >= run.steps_per_epoch:
            st.epoch += 1
            st.step_in_epoch = 0
            just_evaluated = bool(r.eval.every_steps) and st.step % r.eval.every_steps == 0
            if run.eval_loader is not None and not just_evaluated:
                evaluation.evaluate_and_track(run)
    bar.close()
    return finish(run, time.perf_counter() - started, since_start.samples)


def train_step(run: Run, window) -> Step:
    """One optimizer step over this rank's micro-batches."""
    acc, task, st = run.acc, run.task, run.state
    # Dropout masks are a pure function of (seed, step, rank), not of everything that drew from the global
    # RNG before this step (a DataLoader iterator draws its base seed from it when created, so a resumed
    # run, which creates one right after restoring the RNG, would otherwise draw different masks).
    torch.manual_seed(step_seed(run.recipe.train.seed, st.step + 1, acc.process_index))
    # The normaliser is the weighted item count of the whole global batch, all ranks and micro-batches:
    # loss = sum / count gives the same gradient at every world size and accumulation.
    count = all_sum(acc, sum(task.count(b) for b in window))
    window = [{k: v.to(acc.device, non_blocking=True) for k, v in b.items() if k != "idx"} for b in window]
    # DDP and ZeRO average gradients over ranks, and accelerate/DeepSpeed divide by accumulation:
    # multiplying back gives exactly d(sum over the global batch)/count.
    scale = acc.num_processes * run.plan.accumulation / max(count, 1e-12)
    loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
    for b in window:
        with acc.accumulate(run.model):
            inputs = {k: v for k, v in b.items() if k not in ("labels", "real", "idx")}
            with acc.autocast():
                logits = run.model(**inputs).logits
            loss_sum, _ = task.loss_sum_and_count(logits, b)
            loss_sum = faults.maybe_nan(loss_sum, st.step + 1, acc.process_index)
            run.backend.check_loss(loss_sum, st.step + 1)
            acc.backward(loss_sum * scale)
            loss_total += loss_sum.detach().double()
    loss, grad_norm, stepped = run.backend.step(run, loss_total, count)
    if stepped:
        st.nonfinite_in_row = 0
    else:
        grad_norm = float("nan")
        skip(run)
    run.scheduler.step()  # also after a skipped step: the LR schedule is a function of the step count
    return Step(loss, grad_norm, count)


def skip(run: Run) -> None:
    st, r = run.state, run.recipe
    st.skipped_steps += 1
    st.nonfinite_in_row += 1
    if r.train.nonfinite == "abort" or st.nonfinite_in_row >= r.train.max_nonfinite:
        why = ("train.nonfinite=abort" if r.train.nonfinite == "abort"
               else f"{st.nonfinite_in_row} non-finite steps in a row (train.max_nonfinite={r.train.max_nonfinite})")
        raise NonFiniteError(f"non-finite loss or gradient at step {st.step + 1}: stopping ({why}). The last good "
                             f"checkpoint in {checkpoint.ckpt_root(str(run.run_dir))} is kept. Lower train.lr, "
                             "enable clipping, or check the data")
    if run.acc.is_main_process:
        log.warning("step %d: non-finite loss or gradient on some rank; step skipped (%d in a row)",
                    st.step + 1, st.nonfinite_in_row)


def after_step(run: Run) -> None:
    r, st = run.recipe, run.state
    if not r.unfreeze.on_plateau and run.stage_for(st.step) != st.stage:
        run.enter_stage(run.stage_for(st.step))
    if r.eval.every_steps and st.step % r.eval.every_steps == 0 and run.eval_loader is not None:
        evaluation.evaluate_and_track(run)
        if r.unfreeze.on_plateau and st.stage < run.schedule.n_stages - 1:
            if decide_plateau(run.acc, st.metric_history, r.eval.greater_is_better):
                run.enter_stage(st.stage + 1)
    if r.checkpoint.every_steps and st.step % r.checkpoint.every_steps == 0:
        run.save()
    if r.train.check_sync and st.step % r.train.check_sync == 0:
        backendlib.check_sync(run.acc, run.model, st.step, "periodic")


def stop(run: Run, preempt: Preemption) -> None:
    """A stop was requested: checkpoint on every rank, then exit (99: requeue me; 130: interrupted)."""
    path = run.save()
    if run.acc.is_main_process:
        log.warning("stop requested: checkpoint %s saved at step %d; run the same command again to resume",
                    path, run.state.step)
    preempt.mark_done(run.acc)
    run.acc.end_training()
    # Under ./launch the marker carries the news (launch picks 99 or 130): exiting 0 here keeps
    # torchrun from printing a failure report for every node. Run bare, exit with the status ourselves.
    raise SystemExit(0 if preempt.stop_file else preempt.exit_code)


def finish(run: Run, train_time: float, samples: int) -> dict:
    acc, r, st = run.acc, run.recipe, run.state
    final, outputs = evaluation.final(run, keep_outputs=True)
    post = evaluation.after_training(run, outputs)  # decisions/temperature fitted on validation (main process)
    if not r.checkpoint.every_steps or st.step % r.checkpoint.every_steps:
        run.save()  # the final state, resumable with more steps (a multiple of every_steps was just saved)
    averaged = averaging.averaged_models(run)  # the EMA and checkpoint average, beside the final model
    metrics = evaluation.result(run, train_time, samples, final, averaged, post)
    if r.checkpoint.export:
        checkpoint.export(acc, run.model, run.tokenizer, run.run_dir / "model", run.recipe_yaml, metrics,
                          post.files if post else None)
    if acc.is_main_process:
        (run.run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=1))
        evaluation.write_analysis(run.run_dir, post)
        acc.log({f"final/{k}": v for k, v in tracking.flatten({**final, **averaged}).items() if isinstance(v, (int, float))}, step=st.step)
        # the summary shows even under --quiet ("warnings and the final summary only")
        rows = evaluation.run_summary(run, metrics, final, averaged) + evaluation.summary_rows(post)
        rows.append(("model", str(run.run_dir / "model") if r.checkpoint.export else "(export off)"))
        print(summary_table(rows), flush=True)
    acc.end_training()
    if acc.is_main_process and "jsonl" in r.log.trackers:
        report.build(run.run_dir)
    return metrics


def run(recipe, quiet: bool = False, hooks=()) -> dict:
    from ftdist.run import build

    return fit(build(recipe, quiet=quiet, train_step=train_step), hooks)
