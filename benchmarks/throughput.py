#!/usr/bin/env python3
"""Training throughput: the same fine-tune run by ftdist, a minimal Accelerate loop and transformers.Trainer.

    python benchmarks/throughput.py                       # both modes, small random BERT, 5 repeats
    python benchmarks/throughput.py --batching identical  # one mode
    python benchmarks/throughput.py --model minilm        # the pretrained MiniLM-L6 (slower)

Every run is its own process (an Accelerator is a process-wide singleton): by default a child forked
from this script after it has imported torch/transformers/datasets/ftdist once (no torch op has run
in the parent, so the fork is clean; it only saves the ~5-20 s of imports per run), or with --spawn a
fresh `python throughput.py --worker` process. Runs alternate ftdist, raw, Trainer, ftdist, raw,
Trainer, ... so that drift in the machine's speed hits all three alike. Each run records the wall
clock and its own CPU time after every optimizer step; rates are taken over the steps after the
first `--warmup` ones (setup, tokenization and the first steps are outside the window), and the
run ends right after its last timed step (teardown is not measured).

Two clocks: steps/s (wall) is what a user sees on a quiet machine; steps per CPU-second is the
same work measured by the process's own CPU time, which stays meaningful on a shared, overloaded
machine where a run gets only part of a core (every run uses one torch thread by default, so CPU
time ~ the time the step would take on a free core). The CPU share column says how loaded it was.

Same for all three: model (architecture, random or pretrained weights), data (a generated CSV of
sentences with a long-tailed length distribution, max_length 128), batch size, step count, AdamW with
lr 5e-5 / weight decay 0.01, linear schedule, grad clipping at 1.0, precision; no evaluation, no
checkpoints. Each tool keeps its own data path: ftdist its datasets-based pipeline (in this process,
through its public API: `ftdist.run.build`, then `ftdist.train.fit` with a per-step hook that takes the
timestamps), the raw loop (benchmarks/raw_loop.py, shared with gpu_bench.py) a plain list of tokenized
rows, Trainer a tokenized datasets.Dataset (timed by a TrainerCallback).

--batching identical: every tool gets exactly the same batches (ftdist with data.group_by_length=false;
the raw loop and Trainer are handed ftdist's seeded random permutation), padded per batch by
DataCollatorWithPadding. The per-step batch shapes are compared to prove it.
--batching defaults: each tool's defaults: ftdist groups by length; the raw loop shuffles
(DataLoader(shuffle=True)); Trainer uses its default random sampler (no group_by_length).

Targets (printed, not asserted): identical: ftdist/raw >= 0.97 and ftdist/Trainer >= 1.0;
defaults: ftdist/Trainer >= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import raw_loop  # noqa: E402
from raw_loop import LR, SEED, WEIGHT_DECAY  # noqa: E402  (the same optimizer settings for all three)

TOOLS = ("ftdist", "raw", "trainer")
LABEL = {"ftdist": "ftdist", "raw": "raw accelerate loop", "trainer": "HF Trainer"}
TARGETS = {"identical": [("ftdist/raw", 0.97), ("ftdist/trainer", 1.0)], "defaults": [("ftdist/trainer", 1.3)]}


# ================================================================ workers (one per subprocess)

# --model: a random BERT of these sizes (MiniLM's vocabulary), or "minilm", the pretrained model as is
ARCHS = {"small": C.SMALL, "tiny": C.TINY, "micro": C.MICRO, "base": C.BERT_BASE}


def _arch(spec):
    return dict(ARCHS.get(spec["model"], {}))


# Seconds spent inside the model's forward and inside backward (the kernels every tool shares), this process,
# and its value at each optimizer step's stamp. CPU only: on a GPU the host's view of a kernel is not its time.
MODEL_TIME = [0.0]
MODEL_MARKS: list[float] = []


def time_model_calls() -> None:
    """Time the shared part of a step in every tool: `BertForSequenceClassification.forward` (the model,
    with its loss for the raw loop and Trainer) and `Accelerator.backward` (all three call it). Step
    time minus that is the tool's own work per step (fetch, collate, loss bookkeeping, clipping, the
    optimizer and scheduler calls, callbacks, logging). The kernels' speed drifts +-5% between
    processes on this machine; this split takes that drift out of the comparison of the tools' own work."""
    import functools

    import accelerate
    from transformers.models.bert import modeling_bert

    def timed(f):
        @functools.wraps(f)  # Trainer reads the forward signature to choose the model's input columns
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                MODEL_TIME[0] += time.perf_counter() - t
        return g

    cls = modeling_bert.BertForSequenceClassification
    cls.forward = timed(cls.forward)
    accelerate.Accelerator.backward = timed(accelerate.Accelerator.backward)


