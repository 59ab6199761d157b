"""The sweep's results: trials.csv and its table, Optuna's plots, best_recipe.yaml (the best trial's recipe,
resolved and checked), and the top-k re-runs over several seeds with their mean and spread."""

from __future__ import annotations

import csv
import io
import json
import logging
import signal
import statistics
import subprocess
import time
import warnings
from pathlib import Path

from ftdist import config
from ftdist.sweep.space import TrialFailuresError, fmt_value, is_number, override
from ftdist.sweep.study import atomic_write
from ftdist.sweep.trials import POLL_S, Slot, run_env, run_value, spawn

log = logging.getLogger("ftdist")


class ResultsMixin:
    """The controller's reports. Needs from the controller: args, recipe_arg, overrides, base, space, n_trials, dir,
    slots, study, stop_signal, on_signal; from StudyMixin counts, and from TrialsMixin launch_cmd."""

    def report(self) -> dict:
        trials = self.study.get_trials(deepcopy=False)
        keys = list(self.space.params)
        rows = []
        for t in trials:
            dur = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
            note = "" if t.state.name == "WAITING" else (t.user_attrs.get("note") or t.user_attrs.get("error") or "")
            retry_of = t.system_attrs.get("failed_trial")
            if retry_of is not None:
                note = f"retry of {retry_of}" + (f"; {note}" if note else "")
            rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                         **{k: t.params.get(k) for k in keys}, "duration_s": None if dur is None else round(dur, 1),
                         "worker": t.user_attrs.get("worker", ""), "run_dir": t.user_attrs.get("run_dir", ""),
                         "note": note})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["number", "state", "value", *keys, "duration_s", "worker", "run_dir", "note"])
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.dir / "trials.csv", buf.getvalue())
        print(render_table(rows, keys, self.space.metric), flush=True)
        c = self.counts()
        done = c.get("COMPLETE", 0) + c.get("PRUNED", 0)
        print(f"sweep: {done} of {self.n_trials} trials finished ({c.get('COMPLETE', 0)} complete, "
              f"{c.get('PRUNED', 0)} pruned), {c.get('FAIL', 0)} failed, {c.get('RUNNING', 0)} running, "
              f"{c.get('WAITING', 0)} waiting; table: {self.dir / 'trials.csv'}", flush=True)
        plots = self.plots()
        if plots:
            print("sweep: plots " + ", ".join(plots), flush=True)
        best = self.write_best()
        return {"done": done, "counts": c, "best": best}

    def plots(self) -> list[str]:
        """Optuna's own plots (optuna.visualization.matplotlib). Parameter importances need two complete trials
        and use fANOVA (scikit-learn) when installed, else PED-ANOVA (Optuna alone)."""
        import optuna

        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return []
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from optuna.visualization import matplotlib as om

        try:
            import sklearn  # noqa: F401

            evaluator = None  # Optuna's default, fANOVA
        except ImportError:
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
        wanted = [("history.png", lambda: om.plot_optimization_history(self.study)),
                  ("parallel_coordinate.png", lambda: om.plot_parallel_coordinate(self.study))]
        if any(t.intermediate_values for t in self.study.get_trials(deepcopy=False)):  # the learning curves
            wanted.append(("intermediate_values.png", lambda: om.plot_intermediate_values(self.study)))
        if len(complete) >= 2:
            wanted.append(("importances.png", lambda: om.plot_param_importances(self.study, evaluator=evaluator)))
        made = []
        for name, fn in wanted:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = fn()
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    fig.savefig(self.dir / name, dpi=100, bbox_inches="tight")
                    plt.close(fig)
                made.append(name)
            except Exception as e:  # a plot Optuna cannot draw for this study (too few trials, one value only)
                log.info("sweep: %s skipped: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
        plt.close("all")
        return made

    def recipe_for(self, trial, out: Path) -> str:
        """The base recipe with the trial's parameters, resolved (every key explicit) and checked by config.load."""
        overrides = [*self.overrides, *(override(k, v) for k, v in trial.params.items() if k in self.space.params),
                     f"log.output_dir={out}"]
        r = config.load(self.recipe_arg, overrides)
        shown = ", ".join(f"{k}={fmt_value(v)}" for k, v in trial.params.items())
        head = (f"# ftdist sweep {self.dir}: trial {trial.number}, {self.space.metric}={trial.value:.6g} "
                f"({self.space.direction})\n# recipe {self.recipe_arg} {' '.join(self.overrides)}\n# params: {shown}\n"
                f"# run it: ./launch THIS_FILE   (or: ftdist train THIS_FILE)\n")
        return head + config.dump(r)

    def write_best(self) -> dict | None:
        import optuna

        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if not complete:
            return None
        best = self.study.best_trial
        path = self.dir / "best_recipe.yaml"
        atomic_write(path, self.recipe_for(best, self.dir / "retrain" / f"trial-{best.number:04d}"))
        config.load(str(path))  # what ./launch will do with it
        print(f"sweep: best trial {best.number}: {self.space.metric}={best.value:.6g} "
              f"({', '.join(f'{k}={fmt_value(v)}' for k, v in best.params.items())}); recipe: {path}", flush=True)
        return {"number": best.number, "value": best.value, "params": best.params, "recipe": str(path)}

    def rerun_top(self, summary: dict) -> None:
        """Re-train the top k trials' recipes over --seeds seeds (train.seed = the recipe's + 1..S) and report
        mean +- std; finished rerun folders are reused, so the command can be repeated."""
        import optuna

        c = summary["counts"]
        if c.get("RUNNING") or c.get("WAITING") or summary["done"] < self.n_trials:
            print("sweep: top-k reruns skipped: the study has unfinished trials; run the same command again when "
                  "they are done", flush=True)
            return
        complete = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        top = sorted(complete, key=lambda t: t.value, reverse=self.space.direction == "maximize")[:self.args.top_k]
        (self.dir / "reruns").mkdir(exist_ok=True)
        jobs = []
        for t in top:
            # the best trial's re-runs train best_recipe.yaml itself: the file a user will launch
            recipe_path = (self.dir / "best_recipe.yaml" if t.number == self.study.best_trial.number
                           else self.dir / "top" / f"trial-{t.number:04d}.yaml")
            if not recipe_path.is_file() or recipe_path.parent.name == "top":
                recipe_path.parent.mkdir(exist_ok=True)
                atomic_write(recipe_path, self.recipe_for(t, self.dir / "retrain" / f"trial-{t.number:04d}"))
            for s in range(1, self.args.seeds + 1):
                seed = self.base.train.seed + s
                jobs.append((t, seed, recipe_path, self.dir / "reruns" / f"trial-{t.number:04d}-seed-{seed}"))
        pending = [j for j in jobs if not (j[3] / "final_metrics.json").is_file()]
        print(f"sweep: re-running the top {len(top)} trial(s) over {self.args.seeds} seed(s): {len(pending)} run(s)",
              flush=True)
        handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
        procs: list[tuple[subprocess.Popen, Slot, tuple]] = []
        failed = []
        try:
            while pending or procs:
                for p, slot, job in list(procs):
                    if p.poll() is not None:
                        procs.remove((p, slot, job))
                        if p.returncode != 0:
                            failed.append(f"{job[3]} (exit {p.returncode}; see {job[3].with_suffix('.log')})")
                if self.stop_signal is not None:
                    for p, _, _ in procs:
                        if p.poll() is None:
                            p.send_signal(signal.SIGTERM)
                    for p, _, _ in procs:
                        p.wait()
                    return
                busy = {id(s) for _, s, _ in procs}
                for slot in self.slots:
                    if pending and id(slot) not in busy:
                        job = pending.pop(0)
                        procs.append((self._launch_rerun(job, slot), slot, job))
                time.sleep(POLL_S)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        rows, lines = [], []
        for t in top:
            vals = [run_value(j[3], self.space.metric, self.space.value, self.space.direction) for j in jobs if j[0] is t]
            tests = [_test_value(j[3], self.space.metric) for j in jobs if j[0] is t]
            vals = [v for v in vals if v is not None]
            tests = [v for v in tests if v is not None]
            row = {"trial": t.number, "sweep_value": t.value, "seeds": len(vals), "mean": _mean(vals), "std": _std(vals),
                   "test_mean": _mean(tests), "test_std": _std(tests), "values": json.dumps(vals),
                   "recipe": str(next(j[2] for j in jobs if j[0] is t))}
            rows.append(row)
            line = f"  trial {t.number}: validation {self.space.metric} {_pm(vals)} over {len(vals)} seed(s)"
            if tests:
                line += f"; test {_pm(tests)}"
            lines.append(line)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["trial"])
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.dir / "reruns.csv", buf.getvalue())
        print("sweep: top trials re-run (mean ± std):\n" + "\n".join(lines) + f"\nsweep: {self.dir / 'reruns.csv'}",
              flush=True)
        if failed:
            raise TrialFailuresError(f"sweep: {len(failed)} rerun(s) failed: {'; '.join(failed[:3])}")

    def _launch_rerun(self, job, slot: Slot) -> subprocess.Popen:
        t, seed, recipe_path, run_dir = job
        cmd = self.launch_cmd(str(recipe_path), [f"train.seed={seed}", f"log.output_dir={run_dir}"])
        env = run_env(slot, len(self.slots))
        log.info("rerun of trial %d, seed %d on %s: %s", t.number, seed, slot.describe(), run_dir)
        with open(run_dir.with_suffix(".log"), "ab") as out:
            return spawn(cmd, env, out, slot.cpus)


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def _pm(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else f"{xs[0]:.4f} (one seed)"


def _test_value(run_dir: Path, metric: str) -> float | None:
    try:
        v = (json.loads((Path(run_dir) / "final_metrics.json").read_text()).get("test") or {}).get(metric)
    except (OSError, json.JSONDecodeError):
        return None
    return float(v) if is_number(v) else None


def render_table(rows: list[dict], keys: list[str], metric: str) -> str:
    head = ["#", "state", metric, *keys, "time (s)", "note"]
    body = [[str(r["number"]), r["state"], "-" if r["value"] is None else f"{r['value']:.6g}",
             *("-" if r[k] is None else fmt_value(r[k]) for k in keys),
             "-" if r["duration_s"] is None else f"{r['duration_s']:.0f}", " ".join((r["note"] or "").split())[:60]]
            for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*b) for b in body)])
