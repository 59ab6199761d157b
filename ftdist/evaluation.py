"""Evaluation during and after training: gathered over ranks, scored by the recipe's metrics, best model kept."""

from __future__ import annotations

import logging

import torch

from ftdist import checkpoint, metrics

log = logging.getLogger("ftdist")


@torch.no_grad()
def evaluate(run, loader, keep_outputs: bool = False):
    """The recipe's metrics, loss and example count on `loader`'s split, gathered over ranks (every rank gets
    the same numbers). With keep_outputs, also that split's `analysis.Outputs`: the gathered logits and labels
    of every scored example (token classification: every scored token), on the CPU, for the end of the run."""
    acc, task = run.acc, run.task
    run.model.eval()
    preds, refs, loss_sum, count = [], [], 0.0, 0.0
    kept_logits, kept_labels = [], []
    for b in loader:
        inputs = {k: v for k, v in b.items() if k not in ("labels", "real", "idx")}
        with acc.autocast():
            logits = run.model(**inputs).logits.float()
        logits, labels = task.gather(acc, logits, b["labels"])
        real = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        s, c = task.loss_sum_and_count(logits, {"labels": labels, "real": real}, weighted=False)
        loss_sum += float(s)
        count += float(c)
        p, t = task.decode(logits, labels, run.splits.label_names)
        preds += p
        refs += t
        if keep_outputs:
            scored = labels != -100  # token classification: the positions the metrics score
            kept_logits.append(logits[scored].cpu() if task.sequence_labels else logits.cpu())
            kept_labels.append(labels[scored].cpu() if task.sequence_labels else labels.cpu())
    run.model.train()
    out = metrics.compute(run.recipe.eval.metrics, preds, refs)
    out["loss"] = loss_sum / max(count, 1.0)
    out["n_examples"] = len(refs)
    if not keep_outputs:
        return out
    from ftdist.analysis import Outputs

    k = len(run.splits.label_names or [])
    kept = Outputs(torch.cat(kept_logits) if kept_logits else torch.zeros(0, k),
                   torch.cat(kept_labels).long() if kept_labels else torch.zeros(0, dtype=torch.long),
                   preds if task.sequence_labels else None, refs if task.sequence_labels else None)
    return out, kept


def evaluate_and_track(run) -> dict:
    """Evaluate on validation, log, keep the best metric, and export a new best model to <run>/best."""
    r, st = run.recipe, run.state
    result = evaluate(run, run.eval_loader)
    value = result[r.eval.best_metric]
    st.metric_history.append(value)
    better = st.best is None or (value > st.best if r.eval.greater_is_better else value < st.best)
    if better:
        st.best, st.best_step = value, st.step
    run.acc.log({f"eval/{k}": v for k, v in result.items()}, step=st.step)
    if run.acc.is_main_process and not run.quiet:
        shown = "  ".join(f"{k}={v:.4f}" for k, v in result.items() if k != "n_examples")
        log.info("eval step %d epoch %d: %s%s", st.step, st.epoch, shown, "  (best)" if better else "")
    if better:
        checkpoint.export(run.acc, run.model, run.tokenizer, run.run_dir / "best", run.recipe_yaml,
                          {"step": st.step, **result})
    return result


def final(run, keep_outputs: bool = False):
    """Validation and test results at the end of training; with keep_outputs also {split: analysis.Outputs}
    (classification and token classification only: regression has no classes)."""
    keep = keep_outputs and run.splits.label_names is not None and run.recipe.data.task != "regression"
    out, kept = {}, {}
    for split, loader in (("validation", run.eval_loader),
                          ("test", run.loader(run.splits.test) if run.splits.test is not None else None)):
        if loader is None:
            continue
        res = evaluate(run, loader, keep)
        out[split], kept[split] = res if keep else (res, None)
    if not keep_outputs:
        return out
    return out, ({k: v for k, v in kept.items() if v is not None} if keep else {})


def after_training(run, outputs: dict):
    """The decisions and temperature the recipe asks for, fitted on the validation outputs, and every split's
    per-class, confusion and calibration analysis (main process; None elsewhere and for regression)."""
    if not run.acc.is_main_process or not outputs:
        return None
    from ftdist import analysis

    return analysis.after_training(run.recipe, run.splits.label_names, run.splits.label_counts, outputs,
                                   run.task.sequence_labels)


