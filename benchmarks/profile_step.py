"""Where a training step's time goes, for ftdist, the raw Accelerate loop and HF Trainer.

Runs one tool's `throughput.py` worker (identical batching, the same model, data and settings as
`throughput.py --batching identical`; for `raw`, the shared loop of raw_loop.py) under cProfile, in this process, and prints per-step totals of
the kernels and phases the three share, so that their overheads can be compared line by line:

    python benchmarks/profile_step.py --tool ftdist
    python benchmarks/profile_step.py --tool trainer
    python benchmarks/profile_step.py --tool raw --steps 60

cProfile slows Python code (not the kernels), so the steps/s it prints is lower than throughput.py's;
compare the tools with each other, not with throughput.py.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# (label, pstats function-name pattern): what to total per step
ROWS = [
    ("backward (autograd engine)", r"<method 'run_backward'"),
    ("linear", r"torch._C._nn.linear"),
    ("attention (sdpa)", r"scaled_dot_product_attention"),
    ("dropout", r"torch.dropout"),
    ("fused AdamW kernel", r"_fused_adamw_"),
    ("optimizer.step (accelerate wrapper)", r"accelerate/optimizer.py:\d+\(step\)"),
    ("clip_grad_norm_ (accelerate)", r"accelerator.py:\d+\(clip_grad_norm_\)"),
    ("zero_grad (optimizer, or Trainer's model)", r"accelerate/optimizer.py:\d+\(zero_grad\)|"
                                                 r"nn/modules/module.py:\d+\(zero_grad\)"),
    ("DataLoader fetch (rows + collate)", r"_utils/fetch.py:\d+\(fetch\)"),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tool", choices=["ftdist", "raw", "trainer"], required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--model", choices=["small", "tiny", "micro"], default="small", help="as throughput.py --model")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--top", type=int, default=0, help="also print the N most expensive functions (own time)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ftdist-profile-"))
    os.environ.update(C.worker_env(work / "hf-cache", 1))
    import torch

    torch.set_num_threads(1)
    import throughput as T

    texts, labels = C.generate_texts(args.rows, seed=0)
    C.write_csv(work / "train.csv", texts, labels)
    spec = {"tool": args.tool, "batching": "identical", "csv": str(work / "train.csv"), "model": args.model,
            "max_length": 128, "batch": 32, "total": args.steps, "warmup": 1, "cuda": torch.cuda.is_available(),
            "model_dir": str(C.default_model_dir()), "precision": "no", "run_dir": str(work / "run"),
            "result": str(work / "result.json"), "threads": 1}
    worker = {"ftdist": T.worker_ftdist, "raw": T.worker_raw, "trainer": T.worker_trainer}[args.tool]
    prof = cProfile.Profile()
    prof.enable()
    res = worker(spec)
    prof.disable()
    t = res["times"]
    print(f"profile_step: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}")
    print(f"   {args.tool}: {len(t)} steps; {(len(t) - 1) / (t[-1] - t[0]):.2f} steps/s under cProfile (steps 2..{len(t)})")
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    import re

    print(f"   {'per optimizer step, over all steps':<40} {'ms/step':>8} {'calls/step':>11}")
    for label, pattern in ROWS:
        rx = re.compile(pattern)
        hits = [(v[1], v[3]) for k, v in stats.items() if rx.search(f"{k[0]}:{k[1]}({k[2]})")]
        calls = sum(h[0] for h in hits)
        cum = sum(h[1] for h in hits)
        print(f"   {label:<40} {1000 * cum / len(t):8.2f} {calls / len(t):11.1f}")
    if args.top:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
