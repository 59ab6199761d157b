"""GPU benchmark (one H200, < 5 min): BERT-base-sized model from config, seq 128, bf16.

ftdist (preset `gpu`) vs a minimal raw Accelerate loop on the same data, batch and steps; then
ftdist under DDP-style `gpu` vs DeepSpeed ZeRO-2 on one GPU. Reports samples/s, tokens/s,
MFU on real tokens and peak memory; writes --out JSON.

    python benchmarks/gpu_run.py --model-dir DIR --out gpu_run.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import run_ftdist  # noqa: E402

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def write_csv(path: Path, n: int, rng: random.Random) -> None:
    vocab = "the a model data token train batch layer value field river stone light green paper".split()
    rows = ["text,label"]
    for i in range(n):
        k = min(120, max(40, int(rng.lognormvariate(4.3, 0.3))))  # 40..120 words, most near 75
        rows.append(f"\"{' '.join(rng.choice(vocab) for _ in range(k))}\",{i % 2}")
    path.write_text("\n".join(rows) + "\n")


def flops_per_token(n_params: int, layers: int, hidden: int, seq: int) -> float:
    # 6N for the dense matmuls (fwd + bwd) + attention scores/values 12 * L * h * s (PaLM appendix B)
    return 6 * n_params + 12 * layers * hidden * seq


def raw_loop(model_dir: str, csv: Path, batch: int, steps: int, max_len: int) -> dict:
    import torch
    from accelerate import Accelerator
    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    acc = Accelerator(mixed_precision="bf16")
    tok = AutoTokenizer.from_pretrained(model_dir)
    ds = load_dataset("csv", data_files=str(csv), split="train")
    ds = ds.map(lambda b: tok(b["text"], truncation=True, max_length=max_len), batched=True, remove_columns=["text"])
    ds = ds.rename_column("label", "labels")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(model_dir, num_labels=2))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    dl = DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=DataCollatorWithPadding(tok))
    model, opt, dl = acc.prepare(model, opt, dl)
    torch.cuda.reset_peak_memory_stats()
    times, real = [], 0
    it = iter(dl)
    for step in range(steps):
        b = next(it)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(**b).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 10:
            times.append(time.perf_counter() - t0)
            real += int(b["attention_mask"].sum())
    n = sum(p.numel() for p in model.parameters())
    return {"step_time_s": statistics.median(times), "samples_per_s": batch / statistics.median(times),
            "tokens_per_s": real / sum(times), "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "params": n}


def ftdist_run(tmp: Path, model_dir: str, csv: Path, preset: str, batch: int, steps: int, max_len: int) -> dict:
    # config_overrides={} : the `tiny` recipe shrinks the model; here the model folder's BERT-base config must win
    res = run_ftdist(tmp, [f"model.name_or_path={model_dir}", "model.config_overrides={}", "data.dataset=null", f"data.train_file={csv}",
                           "data.validation_split=0", "model.dropout=0", f"train.max_steps={steps}",
                           f"train.global_batch_size={batch}", f"train.per_device_batch_size={batch}",
                           "train.precision=bf16", f"data.max_length={max_len}", "checkpoint.export=false",
                           "log.every_steps=1", "train.warmup=0"], preset=preset, nprocs=1, name=f"ftdist-{preset}",
                     timeout=400)
    if res.rc:
        return {"rc": res.rc, "log_tail": res.log[-2500:]}
    rows = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/step_time_s" in r and r["step"] > 10]
    st = statistics.median(r["train/step_time_s"] for r in train)
    frac = statistics.median(r["train/real_token_fraction"] for r in train)
    return {"rc": 0, "step_time_s": st, "samples_per_s": batch / st, "real_token_fraction": frac,
            "peak_mem_gb": max(r.get("train/peak_mem_gb", 0) for r in train),
            "tokens_per_s_cumulative": train[-1]["train/tokens_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default="gpu_run.json")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--presets", default="gpu,zero2", help="ftdist presets to run (gpu = 1-GPU DDP-style, zero2)")
    args = ap.parse_args()
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="gpu-run-"))
    csv = tmp / "data.csv"
    write_csv(csv, args.batch * (args.steps + 5), random.Random(0))
    out = {"device": torch.cuda.get_device_name(0), "batch": args.batch, "steps": args.steps, "max_len": args.max_len}
    peak = next((v for k, v in PEAK_BF16.items() if k in out["device"]), None)
    out["raw"] = raw_loop(args.model_dir, csv, args.batch, args.steps, args.max_len)
    print("raw", out["raw"], flush=True)
    for preset in args.presets.split(","):
        out[f"ftdist_{preset}"] = ftdist_run(tmp, args.model_dir, csv, preset, args.batch, args.steps, args.max_len)
        print(preset, {k: v for k, v in out[f"ftdist_{preset}"].items() if k != "log_tail"}, flush=True)
    cfg = json.loads((Path(args.model_dir) / "config.json").read_text())
    fpt = flops_per_token(out["raw"]["params"], cfg["num_hidden_layers"], cfg["hidden_size"], args.max_len)
    for key in ("raw", "ftdist_gpu", "ftdist_zero2"):
        r = out.get(key, {})
        if r.get("samples_per_s") and peak:
            tps = r.get("tokens_per_s") or r["samples_per_s"] * r.get("real_token_fraction", 1.0) * args.max_len
            r["mfu_real_tokens"] = fpt * tps / peak
    if out.get("ftdist_gpu", {}).get("samples_per_s"):
        out["ratio_ftdist_over_raw"] = out["ftdist_gpu"]["samples_per_s"] / out["raw"]["samples_per_s"]
    if out.get("ftdist_zero2", {}).get("samples_per_s") and out.get("ftdist_gpu", {}).get("samples_per_s"):
        out["ratio_zero2_over_ddp"] = out["ftdist_zero2"]["samples_per_s"] / out["ftdist_gpu"]["samples_per_s"]
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