def result(run, train_time: float, samples: int, final: dict, averaged: dict, post) -> dict:
    """final_metrics.json: the run's counts and times, the final and averaged models' scores and, beside the
    argmax results under validation/test, the tuned decision and calibration (`post`)."""
    st = run.state
    return {"train_time_s": train_time, "train_time_total_s": run.time_before + train_time,
            "samples_per_s": samples * run.acc.num_processes / max(train_time, 1e-9),
            "steps": st.step, "trained_steps": st.step - run.start_step,
            "resumed_from_step": run.start_step if run.resume_from is not None else None,
            "skipped_steps": st.skipped_steps, "best_metric": run.recipe.eval.best_metric,
            "best": st.best, "best_step": st.best_step, **final, **averaged, **(post.final if post else {})}


def write_analysis(run_dir, post) -> None:
    """<run>/analysis.json: per-class scores, confusion matrices, calibration and the fitted decision and
    temperature of every split (the run report renders it). Nothing without `post`."""
    import json

    from ftdist import analysis

    if post:
        (run_dir / analysis.FILE).write_text(json.dumps(post.analysis, indent=1))


def summary_rows(post) -> list[tuple[str, str]]:
    """The end-of-run summary's lines for the tuned decision and the calibration (none unless the recipe asks)."""
    if not post:
        return []
    rows = []
    tuned = post.final.get("tuned")
    if tuned:
        rows.append(("decision", tuned["decision"]))
        for split in ("validation", "test"):
            if split in tuned:
                rows.append((f"tuned {split}", "  ".join(f"{k}={v:.4f}" for k, v in tuned[split].items()
                                                         if isinstance(v, float))))
    cal = post.final.get("calibration")
    if cal and cal.get("temperature") is not None:
        rows.append(("temperature", f"{cal['temperature']:.4f} (fitted on validation)"))
        for split in ("validation", "test"):
            if split in cal:
                u, c = cal[split]["uncalibrated"], cal[split]["calibrated"]
                rows.append((f"calibration {split}", "  ".join(f"{k}={u[k]:.4f}->{c[k]:.4f}" for k in ("ece", "brier", "nll"))))
    return rows


def check_decision(run) -> None:
    """eval.decision=threshold needs two classes and a known eval.positive_label: checked on the labels the data
    gave, before any training (the recipe check sees them only when data.labels lists them)."""
    from ftdist.errors import RecipeError, did_you_mean

    e, names = run.recipe.eval, run.splits.label_names
    if e.decision != "threshold" or names is None:
        return
    if len(names) != 2:
        raise RecipeError(f"eval.decision: threshold needs two classes and the data has {len(names)} ({', '.join(names[:8])}"
                          f"{', ...' if len(names) > 8 else ''}); use eval.decision=bias for several classes")
    if e.positive_label is not None and e.positive_label not in names:
        raise RecipeError(f"eval.positive_label: {e.positive_label!r} is not one of the labels {names}"
                          f"{did_you_mean(e.positive_label, names)}")


def run_summary(run, metrics: dict, final: dict, averaged: dict) -> list[tuple[str, str]]:
    """The final summary's rows: time, what was trained (resumed from where, skipped), best metric, final (and
    averaged models') results."""
    st, best = run.state, run.recipe.eval.best_metric
    trained = st.step - run.start_step
    this, total = (f"{metrics[k]:.1f} s" for k in ("train_time_s", "train_time_total_s"))
    rows = [("train time", f"{this} this start, {total} in total" if run.resume_from else this),
            ("samples/s", f"{metrics['samples_per_s']:.1f}" + (" (this start)" if run.resume_from else "")),
            ("trained steps", f"{trained} (steps {run.start_step + 1}-{st.step} of {run.total_steps})"),
            ("resumed from", f"step {run.start_step} ({run.resume_from.name})" if run.resume_from else "- (fresh start)"),
            ("skipped steps", f"{st.skipped_steps} (non-finite loss or gradient)"),
            (f"best {best}", f"{st.best:.4f} at step {st.best_step}" if st.best is not None else "-")]
    for label, results in (("final", final), *((f"{k} (model-{k})", v) for k, v in averaged.items())):
        rows += [(f"{label} {split}", "  ".join(f"{k}={v:.4f}" for k, v in results[split].items() if k != "n_examples"))
                 for split in ("validation", "test") if split in results]
    return rows
