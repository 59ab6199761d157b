"""Run folders: ftdist writes only into a folder it created, and never mixes two runs in one.

A run folder is marked by `ftdist-run.json`, written before anything else. A folder that exists and holds
other files without that marker (or, from before the marker, without recipe.yaml and plan.json) is not
ftdist's: a run is refused there unless it is empty. Inside its own folder a run either resumes (the
checkpoint's recipe must match, see `recipe_changes`) or, when there is no checkpoint to resume from,
starts over and drops the metrics rows of the run it replaces.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from pathlib import Path

import yaml

from ftdist.errors import FtdistError, did_you_mean
from ftdist.recipe import Recipe

MARKER = "ftdist-run.json"

# Keys that do not change the trained model: logging, evaluation, checkpoint cadence, timeouts, checks.
ALWAYS_ALLOWED = ("log.", "eval.", "checkpoint.every_steps",
                  "checkpoint.keep_last", "checkpoint.resume", "checkpoint.export", "checkpoint.allow_changes",
                  "train.check_sync", "train.timeout_s", "data.num_proc",
                  "data.loader_workers", "train.per_device_batch_size")

# Keys a checkpoint cannot continue under, even when allowed, and why.
FIXED = {
    "train.global_batch_size": "the checkpoint's data position (epoch, step) and LR schedule count global batches of "
                               "the old size; a resume under another one would see other examples",
    "model.name_or_path": "the checkpoint holds the weights of another model",
    "model.config_overrides": "the checkpoint holds the weights of another model",
}


def is_run_folder(path: Path) -> bool:
    return (path / MARKER).is_file() or ((path / "recipe.yaml").is_file() and (path / "plan.json").is_file())


def check(path: Path) -> None:
    """Refuse an output folder that is a file, not writable, or someone else's non-empty folder."""
    if path.exists() and not path.is_dir():
        raise FtdistError(f"log.output_dir: {str(path)!r} is a file, not a folder; give a new folder for the run")
    if path.is_dir() and not is_run_folder(path):
        entries = sorted(p.name for p in path.iterdir())
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise FtdistError(f"log.output_dir: {str(path)!r} already exists and is not an ftdist run folder (it holds "
                              f"{shown}). ftdist never writes into a folder it did not create, so that nothing in it "
                              "is overwritten or deleted; give a new or empty folder")
    probe = path if path.is_dir() else next((p for p in path.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FtdistError(f"log.output_dir: cannot create or write {str(path)!r} ({str(probe)!r} is not writable); "
                          "give a folder you can write to")


def claim(path: Path) -> None:
    """Create the folder and its marker (main process, before anything else is written)."""
    path.mkdir(parents=True, exist_ok=True)
    marker = path / MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"created_by": "ftdist"}) + "\n")


def finished(path: Path) -> bool:
    return (path / "final_metrics.json").is_file()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "config_overrides":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_changes(saved_yaml: str, current_yaml: str, allowed: list[str]) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, current value) for every key that differs and is not allowed."""
    old, new = _flat(yaml.safe_load(saved_yaml) or {}), _flat(yaml.safe_load(current_yaml) or {})
    ok = (*ALWAYS_ALLOWED, *(a for a in allowed if a not in FIXED))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and not any(k == a or (a.endswith(".") and k.startswith(a)) for a in ok)]


def refuse_changes(checkpoint: Path, changes: list[tuple[str, object, object]]) -> None:
    fixed = [(k, old, new) for k, old, new in changes if k in FIXED]
    if fixed:
        k, old, new = fixed[0]
        raise FtdistError(f"checkpoint.resume: {str(checkpoint)!r} was trained with {k}={old!r} and this recipe has "
                          f"{new!r}: {FIXED[k]}. A run cannot continue across that change (not even with "
                          f"checkpoint.allow_changes); set {k} back to {old!r}, or start a new run in a new "
                          "log.output_dir")
    shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)
    keys = ",".join(k for k, _, _ in changes)
    raise FtdistError(f"checkpoint.resume: the run folder's checkpoint {str(checkpoint)!r} was trained with another "
                      f"recipe ({shown}). Resuming would mix the two and the run's record would be false. To continue "
                      f"with the new values from this step on, allow them: checkpoint.allow_changes=[{keys}]; to start "
                      "over, give a new log.output_dir")



def check_allowed(allowed: list) -> None:
    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(Recipe)
            for f in dataclasses.fields(typing.get_type_hints(Recipe)[section.name])]
    for a in allowed:
        if str(a) not in keys:
            raise FtdistError(f"checkpoint.allow_changes: {str(a)!r} is not a recipe key{did_you_mean(a, keys)}; "
                              "list keys like train.max_steps or train.lr")
