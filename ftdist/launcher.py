"""`./launch [PRESET | CONFIG.yaml] RECIPE [key=value ...] [flags] [-- accelerate args]`.

Thin by design: it picks a preset, fills in the topology (from flags or the SLURM environment),
prints the exact `accelerate launch` command and runs it. Everything else is accelerate's:
extra accelerate flags go after `--` untouched.

Preemption plumbing: SLURM (or anyone) sends SIGUSR1/SIGTERM to this process. Signals that reach
torchrun's agent kill it before the workers can save, so the launcher runs accelerate in its own
session and, on a signal, creates a node-local stop file instead. Every rank polls that file
between optimizer steps (ftdist.preempt.Preemption), they agree with one all-reduce, save a
checkpoint on every rank, and exit; the trainer leaves `<stop file>.preempted`, and the launcher
then exits with ftdist.errors.PREEMPTED_EXIT (99) so that the batch script requeues the job.

Ctrl-C (SIGINT) takes the same path but is an interactive stop, not a preemption: the launcher exits
130 after the checkpoint. A second Ctrl-C kills every process of the run at once; checkpoints are
published atomically, so the last complete one stays intact.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ftdist import devices, envinfo, launchargs, presets
from ftdist.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT, FtdistError
from ftdist.redaction import redact_override

STOP_FILE_ENV = "FTDIST_STOP_FILE"  # read by ftdist.preempt in every rank


@dataclass(frozen=True)
class Topology:
    """What one `launch` runs: which preset and recipe, on how many nodes and processes, where to meet."""

    preset: str                # preset name or accelerate config file
    recipe: str
    overrides: list[str]       # the recipe's key=value overrides
    nodes: int
    node_rank: int             # this node's
    nproc_per_node: int
    main_address: str          # node 0's address
    main_port: int
    gpus_per_node: int
    preset_info: presets.PresetInfo
    config_file: Path          # the materialized accelerate config this node launches with
    workdir: Path | None       # folder holding config_file when launch made it (and removes it); None under FTDIST_LAUNCH_DIR

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nodes


class LaunchCommand(NamedTuple):
    """The `accelerate launch` command, the environment changes it needs (None = unset), and the topology."""

    cmd: list[str]
    env: dict[str, str | None]
    topology: Topology


def default_preset(gpus: int, nodes: int) -> str:
    """No GPU: one CPU process. One GPU: single GPU. N GPUs: DDP. Several nodes: multi-node DDP."""
    if nodes > 1:
        return "multinode-ddp" if gpus else "cpu-2"  # cpu-2 is DDP over gloo; use --nproc for processes per node
    return "cpu" if gpus == 0 else ("gpu" if gpus == 1 else "ddp")


def slurm_topology(env: dict) -> dict:
    """Nodes, this node's rank, main address and port from SLURM's environment (empty outside SLURM)."""
    if "SLURM_JOB_ID" not in env or "SLURM_NNODES" not in env:
        return {}
    out = {"nodes": int(env["SLURM_NNODES"]), "node_rank": int(env.get("SLURM_NODEID", "0")),
           # a port derived from the job id: two jobs sharing a node do not collide
           "main_port": 20000 + int(env["SLURM_JOB_ID"]) % 20000}
    address = main_address(env)
    if address:
        out["main_address"] = address
    gpus = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")
    if gpus and gpus.split(":")[-1].isdigit():
        out["gpus"] = int(gpus.split(":")[-1])
    return out


def main_address(env: dict) -> str | None:
    """Node 0's address in a SLURM job: MASTER_ADDR if set, else the NodeAddr of the allocation's first node
    (a node's SLURM name need not resolve as a host name; its NodeAddr does), else that node's name.
    None when there is no allocation to ask about. slurm/train.sbatch gets it from `launch --print-main-address`."""
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    if not env.get("SLURM_JOB_NODELIST"):
        return None
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                               text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return _node_addr(hosts[0]) if hosts else None


def _node_addr(node: str) -> str:
    """A node's NodeAddr, else the name itself."""
    try:
        text = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, check=True,
                              timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    m = re.search(r"\bNodeAddr=(\S+)", text)
    return m.group(1) if m else node


def parse(argv: list[str], prog: str = "./launch"):
    """The launch line's flags, words and accelerate arguments (see ftdist.launchargs)."""
    return launchargs.parse(argv, prog, description=__doc__.split("\n\n")[0])


def cpu_threads_per_process(info: presets.PresetInfo, nproc: int, env: dict, extra: list[str]) -> int | None:
    """Torch threads per process for a CPU preset, passed to accelerate explicitly.

    accelerate would pick physical cores / local processes itself (and warn that it did). ftdist counts
    only the cores this process may run on (a SLURM job or container cpuset is often a slice of the
    node; accelerate's count would oversubscribe it), capped by the physical cores. None where the
    user chose (OMP_NUM_THREADS, or --num_cpu_threads_per_process after --) or the preset is a GPU one."""
    if not info.use_cpu or env.get("OMP_NUM_THREADS") or any(a.startswith("--num_cpu_threads_per_process")
                                                             for a in extra):
        return None
    import psutil

    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    physical = psutil.cpu_count(logical=False) or allowed
    return max(1, min(allowed, physical) // max(1, nproc))


def build(args, env: dict | None = None, gpus: int | None = None) -> LaunchCommand:
    """The `accelerate launch` command for these arguments, its environment changes and the topology."""
    env = dict(os.environ if env is None else env)
    slurm = slurm_topology(env)
    words = launchargs.positionals(list(args.positionals))
    found = devices.count_gpus(env, slurm.get("gpus"), gpus)
    gpus = found.count
    nodes = args.nodes or slurm.get("nodes", 1)
    preset, recipe, overrides = words.preset or default_preset(gpus, nodes), words.recipe, words.overrides
    info = presets.describe(presets.load(preset))
    # refused (or swapped for its CPU twin, when asked) before anything is written or started
    asked = args.nproc or (info.num_processes if info.distributed_type != "NO" else None)
    choice = devices.choose(preset, info, found, asked, devices.fallback_asked(getattr(args, "cpu_fallback", False), env),
                            f"{getattr(args, 'prog', './launch')} {{preset}} {recipe}",
                            "--nproc" if args.nproc else "num_processes:")
    if choice.fell_back_from:
        print(f"launch: no CUDA GPU on this node ({found.source}); CPU fallback asked for (--cpu-fallback or "
              f"{devices.FALLBACK_ENV}): running preset {choice.preset} "
              f"instead of {choice.fell_back_from}", file=sys.stderr, flush=True)
    preset = choice.preset
    cfg = presets.load(preset)
    presets.ensure_no_conflicts(cfg)
    info = presets.describe(cfg)
    if "nodes" in slurm and args.nodes and args.nodes != slurm["nodes"]:
        raise FtdistError(f"launch: --nodes {args.nodes} does not match the SLURM allocation of {slurm['nodes']} node(s) "
                          "(SLURM_NNODES); drop --nodes or change #SBATCH --nodes")
    if info.num_machines > 1 and nodes == 1 and not args.nodes:
        raise FtdistError(f"launch: preset {preset!r} is multi-node; give --nodes N (or run it under SLURM)")
    if args.nproc:
        nproc = args.nproc
    elif info.use_cpu or info.distributed_type == "NO" or gpus == 0:
        nproc = info.num_processes or 1
    else:
        nproc = gpus
    if info.distributed_type == "NO" and nproc * nodes > 1:
        raise FtdistError(f"launch: preset {preset!r} runs one process; pick cpu-2, ddp or a DeepSpeed preset for "
                          f"{nproc * nodes} processes")
    node_rank = args.node_rank if args.node_rank is not None else slurm.get("node_rank", 0)
    if not 0 <= node_rank < nodes:
        raise FtdistError(f"launch: --node-rank {node_rank} is outside 0..{nodes - 1}")
    address = args.main_address or slurm.get("main_address") or ("127.0.0.1" if nodes == 1 else None)
    if address is None:
        raise FtdistError("launch: several nodes need --main-address (node 0's address), or run under SLURM")
    port = args.main_port or slurm.get("main_port") or 29500
    workdir = Path(env.get("FTDIST_LAUNCH_DIR") or tempfile.mkdtemp(prefix="ftdist-launch-"))
    owned = not env.get("FTDIST_LAUNCH_DIR")
    config_file = presets.materialize(preset, workdir / f"node{node_rank}")
    launch_args, launch_env = presets.launch_overrides(cfg)
    threads = cpu_threads_per_process(info, nproc, env, args.extra)
    if threads:
        launch_args += ["--num_cpu_threads_per_process", str(threads)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
           "--num_processes", str(nproc * nodes), "--num_machines", str(nodes), "--machine_rank", str(node_rank),
           "--main_process_ip", address, "--main_process_port", str(port), *launch_args, *args.extra,
           "-m", "ftdist", "train", recipe, *overrides,
           *(["--quiet"] if getattr(args, "quiet", False) else []), *(["--verbose"] if getattr(args, "verbose", False) else [])]
    add_env = dict(launch_env)
    # what launch (and accelerate, from its flags) sets in the ranks, so that `ftdist env` there tells it from the user's
    add_env[envinfo.SET_BY_FTDIST] = ",".join(sorted({*add_env, STOP_FILE_ENV, *(["OMP_NUM_THREADS"] if threads else [])}))
    topo = Topology(preset=preset, recipe=recipe, overrides=overrides, nodes=nodes, node_rank=node_rank,
                    nproc_per_node=nproc, main_address=address, main_port=port, gpus_per_node=gpus,
                    preset_info=info, config_file=config_file, workdir=workdir if owned else None)
    return LaunchCommand(cmd, add_env, topo)


def single_process(cmd: list[str], env: dict) -> tuple[list[str], dict] | None:
    """For a one-process, non-distributed config: the command and environment `accelerate launch` itself
    would run (its own argument checks and `prepare_simple_launcher_cmd_env`), to be started from here.

    Saves an interpreter start (about 3-4 s to the first step on a small CPU machine) and passes the
    trainer's exit status through: accelerate's simple launcher turns a failed run into its own
    CalledProcessError traceback and exit 1, hiding ftdist's one-line error and its exit 2. None when
    accelerate would choose another launcher (DeepSpeed, FSDP, multi-GPU, TPU, SageMaker, mpirun)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import ComputeEnvironment, prepare_simple_launcher_cmd_env

    largs, defaults, _ = _validate_launch_command(
        launch_command_parser().parse_args(cmd[cmd.index("accelerate.commands.launch") + 1:]))
    others = ("use_deepspeed", "use_fsdp", "use_megatron_lm", "multi_gpu", "tpu")
    if (any(getattr(largs, k, False) for k in others) and not largs.cpu) or largs.mpirun_hostfile or (
            defaults is not None and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER):
        return None
    saved = dict(os.environ)
    try:  # accelerate builds the child environment from os.environ: give it ours
        os.environ.clear()
        os.environ.update(env)
        return prepare_simple_launcher_cmd_env(largs)
    finally:
        os.environ.clear()
        os.environ.update(saved)


class _StopNow(Exception):
    """A second Ctrl-C before any process was started."""


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun starts each worker in a session of its own,
    so killing the launcher's child group would leave the workers running."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def main(argv: list[str] | None = None, prog: str = "./launch") -> int:
    # Handlers first: a signal during start-up must also become a clean stop, not a dead launcher.
    stop_dir = Path(tempfile.mkdtemp(prefix="ftdist-stop-"))  # unique: never a stale file from a reused pid
    stop = stop_dir / "stop"
    done = stop_dir / "stop.preempted"

    interrupts = []  # Ctrl-Cs received
    child: list[subprocess.Popen] = []

    def on_signal(signum, frame):
        if signum == signal.SIGINT:
            interrupts.append(signum)
            if len(interrupts) > 1:
                print("launch: second Ctrl-C: stopping every process now; the last complete checkpoint is kept",
                      file=sys.stderr, flush=True)
                if not child:
                    raise _StopNow
                kill_tree(child[0].pid)
                return
            print("launch: Ctrl-C: saving a checkpoint at the next step boundary, then exiting; press Ctrl-C "
                  "again to stop at once", file=sys.stderr, flush=True)
        else:
            print(f"launch: got signal {signum}; asking all ranks to checkpoint and stop", file=sys.stderr, flush=True)
        stop.touch()

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    workdir = None
    try:
        try:
            args = parse(sys.argv[1:] if argv is None else argv, prog)
        except FtdistError as e:
            print(f"launch: error: {str(e).removeprefix('launch: ')}", file=sys.stderr, flush=True)
            return e.exit_code
        if args.print_main_address:
            address = main_address(dict(os.environ))
            if not address:
                print("launch: error: --print-main-address: not in a SLURM allocation (no SLURM_JOB_NODELIST), or "
                      "`scontrol show hostnames` failed; set MASTER_ADDR", file=sys.stderr, flush=True)
                return 2
            print(address, flush=True)
            return 0
        try:
            cmd, add_env, topo = build(args)
            workdir = topo.workdir
            # The recipe is checked here, once: in the ranks every process would print the same error,
            # and torchrun would add its own failure report and traceback, ending with exit 1.
            from ftdist import config

            recipe = config.load(topo.recipe, topo.overrides)
            config.check_data_files(recipe)
            from ftdist import plan as planlib

            planlib.resolve(recipe.train, topo.world_size, topo.nodes)  # the batch split, for this world size
            from ftdist import runfolder

            # writable, not a file, not someone else's folder: before any process starts, and at the dry run,
            # which is the batch script's check that the job can run at all
            runfolder.check(Path(recipe.log.output_dir))
            if args.dry_run:
                from ftdist.console import setup_logging
                from ftdist.dryrun import print_plan

                setup_logging(quiet=False, verbose=False)
                return print_plan(topo.recipe, topo.overrides, topo)
        except FtdistError as e:
            print(f"launch: error: {str(e).removeprefix('launch: ')}", file=sys.stderr, flush=True)
            return e.exit_code
        env = dict(os.environ)
        for k, v in add_env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        env[STOP_FILE_ENV] = str(stop)
        if topo.world_size == 1 and topo.preset_info.distributed_type == "NO":
            direct = single_process(cmd, env)
            if direct:
                cmd, env = direct
        # printed with secret-looking override values redacted; the real values go to the child unprinted
        print("launch: " + " ".join(shlex.quote(redact_override(c)) for c in cmd), flush=True)
        # Own session, and SIGUSR1 ignored in torchrun's agent (its default action would kill it while
        # the workers save); the workers install their own handler. Signals reach the ranks as the stop file.
        child.append(subprocess.Popen(cmd, env=env, start_new_session=True,
                                      preexec_fn=lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)))
        rc = child[0].wait()  # a signal handled above does not end the wait (PEP 475 retries it)
        if interrupts:
            if done.exists():
                print("launch: checkpoint saved after Ctrl-C; run the same command again to resume", flush=True)
            return INTERRUPTED_EXIT
        if done.exists():
            print(f"launch: checkpoint saved on a signal; exiting {PREEMPTED_EXIT} (stopped to be resumed)", flush=True)
            return PREEMPTED_EXIT
        return rc
    except _StopNow:
        return INTERRUPTED_EXIT
    finally:
        shutil.rmtree(stop_dir, ignore_errors=True)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