def _stamp(spec, times, cpu) -> None:
    """Record the end of an optimizer step. On a GPU the host runs ahead of the device (the raw loop and
    Trainer never wait for it), so the two steps that bound the timed window wait for the device first:
    the window then holds exactly the device work of its steps, and no tool is made to sync in between."""
    if spec["cuda"] and len(times) + 1 in (spec["warmup"], spec["total"]):
        import torch

        torch.cuda.synchronize()
    times.append(time.perf_counter())
    cpu.append(time.process_time())
    MODEL_MARKS.append(MODEL_TIME[0])


class Done(Exception):
    """Raised from the per-step hook after the last timed step: the run's teardown (final report,
    end of training) is not measured, so it is skipped."""


def _shape(batch) -> list[int]:
    """Rows, padded length and real tokens of a batch: compared across tools to prove identical batching."""
    return [int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1]), int(batch["attention_mask"].sum())]


def worker_ftdist(spec):
    """ftdist in-process through its public API: `build` the run, then `fit` it with one hook that
    stamps every optimizer step and stops the run after the last timed one."""
    from ftdist import config
    from ftdist.console import setup_logging
    from ftdist.run import build
    from ftdist.train import fit

    setup_logging(quiet=True, verbose=False)  # what `python -m ftdist train --quiet` sets up
    recipe = config.from_dict({
        "model": {"name_or_path": spec["model_dir"], "init": "pretrained" if spec["model"] == "minilm" else "random",
                  "config_overrides": _arch(spec)},
        "data": {"train_file": spec["csv"], "max_length": spec["max_length"], "validation_split": 0.0,
                 "test_split": 0.0, "group_by_length": spec["batching"] == "defaults"},
        "train": {"seed": SEED, "max_steps": spec["total"], "global_batch_size": spec["batch"],
                  "per_device_batch_size": spec["batch"], "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup": 0.06,
                  "max_grad_norm": 1.0, "precision": spec["precision"]},
        "checkpoint": {"export": False, "resume": None},
        "log": {"output_dir": spec["run_dir"], "progress": False},
    })
    t0 = time.perf_counter()
    run = build(recipe, quiet=True)
    times, cpu, shapes = [], [], []

    def timer(run, out):  # called by fit once after every optimizer step
        _stamp(spec, times, cpu)
        shapes.append(_shape(out.batches[0]))
        if len(times) == spec["total"]:
            raise Done

    setup_s = time.perf_counter() - t0
    try:
        fit(run, hooks=[timer])
    except Done:
        pass
    return {"times": times, "cpu": cpu, "shapes": shapes, "setup_s": setup_s}


def worker_raw(spec):
    """The benchmarks' hand-written Accelerate loop (raw_loop.py): a plain list of tokenized rows."""
    times, cpu, shapes = [], [], []

    def timer(step, loss, batch):
        _stamp(spec, times, cpu)
        shapes.append(_shape(batch))

    res = raw_loop.train(raw_loop.RawSpec(
        model_dir=spec["model_dir"], csv=spec["csv"], max_length=spec["max_length"], batch=spec["batch"],
        total=spec["total"], precision=spec["precision"], arch=_arch(spec), pretrained=spec["model"] == "minilm",
        batching="identical" if spec["batching"] == "identical" else "shuffled"), timer)
    return {"times": times, "cpu": cpu, "shapes": shapes, "setup_s": res.setup_s}


