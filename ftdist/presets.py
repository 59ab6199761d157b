"""Accelerate config presets: find, load, describe and check them.

A preset is a plain YAML file that `accelerate launch --config_file FILE` accepts,
shipped in `ftdist/accelerate_configs/` (package data; the top-level
`accelerate_configs/` of a git checkout is a symlink to that folder). Its name is
the file stem: `cpu`, `cpu-2`, `gpu`, `ddp`, `zero2`, `zero3`, `zero3-offload`,
`cpu-zero2`, `cpu-zero3`, `multinode-ddp`, `multinode-zero3`.

Ownership: the recipe owns batch sizes, gradient accumulation, gradient clipping,
precision, optimizer and scheduler. Presets own the topology (processes, machines,
ZeRO stage, offload). `check_conflicts` reports any preset value that would
silently override, or be overridden by, the recipe.

`deepspeed_config_file` paths. accelerate passes the value verbatim
(ACCELERATE_DEEPSPEED_CONFIG_FILE) to the training processes, which open it
relative to *their* working directory, i.e. the cwd of `accelerate launch`. The
shipped presets use `accelerate_configs/deepspeed/<x>.json`, which works for a
plain `accelerate launch` from the root of a checkout. ftdist itself resolves a
relative path by trying, in order: the YAML's folder, the folder above it, the
current directory (see `deepspeed_json_path`); `materialize` writes a copy of the
preset whose `deepspeed_config_file` is absolute, so the launcher can run from
any folder.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ftdist import yamlio
from ftdist.errors import FtdistError, did_you_mean

PRESET_DIR: Path = Path(__file__).resolve().parent / "accelerate_configs"
"""Folder of the shipped presets (inside the package, so it also exists after `pip install .`)."""

# Keys that ftdist adds to a loaded preset; they are not accelerate config keys.
PATH_KEY = "_path"
DEEPSPEED_JSON_KEY = "deepspeed_json"
DEEPSPEED_JSON_PATH_KEY = "_deepspeed_json_path"
_FTDIST_KEYS = (PATH_KEY, DEEPSPEED_JSON_KEY, DEEPSPEED_JSON_PATH_KEY)

# DeepSpeed JSON key -> the recipe field that owns it.
RECIPE_OWNED_DS_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.per_device_batch_size",
    "gradient_clipping": "train.max_grad_norm",
}
# Missing from the JSON is as bad as concrete for these: accelerate then uses
# gradient_accumulation_steps=1 (and overrides the recipe's), DeepSpeed clips at 0 (off).
_DS_KEYS_REQUIRED_AUTO = ("gradient_accumulation_steps", "gradient_clipping")
# Keys accelerate refuses in the YAML's deepspeed_config when a deepspeed_config_file is given.
_YAML_DS_KEYS_IN_JSON = ("zero_stage", "offload_optimizer_device", "offload_param_device",
                         "offload_optimizer_nvme_path", "offload_param_nvme_path", "zero3_save_16bit_model")
# Recipe-owned keys in the YAML's deepspeed_config.
_YAML_DS_RECIPE_KEYS = {
    "gradient_accumulation_steps": "train.global_batch_size / train.per_device_batch_size",
    "gradient_clipping": "train.max_grad_norm",
}


# --------------------------------------------------------------------------- finding


def list_presets() -> list[str]:
    """Names (file stems) of the shipped presets, sorted."""
    if not PRESET_DIR.is_dir():
        return []
    return sorted(p.stem for p in PRESET_DIR.iterdir() if p.suffix == ".yaml" and p.is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A preset name (`zero3`, also `zero3.yaml`) or a path to an accelerate YAML -> its path.

    An existing file wins over a preset of the same name. Unknown names raise
    FtdistError with a did-you-mean hint and the list of presets.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    presets = list_presets()
    has_dir = os.sep in text or (os.altsep is not None and os.altsep in text)
    name = path.stem if path.suffix in (".yaml", ".yml") and not has_dir else text
    if not has_dir and name in presets:
        return PRESET_DIR / f"{name}.yaml"
    if path.exists():
        raise FtdistError(f"accelerate config {text!r} is not a file; give a YAML file or a preset name: {', '.join(presets)}")
    what = "file" if has_dir or path.suffix in (".yaml", ".yml") else "preset"
    raise FtdistError(
        f"accelerate config {what} {text!r} not found{did_you_mean(name, presets, n=3)}. "
        f"Presets (in {PRESET_DIR}): {', '.join(presets)}; or give the path of an accelerate YAML file.")


# --------------------------------------------------------------------------- loading


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FtdistError(f"accelerate config {str(path)!r} could not be read: {e}") from None
    if len(text) > 1_000_000:
        raise FtdistError(f"accelerate config {str(path)!r} is {len(text)} bytes; it should be a short YAML file (limit 1 MB)")
    try:
        raw = yamlio.load_no_alias(text)
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FtdistError(f"accelerate config {str(path)!r} is not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise FtdistError(f"accelerate config {str(path)!r} must be a YAML mapping (distributed_type: ..., num_processes: ...), "
                          f"got {type(raw).__name__}")
    if "distributed_type" not in raw:
        raise FtdistError(f"accelerate config {str(path)!r} has no `distributed_type`; accelerate requires it "
                          f"(NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, ...)")
    return raw


def _validate_with_accelerate(path: Path) -> None:
    """Run accelerate's own loader (the one `accelerate launch --config_file` uses)."""
    try:
        from accelerate.commands.config.config_args import load_config_from_file
    except ImportError:  # accelerate is a dependency; stay usable for pure inspection without it
        return
    try:
        load_config_from_file(str(path))
    except (ValueError, TypeError, KeyError) as e:
        raise FtdistError(f"accelerate rejects config {str(path)!r}: {e}") from None


