"""`ftdist train | plan | eval | predict | report | env`.

Every user-facing error is an FtdistError: printed as one paragraph, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ftdist.errors import FtdistError

log = logging.getLogger("ftdist")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    if rank != 0:
        level = logging.ERROR  # only rank 0 talks; other ranks still show errors
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    # libraries: their own verbosity, each repeated warning once
    warnings.simplefilter("once")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        for name in ("transformers", "datasets", "accelerate", "DeepSpeed", "torch.distributed"):
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            import datasets
            import transformers
            transformers.logging.set_verbosity_error()
            datasets.logging.set_verbosity_error()
            datasets.disable_progress_bars()
        except ImportError:
            pass


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default="demo", help="built-in recipe name (e.g. demo) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-5")
    p.add_argument("--quiet", action="store_true", help="warnings and the final summary only")
    p.add_argument("--verbose", action="store_true", help="library logs too")


def cmd_train(args) -> int:
    from ftdist import config, train

    recipe = config.load(args.recipe, args.overrides)
    train.run(recipe, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftdist", description="Fine-tune pretrained transformers, one recipe at every scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train from a recipe (run it under `accelerate launch` or ./launch for several processes)")
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come before or after flags: collect the ones argparse left over
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    _setup_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
    try:
        return args.fn(args)
    except FtdistError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"ftdist: error: {prefix}{e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("ftdist: interrupted", file=sys.stderr)
        return 130