def worker_trainer(spec):
    import datasets
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    path = spec["model_dir"]
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = C.read_csv(spec["csv"])
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=spec["max_length"]), batched=True,
                remove_columns=["text"]).rename_column("label", "labels")
    times, cpu, shapes = [], [], []
    pad = DataCollatorWithPadding(tok)

    def collate(features):  # DataCollatorWithPadding, recording the batch shape like the others
        b = pad(features)
        shapes.append(_shape(b))
        return b

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _stamp(spec, times, cpu)
            if len(times) == spec["total"]:
                raise Done

    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch"], learning_rate=LR,
        weight_decay=WEIGHT_DECAY, max_steps=spec["total"], warmup_steps=raw_loop.warmup_steps(spec["total"]),
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to="none", seed=SEED, bf16=spec["precision"] == "bf16", fp16=spec["precision"] == "fp16",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    init = (lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)) if spec["model"] == "minilm" \
        else (lambda: AutoModelForSequenceClassification.from_config(raw_loop.model_config(path, _arch(spec))))
    from transformers import set_seed
    set_seed(SEED)
    model = init()
    cls = Trainer
    if spec["batching"] == "identical":
        order = [i for b in raw_loop.ftdist_batches([len(x) for x in ds["input_ids"]], spec["batch"]) for i in b]

        class FixedOrder(torch.utils.data.Sampler):
            def __iter__(self):
                return iter(order)

            def __len__(self):
                return len(order)

        class SameBatchesTrainer(Trainer):
            def _get_train_sampler(self, train_dataset=None):
                return FixedOrder()

        cls = SameBatchesTrainer
    trainer = cls(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Timer()])
    setup_s = time.perf_counter() - t0
    try:
        trainer.train()
    except Done:
        pass
    # the loader may collate one batch ahead of the step: keep one shape per step
    return {"times": times, "cpu": cpu, "shapes": shapes[:len(times)], "setup_s": setup_s}


def worker_run(spec: dict) -> int:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    spec["cuda"] = torch.cuda.is_available()  # asked once here, not at every step's stamp
    if not spec["cuda"]:
        time_model_calls()
    out = {"ftdist": worker_ftdist, "raw": worker_raw, "trainer": worker_trainer}[spec["tool"]](spec)
    if not spec["cuda"]:
        out["model_s"] = MODEL_MARKS[:len(out["times"])]
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def worker_main(spec_path: str) -> int:
    return worker_run(json.loads(Path(spec_path).read_text()))


# ================================================================ the comparison (parent process)

def window(res: dict, warmup: int) -> dict:
    """Rates over the optimizer steps after the first `warmup` (timestamps are taken after each step)."""
    t, shapes = res["times"], res["shapes"]
    n = len(t) - warmup
    dt = t[-1] - t[warmup - 1]
    dcpu = res["cpu"][-1] - res["cpu"][warmup - 1]
    kept = shapes[warmup:len(t)]
    samples = sum(s[0] for s in kept)
    padded = sum(s[0] * s[1] for s in kept)
    real = sum(s[2] for s in kept)
    out = {"steps_per_s": n / dt, "steps_per_cpu_s": n / dcpu, "cpu_share": dcpu / dt, "samples_per_s": samples / dt,
           "real_tokens_per_s": real / dt, "padding_efficiency": real / max(padded, 1), "steps_timed": n,
           "setup_s": res["setup_s"]}
    if res.get("model_s"):
        model = res["model_s"][-1] - res["model_s"][warmup - 1]
        out["model_ms_per_step"] = 1000 * model / n
        out["own_ms_per_step"] = 1000 * (dt - model) / n
    return out


def preload() -> None:
    """Import everything the runs need once, in the parent, before any torch op (so that forking is safe)."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    import ftdist.run  # noqa: F401
    import ftdist.train  # noqa: F401


def _forked(spec: dict, log: Path, timeout: float) -> int:
    """Run one worker in a forked child: a fresh process (own Accelerator, allocator, RNG) minus the imports."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            code = worker_run(spec)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.05)


