"""`launch`: preset choice, the accelerate command it builds, dry runs, and two nodes over loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, assert_ok, base_env, free_port, run_ftdist

from ftdist import launcher
from ftdist.errors import FtdistError


@pytest.mark.parametrize("gpus,nodes,want", [(0, 1, "cpu"), (1, 1, "gpu"), (4, 1, "ddp"), (8, 2, "multinode-ddp"),
                                             (0, 2, "cpu-2")])
def test_default_preset_fits_the_machine(gpus, nodes, want):
    assert launcher.default_preset(gpus, nodes) == want


def build(argv, env=None, gpus=0):
    env = {"PATH": os.environ["PATH"], **(env or {})}
    cmd, add_env, topo = launcher.build(launcher.parse(argv), env=env, gpus=gpus)
    shutil.rmtree(topo.workdir, ignore_errors=True)  # the materialized preset copy
    return cmd, add_env, topo


def test_command_passes_topology_and_extra_accelerate_args_through():
    cmd, env, topo = build(["cpu-2", "tiny", "train.lr=1e-4", "--nodes", "2", "--node-rank", "1", "--main-address",
                            "10.0.0.5", "--main-port", "29555", "--nproc", "1", "--", "--monitor_interval", "1"])
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    assert cmd[cmd.index("--num_machines") + 1] == "2"
    assert cmd[cmd.index("--machine_rank") + 1] == "1"
    assert cmd[cmd.index("--main_process_ip") + 1] == "10.0.0.5"
    assert cmd[cmd.index("--main_process_port") + 1] == "29555"
    # extra accelerate args untouched, before the module; the recipe and overrides after it
    module = len(cmd) - 1 - cmd[::-1].index("-m")  # the `-m ftdist` (the first -m is python's)
    assert cmd[cmd.index("--monitor_interval") + 1] == "1" and cmd.index("--monitor_interval") < module
    assert cmd[-3:] == ["train", "tiny", "train.lr=1e-4"]
    assert topo.nodes == 2 and topo.world_size == 2


def test_cpu_presets_pass_their_thread_count_to_accelerate():
    """accelerate launch would pick (and warn about) a thread count itself; launch passes one: the cores this
    process may use, split between the local processes. Not for GPU presets, nor over the user's choice."""
    allowed = min(len(os.sched_getaffinity(0)), __import__("psutil").cpu_count(logical=False) or 1)

    def threads(cmd):
        flag = "--num_cpu_threads_per_process"
        return int(cmd[cmd.index(flag) + 1]) if flag in cmd else None

    assert threads(build(["cpu", "tiny"])[0]) == max(1, allowed)
    assert threads(build(["cpu-2", "tiny"])[0]) == max(1, allowed // 2)
    assert threads(build(["gpu", "tiny"], gpus=1)[0]) is None
    assert threads(build(["cpu", "tiny"], env={"OMP_NUM_THREADS": "3"})[0]) is None
    cmd = build(["cpu", "tiny", "--", "--num_cpu_threads_per_process", "5"])[0]
    assert cmd.count("--num_cpu_threads_per_process") == 1 and threads(cmd) == 5


def test_no_arguments_means_demo_on_this_machine():
    cmd, _, topo = build([])
    assert topo.recipe == "demo" and topo.preset == "cpu" and topo.world_size == 1
    assert topo.preset_info.distributed_type == "NO" and topo.preset_info.use_cpu


def test_slurm_environment_gives_rank_port_and_nodes():
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "10.1.2.3"}
    _, _, topo = build(["cpu-2", "tiny", "--nproc", "1"], env=slurm)
    assert (topo.nodes, topo.node_rank, topo.main_address) == (2, 1, "10.1.2.3")
    assert topo.main_port == 20000 + 4242 % 20000


