"""`./launch` / `ftdist launch` arguments: flags, key=value overrides and `--` accelerate arguments in any order
that is unambiguous, and which word is the preset and which the recipe.

- Flags and overrides may come before, between or after the preset and recipe (`cpu demo --dry-run train.lr=1e-4`).
- After `--`, what `accelerate launch` knows goes to it (with its values); launch's own flags, overrides and words
  that accelerate would take for a training script come back to launch. Anything else is an error naming it.
- A word that is no preset, config file or recipe but close to a preset name gets a preset hint, not a recipe one.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ftdist import presets
from ftdist.devices import FALLBACK_ENV
from ftdist.errors import FtdistError, did_you_mean

USAGE = "[PRESET | CONFIG.yaml] RECIPE [key=value ...] [flags] [-- accelerate args]"


@dataclass(frozen=True)
class Positionals:
    """The words of a launch line, sorted out: preset (None: launch picks one for the machine), recipe, overrides."""

    preset: str | None
    recipe: str
    overrides: list[str]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one paragraph through launch's error path, not argparse's usage dump
        raise FtdistError(f"{message}; usage: {self.prog} {USAGE} (see {self.prog} --help)")


def parser(prog: str = "./launch", description: str | None = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description=description, usage=f"{prog} {USAGE}",
                                epilog="Anything after `--` that `accelerate launch` knows goes to it unchanged; "
                                       "flags and overrides may come in any order.")
    p.add_argument("positionals", nargs="*", help="[PRESET | CONFIG.yaml] RECIPE [key=value ...]")
    p.add_argument("--nodes", type=int, help="number of nodes (default: SLURM_NNODES or 1)")
    p.add_argument("--node-rank", type=int, help="this node's rank (default: SLURM_NODEID or 0)")
    p.add_argument("--main-address", help="address of node 0 (default: first host of the SLURM allocation)")
    p.add_argument("--main-port", type=int, help="rendezvous port (default: derived from the SLURM job id, else 29500)")
    p.add_argument("--nproc", type=int, help="processes per node (default: GPUs per node, or the preset's count on CPU)")
    p.add_argument("--dry-run", action="store_true", help="check recipe + config together and print the plan; do not train")
    p.add_argument("--cpu-fallback", action="store_true",
                   help=f"run a GPU preset as its CPU twin (ddp -> cpu-2, zero3 -> cpu-zero3, ...) when this node has "
                        f"no CUDA GPU; without it such a launch is refused. Same as {FALLBACK_ENV}=1")
    p.add_argument("--quiet", action="store_true", help="passed to `ftdist train`: warnings and the final summary only")
    p.add_argument("--verbose", action="store_true", help="passed to `ftdist train`: library logs too")
    p.add_argument("--print-main-address", action="store_true",
                   help="print node 0's address in this SLURM job (MASTER_ADDR, else the NodeAddr of the "
                        "allocation's first node) and exit; slurm/train.sbatch uses it")
    return p


def _arity(p: argparse.ArgumentParser) -> dict[str, object]:
    """Option string -> its nargs (0 for a switch, None for one value)."""
    return {s: a.nargs for a in p._actions for s in a.option_strings}


def split_accelerate_tail(tail: list[str], launch_options: dict[str, object]) -> tuple[list[str], list[str]]:
    """(the arguments for `accelerate launch`, those that come back to launch) from what follows `--`."""
    from accelerate.commands.launch import launch_command_parser

    accelerate_options = _arity(launch_command_parser())
    extra: list[str] = []
    back: list[str] = []
    i = 0
    while i < len(tail):
        tok = tail[i]
        i += 1
        if not tok.startswith("-"):
            back.append(tok)  # accelerate would take it for a training script: an override, the preset or recipe
            continue
        name = tok.split("=", 1)[0]
        if name in accelerate_options:  # accelerate first: `-- --quiet` is accelerate's --quiet
            target, nargs = extra, accelerate_options[name]
        elif name in launch_options:
            target, nargs = back, launch_options[name]
        else:
            raise FtdistError(f"{tok!r} after `--` is neither an `accelerate launch` option nor a launch flag"
                              f"{did_you_mean(name, [*accelerate_options, *launch_options])}; see `accelerate launch "
                              f"--help` and `./launch --help`")
        target.append(tok)
        if "=" in tok or nargs == 0:
            continue
        count = nargs if isinstance(nargs, int) else None
        while i < len(tail) and (count is None or count > 0) and not tail[i].startswith("-"):
            target.append(tail[i])
            i += 1
            if count is not None:
                count -= 1
            elif nargs in (None, "?"):
                break
    return extra, back


def parse(argv: list[str], prog: str = "./launch", description: str | None = None) -> argparse.Namespace:
    head, tail = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = parser(prog, description)
    extra, back = split_accelerate_tail(tail, _arity(p)) if tail else ([], [])
    args, unknown = p.parse_known_intermixed_args(head + back)
    if unknown:
        flags = [s for s in _arity(p) if s.startswith("--")]
        raise FtdistError(f"unknown flag {unknown[0]!r}{did_you_mean(unknown[0].split('=')[0], flags)}; "
                          f"usage: {prog} {USAGE} (see {prog} --help)")
    args.extra = extra
    args.prog = prog
    return args


def is_accelerate_config(token: str) -> bool:
    if token in presets.list_presets():
        return True
    p = Path(token)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        try:
            data = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and ("distributed_type" in data or "compute_environment" in data)
    return False


def _is_recipe(token: str) -> bool:
    from ftdist.config import builtin_recipes

    return Path(token).is_file() or token in builtin_recipes()


def _is_override(token: str) -> bool:
    return "=" in token and not Path(token).is_file()  # a file whose name has '=' is a recipe, not an override


def _not_a_preset(word: str) -> FtdistError:
    names = presets.list_presets()
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    listed = f"Presets: {', '.join(names)}; or give the path of an accelerate config YAML file"
    if close:
        return FtdistError(f"unknown preset {word!r}; did you mean {close[0]}? {listed}.")
    return FtdistError(f"{word!r} is neither a preset nor an accelerate config file, and it comes before the "
                       f"recipe. {listed}; usage: ./launch {USAGE}")


def _close_to_a_preset_only(word: str) -> bool:
    from ftdist.config import builtin_recipes

    def best(choices: list[str]) -> float:
        return max((difflib.SequenceMatcher(None, word, c).ratio() for c in choices), default=0.0)

    looks_like_path = "/" in word or word.endswith((".yaml", ".yml"))
    return not looks_like_path and best(presets.list_presets()) >= 0.6 and best(presets.list_presets()) > best(builtin_recipes())


def positionals(tokens: list[str], is_config: Callable[[str], bool] = is_accelerate_config) -> Positionals:
    """Preset, recipe and overrides from the launch line's words, whatever their order."""
    words = [t for t in tokens if not _is_override(t)]
    overrides = [t for t in tokens if _is_override(t)]
    if len(words) > 2:
        raise FtdistError(f"launch: {words[2]!r} is neither a preset, a recipe, nor a key=value override (a preset "
                          f"and a recipe came before it: {words[0]!r}, {words[1]!r}); usage: ./launch {USAGE}")
    if not words:
        return Positionals(None, "demo", overrides)
    if len(words) == 1:
        word = words[0]
        if is_config(word):
            return Positionals(word, "demo", overrides)
        if not _is_recipe(word) and _close_to_a_preset_only(word):
            raise _not_a_preset(word)
        return Positionals(None, word, overrides)  # the recipe loader names what is wrong with it
    first, second = words
    if is_config(first):
        return Positionals(first, second, overrides)
    if is_config(second):  # `./launch demo cpu`: unambiguous, since a recipe is never an accelerate config
        return Positionals(second, first, overrides)
    raise _not_a_preset(first)
