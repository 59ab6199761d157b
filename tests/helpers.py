"""Running ftdist for real in tests: one process, or N processes through `accelerate launch` over gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ftdist import presets

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    rc: int
    log: str
    run_dir: Path
    trace_dir: Path

    def trace(self, rank: int = 0) -> list[dict]:
        """Per-step records written by the trainer (FTDIST_TRACE_DIR): loss, sample ids, stage, world size."""
        f = self.trace_dir / f"rank{rank}.jsonl"
        return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []

    def losses(self, rank: int = 0) -> list[float]:
        return [r["loss"] for r in self.trace(rank)]

    def weights(self, sub: str = "model") -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.run_dir / sub / "model.safetensors"))


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_ftdist(tmp: Path, overrides: list[str], preset: str | None = None, nprocs: int = 1, recipe: str = "tiny",
               env: dict | None = None, timeout: int = 300, command: str = "train", name: str = "run",
               flags: tuple = ("--quiet",)) -> Result:
    """Run `ftdist train RECIPE overrides FLAGS` in a fresh run folder under tmp; never hangs past `timeout`."""
    run_dir, trace_dir = tmp / name, tmp / f"{name}-trace"
    args = [command, recipe, f"log.output_dir={run_dir}", *overrides, *flags]
    extra = {"FTDIST_TRACE_DIR": str(trace_dir), **(env or {})}
    if preset is None:
        cmd = [sys.executable, "-m", "ftdist", *args]
    else:
        cfg = presets.load(preset)
        launch_args, launch_env = presets.launch_overrides(cfg)
        for k, v in launch_env.items():
            if v is None:
                extra.pop(k, None)
            else:
                extra[k] = v
        materialized = presets.materialize(preset, tmp / f"{name}-config")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(materialized),
               "--num_processes", str(nprocs), "--main_process_port", str(free_port()), *launch_args,
               "-m", "ftdist", *args]
    e = base_env(extra)
    if preset is not None and presets.describe(presets.load(preset)).distributed_type != "DEEPSPEED":
        e.pop("DS_ACCELERATOR", None)
    # own process group: on a timeout the whole tree (launcher, torchrun agent, every rank) is killed
    p = subprocess.Popen(cmd, cwd=tmp, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        rc, log = p.returncode, out + err
    except subprocess.TimeoutExpired:
        _killpg(p.pid)
        out, err = p.communicate()
        rc, log = -9, f"TIMEOUT after {timeout}s\n{out or ''}{err or ''}"
    finally:
        _killpg(p.pid)  # a rank left behind (e.g. hung while the others failed) must not outlive its test
    return Result(rc, log, run_dir, trace_dir)


def assert_ok(res: Result, world: int | None = None) -> None:
    assert res.rc == 0, f"ftdist exited {res.rc}:\n{res.log[-4000:]}"
    if world is not None:
        rows = res.trace(0)
        assert rows, f"no trace written:\n{res.log[-2000:]}"
        assert {r["world"] for r in rows} == {world}, f"expected world size {world}, got {rows[0]['world']}"
