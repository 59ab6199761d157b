"""Evaluation during and after training: gathered over ranks, scored by the recipe's metrics, best model kept."""

from __future__ import annotations

import logging

import torch

from ftdist import checkpoint, metrics

log = logging.getLogger("ftdist")


@torch.no_grad()
def evaluate(run, loader) -> dict:
    acc, task = run.acc, run.task
    run.model.eval()
    preds, refs, loss_sum, count = [], [], 0.0, 0.0
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
    run.model.train()
    out = metrics.compute(run.recipe.eval.metrics, preds, refs)
    out["loss"] = loss_sum / max(count, 1.0)
    out["n_examples"] = len(refs)
    return out


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


def final(run) -> dict:
    """Validation and test results at the end of training."""
    out = {}
    if run.eval_loader is not None:
        out["validation"] = evaluate(run, run.eval_loader)
    if run.splits.test is not None:
        out["test"] = evaluate(run, run.loader(run.splits.test))
    return out
