"""What a user sees from `./launch`, `ftdist launch`, `ftdist env` and model-path mistakes (issue 20, items 1, 2,
4, 5, 7): a GPU preset on a machine without GPUs is refused with the CPU preset to use, preset typos get their
own hint, arguments come in any unambiguous order, and every message is one paragraph without a traceback.
Cheap by design: argument parsing, launch builds and dry runs that fail before any process starts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from helpers import REPO, base_env

from ftdist import launcher
from ftdist.config import ModelConfig
from ftdist.errors import FtdistError

README = (REPO / "README.md").read_text()
NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}  # torch sees no GPU, whatever the machine has


def build(argv, env=None, gpus=0):
    env = {"PATH": os.environ["PATH"], **(env or {})}
    cmd, add_env, topo = launcher.build(launcher.parse(argv), env=env, gpus=gpus)
    shutil.rmtree(topo.workdir, ignore_errors=True)  # the materialized preset copy
    return cmd, add_env, topo


def launch(*argv, env=None, cwd=None, timeout=240):
    return subprocess.run([sys.executable, str(REPO / "launch"), *argv], env=base_env({**NO_GPU, **(env or {})}),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def one_paragraph_error(p, prefix="launch: error: "):
    """Exit 2, nothing on stdout, one line on stderr (no traceback, no usage dump)."""
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    assert p.stderr.startswith(prefix) and p.stderr.count("\n") == 1, p.stderr
    return p.stderr.strip()


# ------------------------------------------------------------------ 1. GPU presets without GPUs

@pytest.mark.parametrize("preset,cpu", [("gpu", "cpu"), ("ddp", "cpu-2"), ("zero2", "cpu-zero2"), ("zero3", "cpu-zero3"),
                                        ("zero3-offload", "cpu-zero3")])
def test_gpu_preset_without_gpus_is_refused_with_the_cpu_preset_to_use(preset, cpu):
    with pytest.raises(FtdistError) as e:
        build([preset, "tiny"], gpus=0)
    msg = str(e.value)
    assert f"preset {preset!r} needs CUDA GPUs" in msg and "0 CUDA GPUs" in msg, msg
    assert f"use preset {cpu} instead (./launch {cpu} tiny)" in msg and "--cpu-fallback" in msg, msg
    assert "\n" not in msg


def test_fewer_gpus_than_asked_is_refused():
    with pytest.raises(FtdistError, match=r"asks for 4 GPU processes per node \(--nproc 4\).*found 2 CUDA GPUs.*--nproc 2"):
        build(["ddp", "tiny", "--nproc", "4"], gpus=2)
    _, _, topo = build(["ddp", "tiny", "--nproc", "2"], gpus=2)
    assert topo.world_size == 2 and topo.preset == "ddp"


def test_a_gpu_config_file_is_checked_like_a_preset(tmp_path):
    """A user's accelerate config: its num_processes is what it asks for; without GPUs the suggested CPU preset
    follows its backend."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 4\nnum_machines: 1\n")
    with pytest.raises(FtdistError, match=r"asks for 4 GPU processes per node \(num_processes: 4\).*found 2 CUDA GPUs"):
        build([str(cfg), "tiny"], gpus=2)
    with pytest.raises(FtdistError, match=r"preset 'mine.yaml' needs CUDA GPUs.*use preset cpu-2 instead"):
        build([str(cfg), "tiny"], gpus=0)


@pytest.mark.parametrize("how", [["--cpu-fallback"], ["FTDIST_CPU_FALLBACK=1"]])
def test_cpu_fallback_only_when_asked(how):
    flags = [h for h in how if h.startswith("--")]
    env = dict(h.split("=") for h in how if not h.startswith("--"))
    _, add_env, topo = build(["zero3", "tiny", *flags], env=env, gpus=0)
    assert topo.preset == "cpu-zero3" and topo.preset_info.use_cpu and topo.world_size == 2
    assert add_env["DS_ACCELERATOR"] == "cpu"
    # with GPUs the flag changes nothing
    _, _, topo = build(["zero3", "tiny", *flags], env=env, gpus=2)
    assert topo.preset == "zero3" and topo.world_size == 2