def deepspeed_json_path(cfg_or_value: dict | str, yaml_path: str | os.PathLike | None = None) -> Path | None:
    """Where the preset's `deepspeed_config_file` lives, as an absolute path (None if it has none).

    A relative value is looked up in the YAML's folder, then the folder above it
    (the shipped presets say `accelerate_configs/deepspeed/x.json`, relative to the
    repo root / the package folder), then the current directory. Raises FtdistError
    if it is set but found nowhere.
    """
    if isinstance(cfg_or_value, dict):
        value = (cfg_or_value.get("deepspeed_config") or {}).get("deepspeed_config_file")
        if yaml_path is None:
            yaml_path = cfg_or_value.get(PATH_KEY)
    else:
        value = cfg_or_value
    if value in (None, "", "none"):
        return None
    raw = Path(os.path.expandvars(str(value))).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:
        candidates = []
        if yaml_path is not None:
            folder = Path(yaml_path).absolute().parent
            candidates += [folder / raw, folder.parent / raw]
        candidates.append(Path.cwd() / raw)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = f" (from {str(yaml_path)!r})" if yaml_path is not None else ""
    raise FtdistError(
        f"deepspeed_config_file {str(value)!r}{where} not found; looked at: {', '.join(str(c) for c in candidates)}. "
        f"Give an absolute path, or one relative to the YAML's folder.")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise FtdistError(f"DeepSpeed config {str(path)!r} could not be read: {e}") from None
    except json.JSONDecodeError as e:
        raise FtdistError(f"DeepSpeed config {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise FtdistError(f"DeepSpeed config {str(path)!r} must be a JSON object, got {type(data).__name__}")
    return data


def load(name_or_path: str | os.PathLike, *, validate: bool = True) -> dict:
    """Parse a preset (name or path).

    Returns the YAML as a dict plus, when it names a `deepspeed_config_file`, the
    parsed JSON under `deepspeed_json`. ftdist also adds `_path` (the YAML) and
    `_deepspeed_json_path` (absolute JSON path); `accelerate_dict` strips these three.
    With validate=True the YAML also goes through accelerate's own loader.
    """
    path = resolve(name_or_path)
    cfg = _read_yaml(path)
    if validate:
        _validate_with_accelerate(path)
    cfg[PATH_KEY] = str(path)
    js = deepspeed_json_path(cfg, path)
    if js is not None:
        cfg[DEEPSPEED_JSON_KEY] = _read_json(js)
        cfg[DEEPSPEED_JSON_PATH_KEY] = str(js)
    return cfg


def accelerate_dict(cfg: dict) -> dict:
    """The preset without the keys ftdist added (what accelerate's ClusterConfig accepts)."""
    return {k: copy.deepcopy(v) for k, v in cfg.items() if k not in _FTDIST_KEYS}


# --------------------------------------------------------------------------- describing


def _int_or_none(value: Any) -> int | None:
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 1 else None


def _offloaded(device: Any) -> bool:
    return device is not None and str(device).lower() not in ("none", "", "false")


@dataclass(frozen=True)
class PresetInfo:
    """What a preset sets up (see describe)."""

    distributed_type: str      # accelerate's: NO, MULTI_CPU, MULTI_GPU, DEEPSPEED, ...
    num_processes: int | None  # None: left to the launch (-1 / absent in a distributed preset)
    num_machines: int
    use_cpu: bool
    zero_stage: int | None     # None unless a DeepSpeed preset
    offload: bool              # parameters or optimizer state offloaded (cpu/nvme)


def describe(cfg: dict) -> PresetInfo:
    """Summary of a loaded preset."""
    dtype = str(cfg.get("distributed_type", "NO"))
    if "num_processes" in cfg:
        nproc = _int_or_none(cfg["num_processes"])
    else:
        nproc = 1 if dtype == "NO" else None
    zero_stage = None
    offload = False
    if dtype == "DEEPSPEED":
        yds = cfg.get("deepspeed_config") or {}
        js = cfg.get(DEEPSPEED_JSON_KEY)
        if isinstance(js, dict):
            zo = js.get("zero_optimization") or {}
            stage = zo.get("stage", 0)
            offload = any(_offloaded((zo.get(k) or {}).get("device")) for k in ("offload_param", "offload_optimizer"))
        else:
            stage = yds.get("zero_stage", 2)
            offload = any(_offloaded(yds.get(k)) for k in ("offload_param_device", "offload_optimizer_device"))
        zero_stage = _int_or_none(stage) if stage not in (0, "0") else 0
    return PresetInfo(distributed_type=dtype, num_processes=nproc,
                      num_machines=_int_or_none(cfg.get("num_machines", 1)) or 1,
                      use_cpu=bool(cfg.get("use_cpu", False)), zero_stage=zero_stage, offload=offload)


# --------------------------------------------------------------------------- conflicts


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def check_conflicts(cfg: dict) -> list[str]:
    """Problems with recipe-owned values set in the preset (empty list = fine).

    The recipe owns batch sizes, gradient accumulation, clipping, precision,
    optimizer and scheduler: in the DeepSpeed JSON they must be "auto" (or absent
    where DeepSpeed/accelerate derive them), and the accelerate YAML must not set
    them. Each message names the file, the key and the value.
    """
    errors: list[str] = []
    yfile = cfg.get(PATH_KEY, "<accelerate config>")
    dtype = str(cfg.get("distributed_type", "NO"))
    yds = cfg.get("deepspeed_config") or {}
    has_ds_file = dtype == "DEEPSPEED" and yds.get("deepspeed_config_file") not in (None, "", "none")

    # --- the accelerate YAML
    mp = cfg.get("mixed_precision")
    if "mixed_precision" in cfg and has_ds_file:
        errors.append(
            f"{yfile}: `mixed_precision: {mp}` -- the recipe owns precision (train.precision) and accelerate refuses "
            f"mixed_precision next to a deepspeed_config_file; remove the key (precision goes to the JSON's "
            f"fp16/bf16 `enabled: \"auto\"`).")
    elif mp is not None and str(mp).lower() != "no":
        errors.append(
            f"{yfile}: `mixed_precision: {mp}` -- the recipe owns precision (train.precision, passed to "
            f"Accelerator(mixed_precision=...), which wins over this file); remove the key or set it to 'no'.")
    for key in ("fp16", "bf16"):
        if key in cfg:
            errors.append(f"{yfile}: `{key}: {cfg[key]}` -- the recipe owns precision (train.precision); remove the key.")
    if "gradient_accumulation_steps" in cfg:
        errors.append(
            f"{yfile}: `gradient_accumulation_steps: {cfg['gradient_accumulation_steps']}` -- the recipe owns it "
            f"(derived from train.global_batch_size / train.per_device_batch_size); remove the key.")
    for key, owner in _YAML_DS_RECIPE_KEYS.items():
        if key in yds:
            errors.append(
                f"{yfile}: `deepspeed_config.{key}: {yds[key]}` -- the recipe owns it ({owner}); remove the key"
                + (" (the DeepSpeed JSON must say \"auto\")." if has_ds_file else "."))
    if has_ds_file:
        for key in _YAML_DS_KEYS_IN_JSON:
            if key in yds:
                errors.append(
                    f"{yfile}: `deepspeed_config.{key}: {yds[key]}` -- accelerate refuses it next to a "
                    f"deepspeed_config_file; remove it and set it in the DeepSpeed JSON.")

    # --- the DeepSpeed JSON
    js = cfg.get(DEEPSPEED_JSON_KEY)
    if isinstance(js, dict):
        jfile = cfg.get(DEEPSPEED_JSON_PATH_KEY) or yds.get("deepspeed_config_file") or "<DeepSpeed JSON>"
        for key, owner in RECIPE_OWNED_DS_KEYS.items():
            if key in js:
                if not _is_auto(js[key]):
                    errors.append(
                        f"{jfile}: `{key}` is {json.dumps(js[key])} -- the recipe owns it ({owner}); "
                        f"set it to \"auto\".")
            elif key in _DS_KEYS_REQUIRED_AUTO:
                errors.append(
                    f"{jfile}: `{key}` is missing -- accelerate/DeepSpeed would then use their own default instead of "
                    f"the recipe's ({owner}); set it to \"auto\".")
        for key in ("fp16", "bf16"):
            block = js.get(key)
            if block is None:
                continue
            if not isinstance(block, dict):
                errors.append(f"{jfile}: `{key}` is {json.dumps(block)} -- the recipe owns precision (train.precision); "
                              f"use {{\"enabled\": \"auto\"}}.")
            elif "enabled" in block and not _is_auto(block["enabled"]):
                errors.append(
                    f"{jfile}: `{key}.enabled` is {json.dumps(block['enabled'])} -- the recipe owns precision "
                    f"(train.precision); set it to \"auto\".")
        for key, owner in (("optimizer", "train.lr, train.weight_decay, train.adam_betas, train.adam_eps"),
                           ("scheduler", "train.scheduler, train.warmup")):
            if key in js:
                errors.append(
                    f"{jfile}: `{key}` block is set -- the recipe builds the {key} ({owner}); remove the block.")
    return errors


def ensure_no_conflicts(cfg: dict) -> None:
    """Raise FtdistError listing every conflict (see check_conflicts)."""
    errors = check_conflicts(cfg)
    if errors:
        raise FtdistError("accelerate config conflicts with the recipe:\n  - " + "\n  - ".join(errors))


# --------------------------------------------------------------------------- launching


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


_DS_FILE_LINE = re.compile(r"^(\s*deepspeed_config_file\s*:\s*).*$", re.MULTILINE)


def materialize(name_or_path: str | os.PathLike, dest_dir: str | os.PathLike) -> Path:
    """Write a launchable copy of the preset into dest_dir and return its path.

    The copy (`dest_dir/accelerate_config.yaml`, comments kept) has an absolute
    `deepspeed_config_file` pointing at a copy of the JSON
    (`dest_dir/deepspeed_config.json`), so `accelerate launch --config_file COPY`
    works from any folder and the run folder records exactly what was used.
    Files are written atomically (safe if every node of a multi-node job does it).
    """
    src = resolve(name_or_path)
    cfg = load(src)
    dest = Path(dest_dir).absolute()
    text = src.read_text(encoding="utf-8")
    js = cfg.get(DEEPSPEED_JSON_PATH_KEY)
    if js is not None:
        json_copy = dest / "deepspeed_config.json"
        _atomic_write(json_copy, Path(js).read_text(encoding="utf-8"))
        new_text, n = _DS_FILE_LINE.subn(lambda m: m.group(1) + json.dumps(str(json_copy)), text, count=1)
        if n != 1:  # e.g. flow-style mapping: fall back to re-dumping (comments are lost)
            data = accelerate_dict(cfg)
            data["deepspeed_config"]["deepspeed_config_file"] = str(json_copy)
            new_text = f"# materialized from {src} by ftdist\n" + yaml.safe_dump(data, sort_keys=False)
        text = new_text
    out = dest / "accelerate_config.yaml"
    _atomic_write(out, f"# materialized by ftdist from {src}; deepspeed_config_file (if any) made absolute\n" + text)
    return out


def launch_overrides(cfg: dict) -> tuple[list[str], dict[str, str | None]]:
    """Extra `accelerate launch` flags and environment a preset needs (env value None = unset it).

    - MULTI_CPU: accelerate's launcher starts ONE process for MULTI_CPU (it expects
      mpirun); `--multi_gpu` makes it start num_processes local processes via
      torchrun, and ACCELERATE_USE_CPU=true makes Accelerator pick MULTI_CPU/gloo.
    - DeepSpeed on CPU (use_cpu: true): DS_ACCELERATOR=cpu, and ACCELERATE_USE_CPU
      must be unset -- with it, accelerate silently drops DeepSpeed (plain MULTI_CPU DDP).
    """
    d = describe(cfg)
    args: list[str] = []
    env: dict[str, str | None] = {}
    if d.distributed_type == "MULTI_CPU":
        args.append("--multi_gpu")
        env["ACCELERATE_USE_CPU"] = "true"
    elif d.distributed_type == "DEEPSPEED" and d.use_cpu:
        env["DS_ACCELERATOR"] = "cpu"
        env["ACCELERATE_USE_CPU"] = None
    return args, env
