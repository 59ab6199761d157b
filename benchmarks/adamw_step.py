#!/usr/bin/env python3
"""One AdamW step, three torch implementations: single-tensor, foreach (multi-tensor), fused.

    python benchmarks/adamw_step.py            # the small random BERT of throughput.py and MiniLM-L6, CPU
    python benchmarks/adamw_step.py --threads 2

torch's default AdamW (what the raw loop of raw_loop.py builds) is the single-tensor path on CPU and
foreach on GPU; ftdist/optim.py and transformers.Trainer (optim=adamw_torch_fused) build the fused
kernel. This isolates the optimizer step (gradients preset, nothing else), timed in process CPU time
(median of --reps steps after 2 warm-up steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args(argv)
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clock = time.perf_counter if device == "cuda" else time.process_time
    print(f"adamw_step: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}  device {device}, {args.threads} thread(s)")
    print(f"   {'model':<8} {'params':>8}  " + "  ".join(f"{k:>14}" for k in ("single-tensor", "foreach", "fused")))
    for name, arch in (("small", C.SMALL), ("minilm", {})):
        cfg = AutoConfig.from_pretrained(str(C.default_model_dir()), num_labels=2)
        for k, v in arch.items():
            setattr(cfg, k, v)
        model = AutoModelForSequenceClassification.from_config(cfg).to(device)
        for prm in model.parameters():
            prm.grad = torch.randn_like(prm) * 1e-3
        row = []
        for kw in ({"foreach": False}, {"foreach": True}, {"fused": True}):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **kw)
            times = []
            for i in range(args.reps + 2):
                t = clock()
                opt.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times.append(clock() - t)
            row.append(1000 * statistics.median(times))
        n = sum(prm.numel() for prm in model.parameters())
        print(f"   {name:<8} {n / 1e6:>7.1f}M  " + "  ".join(f"{x:>11.1f} ms" for x in row)
              + f"   (fused is {row[0] / row[2]:.1f}x faster than single-tensor)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