def run_one(tool: str, mode: str, rep: int, args, work: Path) -> dict:
    run_dir = work / f"{mode}-{tool}-{rep}"
    spec = {"tool": tool, "batching": mode, "csv": str(work / "train.csv"), "model": args.model,
            "max_length": args.max_length, "batch": args.batch, "total": args.warmup + args.steps, "warmup": args.warmup,
            "model_dir": str(Path(args.model_dir).resolve()) if args.model_dir else str(C.default_model_dir()),
            "precision": args.precision, "run_dir": str(run_dir), "result": str(run_dir) + ".json",
            "threads": args.threads}
    log = Path(str(run_dir) + ".log")
    started = time.perf_counter()
    if args.spawn:
        spec_path = Path(str(run_dir) + ".spec.json")
        spec_path.write_text(json.dumps(spec))
        with log.open("w") as f:
            try:
                rc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=C.worker_env(work / "hf-cache"),
                                    stdout=f, stderr=subprocess.STDOUT, timeout=args.timeout).returncode
            except subprocess.TimeoutExpired:
                rc = -9
    else:
        rc = _forked(spec, log, args.timeout)
    wall = time.perf_counter() - started
    if rc != 0:
        raise SystemExit(f"{tool} ({mode}, repeat {rep + 1}) failed with exit {rc}; its log {log}:\n"
                         + log.read_text()[-4000:])
    res = json.loads(Path(spec["result"]).read_text())
    if len(res["times"]) != spec["total"]:
        raise SystemExit(f"{tool} ({mode}) ran {len(res['times'])} steps, expected {spec['total']}")
    out = window(res, args.warmup)
    out["wall_s"] = wall
    t = res["times"][args.warmup - 1:]
    out["step_s"] = [b - a for a, b in zip(t, t[1:])]  # each timed step's duration, for the per-step pairing
    out["shapes"] = res["shapes"]
    return out


METRICS = ("steps_per_s", "steps_per_cpu_s", "cpu_share", "samples_per_s", "real_tokens_per_s", "padding_efficiency",
           "setup_s", "wall_s")


def _ratios(runs, key):
    out = {}
    for other in ("raw", "trainer"):
        a, b = [r[key] for r in runs["ftdist"]], [r[key] for r in runs[other]]
        per = [x / y for x, y in zip(a, b)]
        out[f"ftdist/{other}"] = {"of_medians": C.median(a) / C.median(b), "paired_median": C.median(per),
                                  "per_repeat": per}
    return out