def test_multinode_preset_on_cpu_slurm_nodes_fails_unless_fallback_is_asked():
    slurm = {"SLURM_JOB_ID": "5", "SLURM_NNODES": "2", "SLURM_NODEID": "0", "MASTER_ADDR": "10.0.0.1"}
    with pytest.raises(FtdistError, match=r"preset 'multinode-ddp' needs CUDA GPUs.*0 CUDA GPUs.*use preset cpu-2"):
        build(["multinode-ddp", "tiny", "--nproc", "1"], env=slurm, gpus=0)
    with pytest.raises(FtdistError, match=r"SLURM_GPUS_ON_NODE=0"):
        build(["multinode-zero3", "tiny", "--nproc", "1"], env={**slurm, "SLURM_GPUS_ON_NODE": "0"}, gpus=4)
    _, _, topo = build(["multinode-ddp", "tiny", "--nproc", "1"], env={**slurm, "FTDIST_CPU_FALLBACK": "1"}, gpus=0)
    assert (topo.preset, topo.nodes, topo.world_size) == ("cpu-2", 2, 2)


@pytest.mark.timeout(300)
def test_ddp_dry_run_without_gpus_is_one_paragraph_and_exit_2(tmp_path):
    p = launch("ddp", "tiny", "--dry-run", f"log.output_dir={tmp_path}/run", cwd=tmp_path)
    msg = one_paragraph_error(p)
    assert "preset 'ddp' needs CUDA GPUs" in msg and "cpu-2" in msg, msg
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
def test_batch_script_dry_run_refuses_a_multinode_preset_on_cpu_nodes(tmp_path):
    """slurm/train.sbatch on CPU-only nodes with FTDIST_PRESET=multinode-ddp: the dry run on node 0 fails with
    launch's message and nothing is started (srun never runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "scontrol", "nvidia-smi"):
        (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} >> {tmp_path}/called\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    env = base_env({**NO_GPU, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "12", "SLURM_NNODES": "2",
                    "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "0", "MASTER_ADDR": "127.0.0.1",
                    "FTDIST_HOME": str(REPO), "FTDIST_PYTHON": sys.executable, "FTDIST_PRESET": "multinode-ddp"})
    for k in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "FTDIST_CPU_FALLBACK"):
        env.pop(k, None)
    p = subprocess.run(["bash", str(REPO / "slurm" / "train.sbatch"), "tiny", f"log.output_dir={tmp_path}/run"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "launch: error: preset 'multinode-ddp' needs CUDA GPUs" in p.stderr, p.stderr
    assert "dry run failed (exit 2)" in p.stdout and "nothing was trained" in p.stdout, p.stdout
    called = (tmp_path / "called").read_text() if (tmp_path / "called").exists() else ""
    assert "srun" not in called


# ------------------------------------------------------------------ 2. preset hints and argument order

@pytest.mark.parametrize("argv", [["zer03", "demo"], ["zer03"], ["zer03", "demo", "train.lr=1e-4"]])
def test_misspelt_preset_gets_a_preset_hint_not_a_recipe_error(argv):
    with pytest.raises(FtdistError) as e:
        build(argv)
    msg = str(e.value)
    assert msg.startswith("unknown preset 'zer03'; did you mean zero3?"), msg
    assert "recipe" not in msg.split(";")[0] and "cpu-zero3" in msg  # the preset list follows


def test_unknown_word_that_is_no_preset_nor_recipe_names_both():
    with pytest.raises(FtdistError, match=r"'qqq' is neither a preset"):
        build(["qqq", "demo"])


@pytest.mark.parametrize("argv", [
    ["cpu", "tiny", "--dry-run", "train.lr=1e-4"],
    ["--dry-run", "cpu", "tiny", "train.lr=1e-4"],
    ["cpu", "train.lr=1e-4", "tiny", "--dry-run"],
    ["tiny", "cpu", "train.lr=1e-4", "--dry-run"],
    ["cpu", "tiny", "--", "--monitor_interval", "1", "train.lr=1e-4", "--dry-run"],
    ["cpu", "tiny", "--", "train.lr=1e-4", "--dry-run", "--monitor_interval", "1"],
])
def test_flags_overrides_and_accelerate_args_in_any_unambiguous_order(argv):
    args = launcher.parse(argv)
    assert args.dry_run
    _, _, topo = build(argv)
    assert (topo.preset, topo.recipe, topo.overrides) == ("cpu", "tiny", ["train.lr=1e-4"])
    if "--" in argv:
        assert args.extra == ["--monitor_interval", "1"]


def test_accelerate_flags_stay_with_accelerate_and_unknown_ones_are_named():
    args = launcher.parse(["cpu", "tiny", "--", "--quiet", "--gpu_ids", "0,1", "--nproc", "2"])
    assert args.extra == ["--quiet", "--gpu_ids", "0,1"] and args.nproc == 2 and not args.quiet
    with pytest.raises(FtdistError, match=r"'--bogus' after `--` is neither an `accelerate launch` option nor a launch flag"):
        launcher.parse(["cpu", "tiny", "--", "--bogus"])


@pytest.mark.timeout(300)
def test_override_after_dry_run_is_accepted_end_to_end(tmp_path):
    p = launch("cpu", "tiny", "--dry-run", "train.lr=1e-4", f"log.output_dir={tmp_path}/run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "node 0: ./launch cpu tiny train.lr=1e-4" in p.stdout, p.stdout[-2000:]


def test_misspelt_flag_is_named_with_a_hint():
    with pytest.raises(FtdistError, match=r"unknown flag '--dryrun' \(did you mean '--dry-run'\?\)"):
        launcher.parse(["cpu", "tiny", "--dryrun"])


# ------------------------------------------------------------------ 4. ftdist env: who set what

def test_env_separates_what_the_user_set_from_what_ftdist_sets(monkeypatch):
    from ftdist import envinfo

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("FTDIST_SET_ENV", raising=False)
    monkeypatch.setenv("HF_HOME", "/data/hf")
    info = envinfo.collect()
    assert "DS_ACCELERATOR" not in os.environ  # probing DeepSpeed's ops leaves the environment as it was
    assert info["env"] == {k: v for k, v in info["env"].items() if k != "DS_ACCELERATOR"}
    assert info["env"]["HF_HOME"] == "/data/hf"
    assert "DS_ACCELERATOR" in info["set_by_ftdist"]
    text = envinfo.render(info)
    assert re.search(r"^environment you set: .*HF_HOME=/data/hf", text, re.M), text
    assert re.search(r"^set by ftdist: .*DS_ACCELERATOR", text, re.M), text
    assert "DS_ACCELERATOR" not in text.split("environment you set:")[1].split("\n")[0]


def test_variables_launch_sets_are_marked_for_its_processes(monkeypatch):
    """A rank's environment says which variables launch put there, so `ftdist env` there tells them apart."""
    from ftdist import envinfo

    _, add_env, _ = build(["cpu-zero2", "tiny"])
    marked = set(add_env["FTDIST_SET_ENV"].split(","))
    assert {"DS_ACCELERATOR", "FTDIST_STOP_FILE"} <= marked
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("FTDIST_SET_ENV", add_env["FTDIST_SET_ENV"])
    info = envinfo.collect()
    assert "DS_ACCELERATOR" not in info["env"] and info["set_by_ftdist"]["DS_ACCELERATOR"].startswith("cpu")


