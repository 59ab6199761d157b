#!/usr/bin/env python3
"""Training throughput: the same fine-tune run by ftdist, a minimal Accelerate loop and transformers.Trainer.

    python benchmarks/throughput.py                       # both modes, small random BERT, 3 repeats
    python benchmarks/throughput.py --batching identical  # one mode
    python benchmarks/throughput.py --model minilm        # the pretrained MiniLM-L6 (slower)

Every run is a fresh subprocess (an Accelerator is a process-wide singleton), and runs alternate
ftdist, raw, Trainer, ftdist, raw, Trainer, ... so that drift in the machine's speed hits all three alike.
Each run records a timestamp after every optimizer step; steps/s is taken over the steps after the
first `--warmup` ones (setup, tokenization and the first steps are outside the window).

Same for all three: model (architecture, random or pretrained weights), data (a generated CSV of
sentences with a long-tailed length distribution, max_length 128), batch size, step count, AdamW with
lr 5e-5 / weight decay 0.01, linear schedule, grad clipping at 1.0, precision; no evaluation, no
checkpoints. Each tool keeps its own data path: ftdist its datasets-based pipeline, the raw loop a
plain list of tokenized rows, Trainer a tokenized datasets.Dataset.

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TOOLS = ("ftdist", "raw", "trainer")
LABEL = {"ftdist": "ftdist", "raw": "raw accelerate loop", "trainer": "HF Trainer"}
TARGETS = {"identical": [("ftdist/raw", 0.97), ("ftdist/trainer", 1.0)], "defaults": [("ftdist/trainer", 1.3)]}
LR, WEIGHT_DECAY, SEED = 5e-5, 0.01, 42


# ================================================================ workers (one per subprocess)

def _arch(spec):
    return {} if spec["model"] == "minilm" else dict(C.SMALL if spec["model"] == "small" else C.TINY)


def _identical_batches(spec, lengths):
    """ftdist's own seeded random batches (group_by_length off), epoch 0: the batches all three tools use."""
    from ftdist.sampler import global_batches

    return global_batches(lengths, spec["batch"], SEED, 0, False)


def _warmup_steps(total: int) -> int:
    return int(round(0.06 * total))  # ftdist's default train.warmup ratio, as a step count for the others


def worker_ftdist(spec):
    from ftdist import cli, config
    from ftdist.train import Trainer

    cli._setup_logging(quiet=True, verbose=False)  # what `python -m ftdist train --quiet` sets up
    arch = _arch(spec)
    recipe = config.from_dict({
        "model": {"name_or_path": "default", "init": "pretrained" if spec["model"] == "minilm" else "random",
                  "config_overrides": arch},
        "data": {"train_file": spec["csv"], "max_length": spec["max_length"], "validation_split": 0.0,
                 "test_split": 0.0, "group_by_length": spec["batching"] == "defaults"},
        "train": {"seed": SEED, "max_steps": spec["total"], "global_batch_size": spec["batch"],
                  "per_device_batch_size": spec["batch"], "lr": LR, "weight_decay": WEIGHT_DECAY, "warmup": 0.06,
                  "max_grad_norm": 1.0, "precision": spec["precision"]},
        "checkpoint": {"export": False, "resume": None},
        "log": {"output_dir": spec["run_dir"], "progress": False},
    })
    t0 = time.perf_counter()
    trainer = Trainer(recipe, quiet=True)
    trainer.setup()
    times, shapes = [], []

    def record(loss, window):  # replaces the (disabled) FTDIST_TRACE_DIR hook, called once per optimizer step
        times.append(time.perf_counter())
        shapes.append([[int(b["input_ids"].shape[0]), int(b["input_ids"].shape[1]), int(b["attention_mask"].sum())]
                       for b in window][0])

    trainer.record_step = record
    setup_s = time.perf_counter() - t0
    trainer.fit()
    return {"times": times, "shapes": shapes, "setup_s": setup_s}


def _tokenized_rows(spec, tok):
    texts, labels = C.read_csv(spec["csv"])
    enc = tok(texts, truncation=True, max_length=spec["max_length"])
    keys = list(enc.keys())
    return [{**{k: enc[k][i] for k in keys}, "labels": labels[i]} for i in range(len(texts))]


def _model_config(spec):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(C.default_model_dir()), num_labels=2)
    for k, v in _arch(spec).items():
        setattr(cfg, k, v)
    return cfg