def bootstrap_ci(xs, stat=None, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `stat` (default: the mean) over the items of xs (seeded)."""
    import numpy as np

    stat = stat or (lambda v: float(np.mean(v)))
    rng = np.random.default_rng(seed)
    xs = list(xs)
    draws = sorted(stat([xs[i] for i in rng.integers(0, len(xs), len(xs))]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def per_step_pairs(runs: dict, other: str) -> dict:
    """--batching identical only: step i of repeat r ran the same batch in every tool, close in time
    (the runs of a repeat are adjacent), so other_time / ftdist_time per step is a paired speed ratio
    that a burst of machine noise in one step cannot move much. Median over all (repeat, step) pairs;
    the interval resamples whole repeats (steps of one process are not independent)."""
    import numpy as np

    reps = [[o / f for f, o in zip(rf["step_s"], ro["step_s"])] for rf, ro in zip(runs["ftdist"], runs[other])]
    lo, hi = bootstrap_ci(reps, lambda rs: float(np.median([x for r in rs for x in r])))
    return {"median": float(np.median([x for r in reps for x in r])), "ci95": [lo, hi], "pairs": sum(map(len, reps))}


def own_work(runs: dict) -> dict:
    """Each tool's own work per step (step time minus the model's forward and backward), and what the
    step-rate ratio is when the shared kernels run at one speed for all: (K + own_other) / (K + own_ftdist),
    K the median model time per step over every run. CPU only (see time_model_calls)."""
    own = {t: [r["own_ms_per_step"] for r in runs[t]] for t in TOOLS}
    k = C.median([r["model_ms_per_step"] for t in TOOLS for r in runs[t]])
    print(f"   per step outside the model's forward and backward (each tool's own work), ms, median (min..max); "
          f"model forward+backward {k:.1f} ms/step (median of all runs):")
    print("   " + "   ".join(f"{LABEL[t]} {C.spread(own[t])}" for t in TOOLS))
    out = {"model_ms_per_step": k, "own_ms_per_step": {t: C.median(own[t]) for t in TOOLS}}
    for other in ("raw", "trainer"):
        per = [o / f for f, o in zip(own["ftdist"], own[other])]
        lo, hi = bootstrap_ci(per)
        equal = (k + C.median(own[other])) / (k + C.median(own["ftdist"]))
        out[f"ftdist/{other}"] = {"own_work_ratio": sum(per) / len(per), "own_work_ratio_ci95": [lo, hi],
                                  "steps_per_s_ratio_at_equal_model_time": equal}
        print(f"   {other} / ftdist own work: mean of per-repeat ratios {sum(per) / len(per):.2f} [{lo:.2f}, {hi:.2f}]; "
              f"ftdist/{other} steps/s at equal model time: {equal:.3f}")
    return out


def summarize(mode: str, runs: dict, args) -> dict:
    med = {t: {k: C.median([r[k] for r in runs[t]]) for k in METRICS} for t in TOOLS}
    same = None
    if mode == "identical":
        ref = runs["ftdist"][0]["shapes"]
        same = all(r["shapes"] == ref for t in TOOLS for r in runs[t])
    print(f"\n== --batching {mode}: {args.reps} repeats x {args.steps} timed steps (after {args.warmup} warm-up), "
          f"batch {args.batch}, model {args.model}, precision {args.precision}, {args.threads or 'default'} thread(s)")
    if same is not None:
        print(f"   same batches in every run of every tool (per-step shapes and real-token counts): {'yes' if same else 'NO'}")
    print(f"   {'tool':<20} {'steps/s wall, median (min..max)':<32} {'steps/CPU-s (min..max)':<26} {'samples/s':>9} "
          f"{'real tok/s':>10} {'pad eff':>7} {'CPU share':>9}")
    for t in TOOLS:
        m = med[t]
        print(f"   {LABEL[t]:<20} {C.spread([r['steps_per_s'] for r in runs[t]]):<32} "
              f"{C.spread([r['steps_per_cpu_s'] for r in runs[t]]):<26} {m['samples_per_s']:>9.1f} "
              f"{m['real_tokens_per_s']:>10.0f} {m['padding_efficiency']:>7.3f} {m['cpu_share']:>9.2f}")
    ratios = {"wall": _ratios(runs, "steps_per_s"), "cpu": _ratios(runs, "steps_per_cpu_s")}
    targets = dict(TARGETS[mode])
    print("   ratios of the medians (PASS/FAIL on these); in parentheses the median of the per-repeat ratios, then each:")
    verdicts = {}
    for key in ("ftdist/raw", "ftdist/trainer"):
        tgt = targets.get(key)
        parts = []
        for clock in ("wall", "cpu"):
            r = ratios[clock][key]
            mark = f" {C.verdict(r['of_medians'], tgt)}" if tgt else ""
            parts.append(f"{clock} {r['of_medians']:.3f}{mark} (paired {r['paired_median']:.3f}: "
                         f"{', '.join(f'{x:.2f}' for x in r['per_repeat'])})")
            if tgt:
                verdicts[f"{key} ({clock})"] = {"value": r["of_medians"], "target": tgt, "pass": r["of_medians"] >= tgt}
        print(f"   {key:<15} {f'target >= {tgt:.2f}' if tgt else '(no target)':<15} " + "   ".join(parts))
    # How sure: the interval of the mean paired (per-repeat) ratio, and, where every tool ran the same
    # batches, the per-step paired ratio, which is far less sensitive to one slow burst of the machine.
    print("   precision (wall): 95% bootstrap intervals")
    spread_info = {}
    for other in ("raw", "trainer"):
        per = ratios["wall"][f"ftdist/{other}"]["per_repeat"]
        lo, hi = bootstrap_ci(per)
        info = {"paired_mean": sum(per) / len(per), "paired_mean_ci95": [lo, hi]}
        line = f"   ftdist/{other:<8} mean of the {len(per)} per-repeat ratios {info['paired_mean']:.3f} [{lo:.3f}, {hi:.3f}]"
        if same:
            info["per_step"] = ps = per_step_pairs(runs, other)
            line += (f";  per-step ({other} step time / ftdist step time, {ps['pairs']} pairs) median "
                     f"{ps['median']:.3f} [{ps['ci95'][0]:.3f}, {ps['ci95'][1]:.3f}]")
        print(line)
        spread_info[f"ftdist/{other}"] = info
    own = own_work(runs) if all("own_ms_per_step" in r for t in TOOLS for r in runs[t]) else None
    return {"medians": med, "ratios": ratios, "precision": spread_info, "own_work": own, "same_batches": same,
            "targets": verdicts,
            "runs": {t: [{k: v for k, v in r.items() if k != "shapes"} for r in runs[t]] for t in TOOLS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batching", choices=["identical", "defaults", "both"], default="both")
    p.add_argument("--model", choices=["minilm", *ARCHS], default="small",
                   help="small: random BERT hidden 128 x 2 layers (default); minilm: pretrained MiniLM-L6; tiny: random "
                        "BERT hidden 64 x 2 layers; micro: hidden 8 x 1 layer (almost no compute: each tool's own per-step "
                        "work is most of the step); base: random BERT-base (GPU)")
    p.add_argument("--model-dir", help="config + tokenizer folder for every tool (default: the embedded MiniLM-L6); "
                   "for a machine without the model package, e.g. the one `gpu_bench.py --prepare DIR` writes (DIR/model); "
                   "--model minilm also needs its weights there")
    p.add_argument("--reps", type=int, default=5, help="repeats of each tool (>= 3 for a median)")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=2000, help="rows of the generated CSV")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads in every run (default 1: on a shared, oversubscribed CPU one thread is faster and steadier)")
    p.add_argument("--spawn", action="store_true",
                   help="start every run as `python throughput.py --worker` (default: fork it from a parent that "
                        "has imported torch/transformers/datasets/ftdist once; each run is still its own process)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed for one run")
    p.add_argument("--order", default="ftdist,raw,trainer",
                   help="order of the tools within each repeat (a position bias check: the order changes nothing else)")
    p.add_argument("--json", help="write all numbers here")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step's timestamp starts the window)")
    if args.rows < (args.warmup + args.steps) * args.batch:
        p.error("--rows must cover warmup+steps batches (one epoch, no epoch boundary inside the window)")
    modes = ["identical", "defaults"] if args.batching == "both" else [args.batching]
    order = args.order.split(",")
    if sorted(order) != sorted(TOOLS):
        p.error(f"--order must list {', '.join(TOOLS)} once each")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ftdist-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(C.worker_env(work / "hf-cache", args.threads))  # before torch is imported
    if not args.spawn:
        preload()
    texts, labels = C.generate_texts(args.rows, seed=0)
    C.write_csv(work / "train.csv", texts, labels)
    print(f"throughput: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}")
    print(f"   data: {args.rows} generated rows, log-normal word counts (median 20 words), max_length {args.max_length}; "
          f"work dir {work}")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": C.machine_line(), "args": vars(args), "modes": {}}
    for mode in modes:
        runs = {t: [] for t in TOOLS}
        for rep in range(args.reps):
            for tool in order:
                r = run_one(tool, mode, rep, args, work)
                runs[tool].append(r)
                print(f"   [{mode} {rep + 1}/{args.reps}] {LABEL[tool]:<20} {r['steps_per_s']:.3f} steps/s, "
                      f"{r['steps_per_cpu_s']:.3f} steps/CPU-s (CPU share {r['cpu_share']:.2f}; setup {r['setup_s']:.1f} s, "
                      f"run {r['wall_s']:.1f} s)", flush=True)
        report["modes"][mode] = summarize(mode, runs, args)
    print(f"\nload average at the end: {C.machine_line().split('load average ')[-1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
