#!/usr/bin/env python3
"""Time to first optimizer step of the default job, `ftdist train demo`, cold and warm.

    python benchmarks/first_step.py            # 3 cold/warm pairs
    python benchmarks/first_step.py --reps 5

Each run is `python -m ftdist train demo log.output_dir=<fresh folder>` (the default job; a fresh run
folder only so that nothing is resumed), started as its own process. The clock starts just before the
process is started and stops when the first row of its FTDIST_TRACE_DIR trace appears: the trainer
writes that row right after optimizer step 1 (the trace is one of its per-step hooks). The process
is then killed: the rest of the job is not part of the measurement. Also timestamped: the moment the plan is
printed (setup done: data loaded and tokenized, model built, optimizer prepared).

cold: a fresh, empty HF_DATASETS_CACHE (the demo data is tokenized and written to the cache).
warm: a second run with the same cache (tokenization is read back from it).
Both: the operating system's file cache and Python's bytecode caches are warm (this is not a
cold-boot number), and so is the model on disk.
Also timed, for reference: a process that only imports what ftdist imports before training.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

IMPORTS = "import torch, transformers, accelerate, datasets; import ftdist.cli, ftdist.train, ftdist.data, ftdist.model"


def timed_run(cmd, env, trace: Path | None, timeout: float) -> dict:
    """Start `cmd`; return seconds from start to the plan line and to the first trace row (None if never)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    marks: dict[str, float] = {}
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("plan:") and "plan" not in marks:
                marks["plan"] = time.perf_counter() - started

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    first = usage = None
    deadline = started + timeout
    f = trace / "rank0.jsonl" if trace else None
    while time.perf_counter() < deadline:
        if f is not None and f.exists() and f.read_text().strip():
            first = time.perf_counter() - started
            break
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if done:
            proc.returncode = os.waitstatus_to_exitcode(status)
            if f is None:
                first = time.perf_counter() - started  # import-only run: its exit is the mark
            break
        time.sleep(0.005)
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the job's own process group, started above
        _, status, usage = os.wait4(proc.pid, 0)  # CPU seconds of the child, killed or not
        proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    cpu = usage.ru_utime + usage.ru_stime if usage else None
    return {"first_step_s": first, "plan_s": marks.get("plan"), "cpu_s": cpu, "rc": proc.returncode,
            "tail": "".join(lines[-15:])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="cold/warm pairs")
    p.add_argument("--recipe", default="demo")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides (default: none, the default job)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ftdist-first-step-"))
    print(f"first_step: {time.strftime('%Y-%m-%d %H:%M')}  {C.machine_line()}")
    print(f"   job: python -m ftdist train {args.recipe} {' '.join(args.overrides)} (fresh log.output_dir each run)")
    runs = {"cold": [], "warm": [], "imports": []}
    for rep in range(args.reps):
        cache = work / f"cache{rep}"
        for kind in ("cold", "warm"):
            name = f"{kind}{rep}"
            env = C.worker_env(cache)
            env["FTDIST_TRACE_DIR"] = str(work / f"trace-{name}")
            cmd = [sys.executable, "-m", "ftdist", "train", args.recipe, f"log.output_dir={work / ('run-' + name)}",
                   *args.overrides]
            r = timed_run(cmd, env, work / f"trace-{name}", args.timeout)
            if r["first_step_s"] is None:
                raise SystemExit(f"{kind} run {rep + 1}: no first step within {args.timeout}s (exit {r['rc']}):\n{r['tail']}")
            runs[kind].append(r)
            print(f"   [{rep + 1}/{args.reps}] {kind}: first optimizer step at {r['first_step_s']:.2f} s "
                  f"(setup done, plan printed, at {r['plan_s'] or float('nan'):.2f} s; {r['cpu_s']:.2f} CPU-s)", flush=True)
        r = timed_run([sys.executable, "-c", IMPORTS], C.worker_env(work / "cache-imports"), None, args.timeout)
        runs["imports"].append(r)
        print(f"   [{rep + 1}/{args.reps}] imports only: {r['first_step_s']:.2f} s ({r['cpu_s']:.2f} CPU-s)", flush=True)
    print(f"\n   {'':<34} {'median':>8} {'min..max':>16} {'CPU-s median':>13}")
    summary = {}
    for kind, label in (("cold", "cold: first optimizer step"), ("warm", "warm: first optimizer step"),
                        ("imports", "process importing ftdist's deps")):
        xs = [r["first_step_s"] for r in runs[kind]]
        cpu = [r["cpu_s"] for r in runs[kind]]
        summary[kind] = {"median_s": C.median(xs), "all_s": xs, "cpu_median_s": C.median(cpu), "cpu_all_s": cpu}
        print(f"   {label:<34} {C.median(xs):>7.2f}s {min(xs):>7.2f}..{max(xs):.2f}s {C.median(cpu):>12.2f}s")
        if kind != "imports":
            plans = [r["plan_s"] for r in runs[kind] if r["plan_s"] is not None]
            summary[kind]["plan_median_s"] = C.median(plans)
            print(f"   {'  of which setup done (plan)':<34} {C.median(plans):>7.2f}s")
    print(f"\n   load average at the end: {C.machine_line().split('load average ')[-1]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": C.machine_line(),
                                               "args": vars(args), "summary": summary,
                                               "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "tail"} for r in v]
                                                        for k, v in runs.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
