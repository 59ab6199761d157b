"""What the whole-tensor copy costs a ZeRO checkpoint: disk and save time, next to DeepSpeed's own files.

Trains the default recipe (`demo`: MiniLM-L6, 22.7M parameters) on a ZeRO preset for a few steps with a
checkpoint after each, and reports per checkpoint: the size of DeepSpeed's files and of
portable.safetensors, the whole save's time and the copy's share of it (gather + write). Side by side in
one run, so the ratios hold on whatever machine runs it.

    python3 benchmarks/checkpoint_cost.py [--preset cpu-zero2] [--steps 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"checkpoint (step-\d+) saved in ([\d.]+)s \(whole-tensor copy ([\d.]+) MB in ([\d.]+)s\)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu-zero2")
    ap.add_argument("--recipe", default="demo")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        cmd = [sys.executable, str(REPO / "launch"), a.preset, a.recipe, f"train.max_steps={a.steps}",
               "checkpoint.every_steps=1", f"checkpoint.keep_last={a.steps}", "log.progress=false", "log.trackers=[]",
               "eval.every_steps=null", f"log.output_dir={run}", "--verbose"]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            print(log[-4000:])
            return p.returncode
        rows = []
        for name, total, copy_mb, copy_s in LINE.findall(log):
            ckpt = run / "checkpoints" / name
            native = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != "portable.safetensors")
            rows.append({"checkpoint": name, "native_mb": native / 1e6, "portable_mb": float(copy_mb),
                         "save_s": float(total), "portable_s": float(copy_s)})
    if not rows:
        print("no checkpoint timing lines found: is the preset a ZeRO one?\n" + log[-3000:])
        return 1
    print(f"{a.recipe} on {a.preset}: {len(rows)} checkpoints")
    print(f"{'checkpoint':<16}{'native MB':>10}{'copy MB':>9}{'disk x':>8}{'save s':>8}{'copy s':>8}{'time share':>11}")
    for r in rows:
        print(f"{r['checkpoint']:<16}{r['native_mb']:>10.1f}{r['portable_mb']:>9.1f}"
              f"{r['portable_mb'] / r['native_mb']:>8.2f}{r['save_s']:>8.2f}{r['portable_s']:>8.2f}"
              f"{r['portable_s'] / r['save_s']:>10.0%}")
    if a.json:
        a.json.write_text(json.dumps({"recipe": a.recipe, "preset": a.preset, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
