"""GPU check (run on a CUDA machine): one recipe on 1 GPU under DDP-style `gpu`, ZeRO-2 and ZeRO-3,
fp32 with a gradual unfreezing schedule (4 transitions), then bf16. Prints per-backend max
differences against the `gpu` run and writes them to --out as JSON.

    python benchmarks/gpu_parity.py --model-dir DIR --out gpu_parity.json

DIR holds a model config + tokenizer (weights are not needed: model.init=random).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import run_ftdist  # noqa: E402


def write_csv(path: Path, n: int = 512) -> None:
    rng = random.Random(0)
    pos, neg = "good great fine lovely superb".split(), "bad awful poor dreadful grim".split()
    rows = ["text,label"]
    for i in range(n):
        label = i % 2
        words = [rng.choice(pos if label else neg) for _ in range(rng.randint(3, 40))]
        rows.append(f"\"{' '.join(words)} {i}\",{'positive' if label else 'negative'}")
    path.write_text("\n".join(rows) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", default="gpu_parity.json")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-parity-"))
    csv = tmp / "data.csv"
    write_csv(csv)
    common = [f"model.name_or_path={args.model_dir}", "data.dataset=null", f"data.train_file={csv}",
              "data.validation_split=0.1", "model.dropout=0", f"train.max_steps={args.steps}",
              "unfreeze.schedule=gradual", "unfreeze.every_steps=4", "train.check_sync=1"]
    results = {}
    runs = {}
    for precision in ("no", "bf16"):
        for preset in ("gpu", "zero2", "zero3"):
            name = f"{preset}-{precision}"
            res = run_ftdist(tmp, [*common, f"train.precision={precision}"], preset=preset, nprocs=1, name=name,
                             timeout=300)
            ok = res.rc == 0
            runs[name] = res
            results[name] = {"rc": res.rc, "world": [r["world"] for r in res.trace()][:1],
                             "stages": sorted({r["stage"] for r in res.trace()}),
                             "final_loss": res.losses()[-1] if ok and res.losses() else None}
            if not ok:
                results[name]["log_tail"] = res.log[-3000:]
            print(name, json.dumps(results[name])[:300], flush=True)
    for precision in ("no", "bf16"):
        ref = runs[f"gpu-{precision}"]
        if ref.rc:
            continue
        for preset in ("zero2", "zero3"):
            other = runs[f"{preset}-{precision}"]
            if other.rc:
                continue
            a, b = ref.losses(), other.losses()
            rel = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))
            wa, wb = ref.weights(), other.weights()
            wdiff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
            results[f"{preset}-{precision}"].update({"max_rel_loss_diff_vs_gpu": rel, "max_abs_weight_diff_vs_gpu": wdiff,
                                                     "finite": all(math.isfinite(x) for x in b)})
            print(f"{preset} {precision}: max rel loss diff {rel:.3e}, max abs weight diff {wdiff:.3e}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