def worker_raw(spec):
    """The minimal hand-written Accelerate loop (plus the clipping and schedule the other two do)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              get_linear_schedule_with_warmup)

    t0 = time.perf_counter()
    acc = Accelerator(mixed_precision=spec["precision"], cpu=not torch.cuda.is_available())
    set_seed(SEED)
    path = str(C.default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    rows = _tokenized_rows(spec, tok)
    if spec["model"] == "minilm":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_config(_model_config(spec))
    collate = DataCollatorWithPadding(tok)
    if spec["batching"] == "identical":
        batches = _identical_batches(spec, [len(r["input_ids"]) for r in rows])
        loader = DataLoader(rows, batch_sampler=batches, collate_fn=collate)
    else:
        loader = DataLoader(rows, batch_size=spec["batch"], shuffle=True, collate_fn=collate)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = get_linear_schedule_with_warmup(opt, _warmup_steps(spec["total"]), spec["total"])
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    setup_s = time.perf_counter() - t0
    times, shapes = [], []
    model.train()
    step = 0
    while step < spec["total"]:
        for batch in loader:
            loss = model(**batch).loss
            acc.backward(loss)
            acc.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            times.append(time.perf_counter())
            shapes.append([int(batch["input_ids"].shape[0]), int(batch["input_ids"].shape[1]),
                           int(batch["attention_mask"].sum())])
            if step >= spec["total"]:
                break
    return {"times": times, "shapes": shapes, "setup_s": setup_s}


def worker_trainer(spec):
    import datasets
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    path = str(C.default_model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    texts, labels = C.read_csv(spec["csv"])
    ds = datasets.Dataset.from_dict({"text": texts, "label": labels})
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=spec["max_length"]), batched=True,
                remove_columns=["text"]).rename_column("label", "labels")
    times, shapes = [], []
    pad = DataCollatorWithPadding(tok)

    def collate(features):  # DataCollatorWithPadding, recording the batch shape like the others
        b = pad(features)
        shapes.append([int(b["input_ids"].shape[0]), int(b["input_ids"].shape[1]), int(b["attention_mask"].sum())])
        return b

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=spec["batch"], learning_rate=LR,
        weight_decay=WEIGHT_DECAY, max_steps=spec["total"], warmup_steps=_warmup_steps(spec["total"]),
        lr_scheduler_type="linear", max_grad_norm=1.0, logging_steps=10, save_strategy="no", eval_strategy="no",
        report_to="none", seed=SEED, bf16=spec["precision"] == "bf16", fp16=spec["precision"] == "fp16",
        disable_tqdm=True, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    init = (lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)) if spec["model"] == "minilm" \
        else (lambda: AutoModelForSequenceClassification.from_config(_model_config(spec)))
    from transformers import set_seed
    set_seed(SEED)
    model = init()
    cls = Trainer
    if spec["batching"] == "identical":
        order = [i for b in _identical_batches(spec, [len(x) for x in ds["input_ids"]]) for i in b]

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
    trainer.train()
    # the loader may collate one batch ahead of the step: keep one shape per step
    return {"times": times, "shapes": shapes[:len(times)], "setup_s": setup_s}


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        import torch
        torch.set_num_threads(spec["threads"])
    out = {"ftdist": worker_ftdist, "raw": worker_raw, "trainer": worker_trainer}[spec["tool"]](spec)
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


# ================================================================ the comparison (parent process)

def window(res: dict, warmup: int) -> dict:
    """Rates over the optimizer steps after the first `warmup` (timestamps are taken after each step)."""
    t, shapes = res["times"], res["shapes"]
    n = len(t) - warmup
    dt = t[-1] - t[warmup - 1]
    kept = shapes[warmup:len(t)]
    samples = sum(s[0] for s in kept)
    padded = sum(s[0] * s[1] for s in kept)
    real = sum(s[2] for s in kept)
    return {"steps_per_s": n / dt, "samples_per_s": samples / dt, "real_tokens_per_s": real / dt,
            "padding_efficiency": real / max(padded, 1), "steps_timed": n, "setup_s": res["setup_s"]}


def run_one(tool: str, mode: str, rep: int, args, work: Path) -> dict:
    run_dir = work / f"{mode}-{tool}-{rep}"
    spec = {"tool": tool, "batching": mode, "csv": str(work / "train.csv"), "model": args.model,
            "max_length": args.max_length, "batch": args.batch, "total": args.warmup + args.steps,
            "precision": args.precision, "run_dir": str(run_dir), "result": str(run_dir) + ".json",
            "threads": args.threads}
    spec_path = Path(str(run_dir) + ".spec.json")
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=C.worker_env(work / "hf-cache"),
                       capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    if p.returncode != 0:
        raise SystemExit(f"{tool} ({mode}, repeat {rep + 1}) failed with exit {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    res = json.loads(Path(spec["result"]).read_text())
    if len(res["times"]) != spec["total"]:
        raise SystemExit(f"{tool} ({mode}) ran {len(res['times'])} steps, expected {spec['total']}")
    out = window(res, args.warmup)
    out["wall_s"] = wall
    out["shapes"] = res["shapes"]
    return out


def summarize(mode: str, runs: dict, args) -> dict:
    med = {t: {k: C.median([r[k] for r in runs[t]]) for k in ("steps_per_s", "samples_per_s", "real_tokens_per_s",
                                                                 "padding_efficiency", "setup_s", "wall_s")}
           for t in TOOLS}
    same = None
    if mode == "identical":
        same = all([s[:2] for s in r["shapes"]] == [s[:2] for s in runs["ftdist"][0]["shapes"]]
                   and [s[2] for s in r["shapes"]] == [s[2] for s in runs["ftdist"][0]["shapes"]]
                   for t in TOOLS for r in runs[t])
    print(f"\n== --batching {mode}: {args.reps} repeats x {args.steps} timed steps (after {args.warmup} warm-up), "
          f"batch {args.batch}, model {args.model}, precision {args.precision}")
    if same is not None:
        print(f"   same batches in every run of every tool (per-step shapes and real-token counts): {'yes' if same else 'NO'}")
    print(f"   {'tool':<20} {'steps/s median (min..max)':<28} {'samples/s':>10} {'real tok/s':>11} {'pad eff':>8} {'setup s':>8}")
    for t in TOOLS:
        m = med[t]
        print(f"   {LABEL[t]:<20} {C.spread([r['steps_per_s'] for r in runs[t]]):<28} {m['samples_per_s']:>10.1f} "
              f"{m['real_tokens_per_s']:>11.0f} {m['padding_efficiency']:>8.3f} {m['setup_s']:>8.1f}")
    ratios = {}
    for other in ("raw", "trainer"):
        key = f"ftdist/{other}"
        of_medians = med["ftdist"]["steps_per_s"] / med[other]["steps_per_s"]
        paired = C.median([a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["ftdist"], runs[other])])
        ratios[key] = {"of_medians": of_medians, "paired_median": paired,
                       "per_repeat": [a["steps_per_s"] / b["steps_per_s"] for a, b in zip(runs["ftdist"], runs[other])]}
    targets = dict(TARGETS[mode])
    for key, r in ratios.items():
        tgt = targets.get(key)
        mark = f"target >= {tgt:.2f}: {C.verdict(r['of_medians'], tgt)}" if tgt else "(no target)"
        print(f"   {key:<15} {r['of_medians']:.3f}  (paired per-repeat median {r['paired_median']:.3f}; "
              f"{', '.join(f'{x:.3f}' for x in r['per_repeat'])})  {mark}")
    return {"medians": med, "ratios": ratios, "same_batches": same,
            "targets": {k: {"target": v, "pass": ratios[k]["of_medians"] >= v} for k, v in targets.items()},
            "runs": {t: [{k: v for k, v in r.items() if k != "shapes"} for r in runs[t]] for t in TOOLS}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batching", choices=["identical", "defaults", "both"], default="both")
    p.add_argument("--model", choices=["small", "minilm", "tiny"], default="small",
                   help="small: random BERT hidden 256 x 4 layers (default); minilm: pretrained MiniLM-L6; tiny: smoke")
    p.add_argument("--reps", type=int, default=3, help="repeats of each tool (>= 3 for a median)")
    p.add_argument("--warmup", type=int, default=3, help="optimizer steps left out of the timing")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--rows", type=int, default=2000, help="rows of the generated CSV")
    p.add_argument("--precision", choices=["no", "bf16", "fp16"], default="no")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every run (default: torch's own)")
    p.add_argument("--timeout", type=int, default=600, help="seconds allowed for one run")
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
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ftdist-throughput-"))
    texts, labels = C.generate_texts(args.rows, seed=0)
    C.write_csv(work / "train.csv", texts, labels)
    print(f"throughput: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}")
    print(f"   data: {args.rows} generated rows, log-normal word counts (median 20 words), max_length {args.max_length}; "
          f"work dir {work}")
    report = {"date": time.strftime("%Y-%m-%d"), "machine": C.machine_line(), "args": vars(args), "modes": {}}
    for mode in modes:
        runs = {t: [] for t in TOOLS}
        for rep in range(args.reps):
            for tool in TOOLS:
                r = run_one(tool, mode, rep, args, work)
                runs[tool].append(r)
                print(f"   [{mode} {rep + 1}/{args.reps}] {LABEL[tool]:<20} {r['steps_per_s']:.3f} steps/s  "
                      f"(setup {r['setup_s']:.1f} s, process {r['wall_s']:.1f} s)", flush=True)
        report["modes"][mode] = summarize(mode, runs, args)
    print(f"\nload average at the end: {C.machine_line().split('load average ')[-1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
