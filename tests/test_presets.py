"""Accelerate config presets: accelerate accepts them, ftdist describes and checks them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftdist import presets
from ftdist.errors import FtdistError

REPO = Path(__file__).resolve().parent.parent

# name -> (distributed_type, num_processes, num_machines, use_cpu, zero_stage, offload)
EXPECTED = {
    "cpu": ("NO", 1, 1, True, None, False),
    "cpu-2": ("MULTI_GPU", 2, 1, True, None, False),
    "gpu": ("NO", 1, 1, False, None, False),
    "ddp": ("MULTI_GPU", None, 1, False, None, False),
    "zero2": ("DEEPSPEED", None, 1, False, 2, False),
    "zero3": ("DEEPSPEED", None, 1, False, 3, False),
    "zero3-offload": ("DEEPSPEED", None, 1, False, 3, True),
    "cpu-zero2": ("DEEPSPEED", 2, 1, True, 2, False),
    "cpu-zero3": ("DEEPSPEED", 2, 1, True, 3, False),
    "multinode-ddp": ("MULTI_GPU", None, 2, False, None, False),
    "multinode-zero3": ("DEEPSPEED", None, 2, False, 3, False),
}
DS_JSONS = ("zero2.json", "zero3.json", "zero3_offload.json")
RECIPE_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


def test_shipped_presets_are_the_expected_set():
    assert presets.PRESET_DIR.is_dir()
    assert presets.list_presets() == sorted(EXPECTED)
    top = REPO / "accelerate_configs"
    if top.exists():  # a git checkout: the top-level folder is the same files (symlink)
        assert top.resolve() == presets.PRESET_DIR.resolve()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_parses_with_accelerate_and_ftdist(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    path = presets.resolve(name)
    assert path == presets.PRESET_DIR / f"{name}.yaml"
    text = path.read_text(encoding="utf-8")
    assert text.startswith(f"# ftdist preset `{name}`"), "every preset starts with a comment header saying what it is for"

    acc = load_config_from_file(str(path))
    assert isinstance(acc, ClusterConfig)
    assert acc.mixed_precision is None, "precision is owned by the recipe: no mixed_precision in presets"

    cfg = presets.load(name)
    assert cfg["_path"] == str(path)
    assert str(acc.distributed_type.value) == cfg["distributed_type"]
    dtype, nproc, nmach, cpu, stage, offload = EXPECTED[name]
    assert presets.describe(cfg) == presets.PresetInfo(
        distributed_type=dtype, num_processes=nproc, num_machines=nmach, use_cpu=cpu, zero_stage=stage,
        offload=offload)
    assert acc.num_processes == (nproc if nproc is not None else -1)
    assert presets.check_conflicts(cfg) == []
    if dtype == "DEEPSPEED":
        assert isinstance(cfg["deepspeed_json"], dict)
        assert Path(cfg["_deepspeed_json_path"]).is_absolute()
        assert cfg["deepspeed_json"]["zero_optimization"]["stage"] == stage
        # the JSON is found relative to the repo root (plain `accelerate launch` from a checkout)
        rel = acc.deepspeed_config["deepspeed_config_file"]
        assert (presets.PRESET_DIR.parent / rel).resolve() == Path(cfg["_deepspeed_json_path"])
    else:
        assert "deepspeed_json" not in cfg
    if nmach > 1:
        for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
            assert flag in text, f"{name}: the header documents the launch flag {flag}"


@pytest.mark.parametrize("fname", DS_JSONS)
def test_deepspeed_json_leaves_recipe_values_auto(fname):
    data = json.loads((presets.PRESET_DIR / "deepspeed" / fname).read_text(encoding="utf-8"))
    for key in RECIPE_OWNED:
        assert data[key] == "auto", key
    assert data["fp16"]["enabled"] == "auto" and data["bf16"]["enabled"] == "auto"
    assert "optimizer" not in data and "scheduler" not in data
    zo = data["zero_optimization"]
    if zo["stage"] == 3:
        assert zo["stage3_gather_16bit_weights_on_model_save"] is True
    if fname == "zero3_offload.json":
        assert zo["offload_param"]["device"] == "cpu" and zo["offload_optimizer"]["device"] == "cpu"


def _copy_preset(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """Copy a DeepSpeed preset and its JSON into tmp_path; the copy points at the copied JSON."""
    cfg = presets.load(name)
    js = tmp_path / "ds.json"
    shutil.copy(cfg["_deepspeed_json_path"], js)
    raw = yaml.safe_load(presets.resolve(name).read_text(encoding="utf-8"))
    raw["deepspeed_config"]["deepspeed_config_file"] = "ds.json"  # relative to the YAML's folder
    y = tmp_path / f"my-{name}.yaml"
    y.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return y, js


def test_concrete_gradient_accumulation_in_json_is_a_conflict(tmp_path):
    y, js = _copy_preset(tmp_path, "zero2")
    data = json.loads(js.read_text())
    data["gradient_accumulation_steps"] = 4
    js.write_text(json.dumps(data))
    cfg = presets.load(y)
    errors = presets.check_conflicts(cfg)
    assert len(errors) == 1, errors
    msg = errors[0]
    assert "gradient_accumulation_steps" in msg and "4" in msg and str(js) in msg
    assert "recipe owns" in msg and '"auto"' in msg
    with pytest.raises(FtdistError, match="gradient_accumulation_steps"):
        presets.ensure_no_conflicts(cfg)


def test_other_recipe_owned_values_are_conflicts(tmp_path):
    y, js = _copy_preset(tmp_path, "zero3")
    data = json.loads(js.read_text())
    data["bf16"]["enabled"] = True
    data["train_micro_batch_size_per_gpu"] = 16
    del data["gradient_clipping"]
    data["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    js.write_text(json.dumps(data))
    raw = yaml.safe_load(y.read_text())
    raw["mixed_precision"] = "no"  # accelerate refuses it next to a deepspeed_config_file
    raw["deepspeed_config"]["gradient_clipping"] = 1.0
    raw["deepspeed_config"]["zero_stage"] = 3
    y.write_text(yaml.safe_dump(raw))
    errors = "\n".join(presets.check_conflicts(presets.load(y, validate=False)))
    for needle in ("bf16.enabled", "train_micro_batch_size_per_gpu", "`gradient_clipping` is missing", "`optimizer` block",
                   "mixed_precision", "deepspeed_config.gradient_clipping", "deepspeed_config.zero_stage"):
        assert needle in errors, needle
    assert str(y) in errors and str(js) in errors


def test_mixed_precision_in_a_non_deepspeed_preset(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("distributed_type: 'NO'\nuse_cpu: true\nmixed_precision: 'no'\n")
    assert presets.check_conflicts(presets.load(y)) == []  # 'no' is what `accelerate config` writes: harmless
    y.write_text("distributed_type: 'NO'\nuse_cpu: true\nmixed_precision: bf16\n")
    (msg,) = presets.check_conflicts(presets.load(y))
    assert "mixed_precision: bf16" in msg and "train.precision" in msg


def test_unknown_preset_has_did_you_mean():
    with pytest.raises(FtdistError) as e:
        presets.resolve("zero3_offload")
    assert "did you mean 'zero3-offload'" in str(e.value)
    assert "cpu-2" in str(e.value)  # lists the presets
    with pytest.raises(FtdistError, match="did you mean 'ddp'"):
        presets.load("dpp")
    with pytest.raises(FtdistError, match="not found"):
        presets.resolve(str(Path("nowhere") / "x.yaml"))
    assert presets.resolve("zero2.yaml") == presets.PRESET_DIR / "zero2.yaml"


def test_invalid_files_are_ftdist_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: 'NO'\nnum_procs: 2\n")  # unknown key: accelerate refuses it
    with pytest.raises(FtdistError, match="num_procs"):
        presets.load(bad)
    bad.write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: missing.json\n")
    with pytest.raises(FtdistError, match="missing.json"):
        presets.load(bad)
    bad.write_text("num_processes: 2\n")
    with pytest.raises(FtdistError, match="distributed_type"):
        presets.load(bad)


def test_materialize_makes_deepspeed_path_absolute(tmp_path, monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    out = presets.materialize("zero3-offload", tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # any cwd works now
    acc = load_config_from_file(str(out))
    ds_file = Path(acc.deepspeed_config["deepspeed_config_file"])
    assert ds_file.is_absolute() and ds_file.is_file() and ds_file.parent == out.parent
    cfg = presets.load(out)
    assert cfg["deepspeed_json"] == presets.load("zero3-offload")["deepspeed_json"]
    assert presets.describe(cfg).offload is True and presets.check_conflicts(cfg) == []
    assert out.read_text().count("# ftdist preset `zero3-offload`") == 1  # comments kept
    plain = presets.materialize("cpu", tmp_path / "run2")
    assert presets.describe(presets.load(plain)) == presets.describe(presets.load("cpu"))


def test_launch_overrides():
    assert presets.launch_overrides(presets.load("cpu")) == ([], {})
    assert presets.launch_overrides(presets.load("cpu-2")) == ([], {})  # MULTI_GPU + use_cpu needs nothing extra
    assert presets.launch_overrides(presets.load("cpu-zero3")) == ([], {"DS_ACCELERATOR": "cpu", "ACCELERATE_USE_CPU": None})
    assert presets.launch_overrides(presets.load("zero3")) == ([], {})


def test_accelerate_launch_accepts_cpu_preset(tmp_path):
    script = tmp_path / "world.py"
    script.write_text(
        "from accelerate import PartialState\n"
        "s = PartialState()\n"
        "print(f'WORLD_SIZE={s.num_processes} TYPE={s.distributed_type.value} DEVICE={s.device.type}', flush=True)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["HF_HOME"] = str(tmp_path / "hf")  # no default accelerate config of the user interferes
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(presets.resolve("cpu")), str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "WORLD_SIZE=1 TYPE=NO DEVICE=cpu" in proc.stdout, proc.stdout + proc.stderr[-2000:]
