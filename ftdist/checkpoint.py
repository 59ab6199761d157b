"""Atomic checkpoints, finding the latest complete one, and the final export.

Layout of a run folder:
    checkpoints/step-00000100/      accelerate save_state (model, optimizer, RNG per rank; DeepSpeed shards)
                       ftdist_state.json   our resumable state: step, epoch position, unfreeze stage...
                       recipe.yaml
                       COMPLETE            written last: only folders with it are ever resumed from
    checkpoints/.tmp-step-00000100/  a save in progress (ignored, removed at the next save)
    checkpoints/.old-step-00000100/  the previous copy of a step saved twice, being deleted (ignored)

Every rank calls save (DeepSpeed's save_checkpoint hangs if only rank 0 does: DeepSpeed #2993).
All ranks write into the temporary folder on the shared filesystem; after a barrier, the main
process writes COMPLETE and renames the folder. A SIGKILL at any point leaves either the
previous checkpoints untouched or a `.tmp-` folder that resume never picks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ftdist import faults
from ftdist.errors import CheckpointError

STATE_FILE = "ftdist_state.json"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"^step-(\d+)$")


def ckpt_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def latest(output_dir: str) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1] if done else None


def save(accelerator, output_dir: str, step: int, state: dict, recipe_yaml: str, keep_last: int,
         extra=None) -> Path:
    """Save on every rank into a temp folder, then publish it atomically and rotate old ones. `extra(folder)`,
    called on every rank after accelerate's files, adds files of the same checkpoint (before COMPLETE)."""
    root = ckpt_root(output_dir)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of a save killed earlier
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if extra is not None:
        extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        faults.maybe_kill_in_save(step)  # tests: a SIGKILL mid-save must leave no resumable checkpoint
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        _fsync_dir(tmp)
        (tmp / COMPLETE).write_text(str(step))
        if final.exists():
            # Same step saved again (e.g. at the end of training, right after a periodic save). Deleting the
            # old copy first would leave, for as long as rmtree takes, no complete checkpoint of this step
            # (and with keep_last=1 none at all): swap with two renames, then delete the old copy.
            old = root / f".old-{final.name}"
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        _rotate(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _rotate(output_dir: str, keep_last: int) -> None:
    done = complete_checkpoints(output_dir)
    # keep_last >= 1 is enforced by the recipe, so the newest complete checkpoint is never deleted
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for pattern in (".tmp-step-*", ".old-step-*"):
        for debris in ckpt_root(output_dir).glob(pattern):
            shutil.rmtree(debris, ignore_errors=True)


def resolve_resume(output_dir: str, resume: str | None) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        return latest(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint.resume: {resume!r} is not a folder; give a checkpoint folder "
                              f"(e.g. {output_dir}/checkpoints/step-00000100), 'latest', or null")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint.resume: {resume!r} is incomplete (no {COMPLETE} marker: its save was "
                              "interrupted); pick an older checkpoint or 'latest'")
    return path


def _older_hint(path: Path) -> str:
    """How to recover from a damaged checkpoint: name the newest complete one before it, if any."""
    m = _NAME.match(path.name)
    older = []
    if m and path.parent.name == "checkpoints":
        older = [c for c in complete_checkpoints(str(path.parent.parent)) if int(_NAME.match(c.name).group(1)) < int(m.group(1))]
    target = str(older[-1]) if older else "<an older checkpoint folder>"
    return f"Resume from an older checkpoint with checkpoint.resume={target}"


def read_state(path: Path) -> dict:
    f = path / STATE_FILE
    try:
        state = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"checkpoint {str(f)!r} is unreadable or corrupt ({type(e).__name__}: {e}). "
                              f"{_older_hint(path)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(f)!r} is corrupt (a JSON {type(state).__name__}, not an object). "
                              f"{_older_hint(path)}")
    for key in ("step", "epoch", "step_in_epoch", "stage"):
        if not isinstance(state.get(key), int) or isinstance(state.get(key), bool):
            raise CheckpointError(f"checkpoint {str(f)!r} lacks an integer {key!r}; it was not written by this "
                                  f"version of ftdist or is damaged. {_older_hint(path)}")
    return state


def _damaged_file(path: Path) -> tuple[Path, Exception] | None:
    """The first top-level file of a checkpoint that does not load on its own (to name it in an error)."""
    from accelerate.utils import load as torch_load  # torch.load with weights_only=True
    from safetensors import safe_open

    for f in sorted(p for p in path.iterdir() if p.is_file()):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    for k in h.keys():
                        h.get_tensor(k)
            elif f.suffix in (".bin", ".pkl", ".pt"):
                torch_load(f, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - any failure names the file
            return f, e
    return None


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# torch's weights_only loader names the object it refused: "GLOBAL builtins.eval was not an allowed global"
_REFUSED = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


def _problem(what: str, e: Exception) -> str:
    """What is wrong with `what` (a file of the checkpoint). torch's own text for a refused pickle advises
    turning its safe loading off, which would run whatever code the file holds: never quoted."""
    text = str(e)
    if "Weights only load failed" not in text:
        return f"{what} is damaged ({_why(e)}); it may be truncated"
    refused = _REFUSED.search(text)
    if refused:
        return (f"{what} was refused as unsafe: it contains objects other than tensors and plain data "
                f"({refused.group(1)}), which could run code when loaded. ftdist writes no such objects: "
                "re-create the checkpoint by training with ftdist, and only resume from checkpoints you made")
    detail = text.partition("WeightsUnpickler error:")[2].strip().split("\n", 1)[0] or "not a torch checkpoint"
    return f"{what} is damaged or not written by ftdist (the safe loader stopped: {detail}); it may be truncated"


def load(accelerator, path: Path) -> None:
    """accelerate load_state with errors that name the file. accelerate loads with weights_only=True.

    accelerate silently skips a random-state file it cannot read (the resume is then not exact, with no
    word said), so this rank's one is checked first: present means it must load."""
    from accelerate.utils import load as torch_load

    rng = path / f"random_states_{accelerator.process_index}.pkl"
    if rng.is_file():
        try:
            torch_load(rng)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {str(path)!r} could not be loaded: {_problem(rng.name, e)}. "
                                  f"{_older_hint(path)}; nothing was overwritten") from None
    try:
        accelerator.load_state(str(path))
    except Exception as e:  # corrupt safetensors/pickles surface as many exception types
        bad = _damaged_file(path)
        what = _problem(bad[0].name, bad[1]) if bad else _problem("a file in it", e)
        raise CheckpointError(f"checkpoint {str(path)!r} could not be loaded: {what}. "
                              f"{_older_hint(path)}; nothing was overwritten") from None


def export(accelerator, model, tokenizer, out_dir: Path, recipe_yaml: str, metrics: dict,
           extra_files: dict[str, str] | None = None) -> None:
    """save_pretrained (safetensors only) + tokenizer + recipe + metrics, and `extra_files` ({name: text}, e.g.
    decision.json and calibration.json: what the main process fitted after training). Under ZeRO-3 the state
    dict is gathered from all ranks (accelerate.get_state_dict), so every rank must call this."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    accelerator.wait_for_everyone()