# ------------------------------------------------------------------ 5. model paths

def resolve(name, init="pretrained"):
    from ftdist import model as modellib

    with pytest.raises(FtdistError) as e:
        modellib.resolve_path(ModelConfig(name_or_path=name, init=init))
    return str(e.value)


def test_local_folder_without_config_is_a_broken_folder_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "model.safetensors").write_bytes(b"")
    msg = resolve("mymodel")
    assert "'mymodel' is a local folder but not a model folder: it has no config.json" in msg, msg
    assert "model.safetensors" in msg and "network" not in msg and "hub" not in msg, msg


def test_local_folder_without_weights_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "m").mkdir(parents=True)
    (tmp_path / "org" / "m" / "config.json").write_text("{}")
    msg = resolve("org/m")  # one slash, but the folder exists: local
    assert "'org/m' is a local folder with config.json but no weights" in msg, msg
    assert "model.safetensors" in msg and "model.init=random" in msg and "network" not in msg, msg
    from ftdist import model as modellib

    assert modellib.resolve_path(ModelConfig(name_or_path="org/m", init="random")).endswith("org/m")


def test_missing_local_path_keeps_its_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = resolve("./no-such-model")
    assert "model.name_or_path: './no-such-model' is not a model folder (no config.json there)" in msg, msg
    assert "does not exist" in msg and "network" not in msg