def _fake_scontrol(tmp_path: Path) -> dict:
    """An environment whose `scontrol` knows a 2-node allocation whose first node is reached at 10.9.8.7."""
    (tmp_path / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$2" = hostnames ]; then printf "gpu-a\\ngpu-b\\n"; exit 0; fi\n'
        'if [ "$2 $3" = "node gpu-a" ]; then echo "NodeName=gpu-a Arch=x86_64 CoresPerSocket=8"; '
        'echo "   NodeAddr=10.9.8.7 NodeHostName=gpu-a Version=23.02"; exit 0; fi\n'
        "exit 1\n")
    (tmp_path / "scontrol").chmod(0o755)
    return {"PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "gpu-[a-b]"}


def test_main_address_is_the_first_nodes_nodeaddr(tmp_path, monkeypatch):
    """Node names need not resolve: the address is the first node's NodeAddr; MASTER_ADDR wins; none outside SLURM.
    The batch script asks for it with `launch --print-main-address` (one lookup, the same for every node)."""
    env = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", env["PATH"])  # the scontrol that launch runs
    assert launcher.main_address(env) == "10.9.8.7"
    assert launcher.slurm_topology(env)["main_address"] == "10.9.8.7"
    assert launcher.main_address({**env, "MASTER_ADDR": "ib-a"}) == "ib-a"
    assert launcher.main_address({"PATH": env["PATH"]}) is None
    p = subprocess.run([sys.executable, str(REPO / "launch"), "--print-main-address"], env={**base_env(), **env},
                       capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "10.9.8.7\n"), p.stderr
    outside = {k: v for k, v in base_env().items() if not k.startswith("SLURM_") and k != "MASTER_ADDR"}
    p = subprocess.run([sys.executable, str(REPO / "launch"), "--print-main-address"], env=outside,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and "set MASTER_ADDR" in p.stderr, p.stderr


@pytest.mark.parametrize("argv,env,match", [
    (["cpu-2", "tiny", "--nodes", "3"], {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "MASTER_ADDR": "h"}, "SLURM_NNODES"),
    (["cpu", "tiny", "--nproc", "2"], {}, "runs one process"),
    (["cpu-2", "tiny", "--nodes", "2", "--nproc", "1"], {}, "--main-address"),
    (["cpu-2", "tiny", "--nodes", "2", "--node-rank", "2", "--main-address", "h", "--nproc", "1"], {}, "outside"),
    (["cpu-2", "tiny", "notanoverride"], {}, "key=value"),
])
def test_inconsistent_topology_is_an_error(argv, env, match):
    with pytest.raises(FtdistError, match=match):
        build(argv, env=env)


@pytest.mark.timeout(300)
def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "launch"), "cpu-zero2", "tiny", f"log.output_dir={tmp_path}/run",
                        "--dry-run"], cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-2000:]
    for line in ("world size        2", "accumulation      1", "global batch      16", "DEEPSPEED", "zero stage 2",
                 "steps per epoch", "block1", "stage 0 from step 0", "node 0: ./launch cpu-zero2 tiny"):
        assert line in p.stdout, line
    assert not (tmp_path / "run").exists()
    bad = subprocess.run([sys.executable, str(REPO / "launch"), "cpu-2", "tiny", "train.global_batch_size=15",
                          "--dry-run"], cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2 and "cannot be split over world size 2" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("preset", ["cpu", "cpu-2"])
def test_bad_recipe_or_data_file_is_one_error_and_exit_2_before_anything_starts(tmp_path, preset):
    """Checked by launch itself: one paragraph, exit 2, no rank started (so no torchrun report or traceback)."""
    p = subprocess.run([sys.executable, str(REPO / "launch"), preset, "tiny", "train.lr=abc",
                        f"log.output_dir={tmp_path}/run"], cwd=tmp_path, env=base_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.startswith("launch: error: recipe has 1 problem") and "train.lr" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr + p.stdout and "accelerate" not in p.stdout
    assert not (tmp_path / "run").exists()
    # the same for a data file that is not there
    p = subprocess.run([sys.executable, str(REPO / "launch"), preset, "tiny", "data.dataset=null",
                        f"data.train_file={tmp_path}/missing.csv"], cwd=tmp_path, env=base_env(), capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2 and p.stderr.startswith("launch: error: data.train_file:"), p.stdout + p.stderr
    assert "missing.csv' does not exist" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.timeout(300)
def test_one_cpu_process_runs_without_accelerate_launch_and_keeps_its_exit_status(tmp_path):
    """One non-distributed process: launch starts the trainer itself, with the environment accelerate's simple
    launcher would give it (ACCELERATE_USE_CPU, threads); a failing run keeps ftdist's error and exit status."""
    env = base_env({"FTDIST_TRACE_DIR": str(tmp_path / "trace")})
    p = subprocess.run([sys.executable, str(REPO / "launch"), "cpu", "tiny", "train.max_steps=2",
                        f"log.output_dir={tmp_path}/run", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 0, p.stdout + p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith("launch: ") and first.endswith(f"-m ftdist train tiny train.max_steps=2 "
                                                           f"log.output_dir={tmp_path}/run --quiet"), first
    assert "accelerate.commands.launch" not in first
    rows = [json.loads(x) for x in (tmp_path / "trace" / "rank0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and {r["world"] for r in rows} == {1}
    # a data error found inside the run (a 2-row file): the trainer's one line and its exit status 2
    (tmp_path / "nolabel.csv").write_text("text\ngood\nbad\n")
    bad = subprocess.run([sys.executable, str(REPO / "launch"), "cpu", "tiny", "data.dataset=null",
                          f"data.train_file={tmp_path}/nolabel.csv", f"log.output_dir={tmp_path}/bad"], cwd=tmp_path,
                         env=base_env(), capture_output=True, text=True, timeout=240)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert bad.stderr.startswith("ftdist: error: data.") and "Traceback" not in bad.stderr, bad.stderr


def test_single_process_command_is_accelerates_own(tmp_path):
    """The child command and environment come from accelerate's simple launcher; os.environ is left as it was;
    configs accelerate starts with another launcher (here DDP over gloo) are not run directly."""
    def build(argv):  # keeping the materialized preset (FTDIST_LAUNCH_DIR): accelerate reads it
        return launcher.build(launcher.parse(argv), env={"PATH": os.environ["PATH"], "FTDIST_LAUNCH_DIR": str(tmp_path)},
                              gpus=0)

    cmd, add_env, topo = build(["cpu", "tiny", "train.lr=1e-4"])
    env = {**os.environ, **{k: v for k, v in add_env.items() if v is not None}, "FTDIST_STOP_FILE": "/tmp/stop-x"}
    before = dict(os.environ)
    child, child_env = launcher.single_process(cmd, env)
    assert dict(os.environ) == before
    assert child[1:] == ["-m", "ftdist", "train", "tiny", "train.lr=1e-4"]
    flag = cmd.index("--num_cpu_threads_per_process")
    assert child_env["ACCELERATE_USE_CPU"] == "True" and child_env["OMP_NUM_THREADS"] == cmd[flag + 1]
    assert child_env["FTDIST_STOP_FILE"] == "/tmp/stop-x"
    cmd2, _, _ = build(["cpu-2", "tiny"])
    assert launcher.single_process(cmd2, dict(os.environ)) is None


@pytest.mark.timeout(600)
def test_two_nodes_over_loopback_match_two_local_processes(tmp_path):
    """Two `launch` commands (node rank 0 and 1, one process each) form a world of 2 and train the same model
    as `accelerate launch` with 2 local processes."""
    overrides = ["train.max_steps=6"]  # same world size, same ranks: the same dropout masks
    port = free_port()
    procs = []
    for rank in (1, 0):
        env = base_env({"FTDIST_TRACE_DIR": str(tmp_path / "mn-trace")})
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "launch"), "cpu-2", "tiny", f"log.output_dir={tmp_path}/mn", *overrides,
             "--quiet", "--nodes", "2", "--node-rank", str(rank), "--main-address", "127.0.0.1", "--main-port",
             str(port), "--nproc", "1"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True))
    logs = [p.communicate(timeout=420)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-2000:] for x in logs)
    # launch passes everything accelerate would otherwise default and warn about
    assert not any("were not passed to `accelerate launch`" in x for x in logs), logs[0][-3000:]
    local = run_ftdist(tmp_path, overrides, preset="cpu-2", nprocs=2, name="local")
    assert_ok(local, world=2)
    rows = [json.loads(x) for x in (tmp_path / "mn-trace" / "rank0.jsonl").read_text().splitlines()]
    assert {r["world"] for r in rows} == {2}
    assert [r["loss"] for r in rows] == pytest.approx(local.losses(), rel=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "mn" / "model" / "model.safetensors")), local.weights()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