def test_hub_id_offline_says_network_and_suggests_dot_slash_for_a_folder(tmp_path, monkeypatch):
    import transformers

    from ftdist import model as modellib

    monkeypatch.chdir(tmp_path)

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(FtdistError) as e:
        modellib.load_config(ModelConfig(name_or_path="some-org/some-model"))
    msg = str(e.value)
    assert msg.startswith("model.name_or_path: could not load 'some-org/some-model'") and "needs network access" in msg
    assert "write './some-org/some-model'" in msg, msg
    with pytest.raises(FtdistError) as e:  # a folder that exists and fails to load: about the folder, not the network
        (tmp_path / "local").mkdir()
        (tmp_path / "local" / "config.json").write_text("{}")
        (tmp_path / "local" / "model.safetensors").write_bytes(b"")
        modellib.load_config(ModelConfig(name_or_path="./local"))
    assert "local folder" in str(e.value) and "network" not in str(e.value), str(e.value)


def test_custom_code_error_names_the_recipe_key(tmp_path):
    from ftdist import model as modellib

    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(
        '{"model_type": "custom-x", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}')
    (tmp_path / "custom" / "model.safetensors").write_bytes(b"")
    with pytest.raises(FtdistError) as e:
        modellib.load_config(ModelConfig(name_or_path=str(tmp_path / "custom")))
    msg = str(e.value)
    assert "model.trust_remote_code=true" in msg and "own code" in msg and "network" not in msg, msg


# ------------------------------------------------------------------ 7. the console command

@pytest.mark.timeout(120)
def test_ftdist_launch_is_the_same_command(tmp_path):
    p = subprocess.run([sys.executable, "-m", "ftdist", "launch", "zer03", "tiny"], env=base_env(NO_GPU), cwd=tmp_path,
                       capture_output=True, text=True, timeout=100)
    assert one_paragraph_error(p).startswith("launch: error: unknown preset 'zer03'; did you mean zero3?")
    p = subprocess.run([sys.executable, "-m", "ftdist", "launch", "--help"], env=base_env(NO_GPU), cwd=tmp_path,
                       capture_output=True, text=True, timeout=100)
    assert p.returncode == 0 and p.stdout.startswith("usage: ftdist launch") and "--cpu-fallback" in p.stdout
    from ftdist import cli

    assert "launch" in cli.build_parser().format_help()
    text = (REPO / "pyproject.toml").read_text()
    assert 'ftdist = "ftdist.cli:main"' in text


# ------------------------------------------------------------------ README

def test_readme_troubleshooting_quotes_the_real_messages():
    """The section's messages are the ones the code prints (checked on a few that need no process)."""
    section = README.split("## Troubleshooting", 1)[1].split("\n## ", 1)[0]
    with pytest.raises(FtdistError) as e:
        build(["zer03", "demo"])
    assert str(e.value).split(".")[0] in section
    with pytest.raises(FtdistError) as e:
        build(["ddp", "demo"], gpus=0)
    assert str(e.value).split(" (")[0] in section
    for needle in ("--cpu-fallback", "FTDIST_CPU_FALLBACK", "model.trust_remote_code=true", "./", "ftdist launch",
                   "ftdist env"):
        assert needle in section, needle
    assert "pip install torch==2.13.0 && pip install -e . && ./launch" in README and "bash .ci/run" in README
