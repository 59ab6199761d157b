"""`ftdist launch | train | plan | eval | predict | sweep | report | env`.

`ftdist launch ...` is `./launch ...` (same arguments, same code) for an installed package without the checkout.

Every user-facing error is an FtdistError: printed as one paragraph, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ftdist.console import setup_logging
from ftdist.errors import FtdistError

log = logging.getLogger("ftdist")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", default="demo", help="built-in recipe name (e.g. demo) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.lr=3e-5")
    p.add_argument("--quiet", action="store_true", help="warnings and the final summary only")
    p.add_argument("--verbose", action="store_true", help="library logs too")


def cmd_train(args) -> int:
    from ftdist import config, train
    from ftdist import model as modellib
    from ftdist.collectives import peer_failure

    recipe = config.load(args.recipe, args.overrides)
    # before the accelerator, the run folder and tokenization: the same on every rank, so all fail together
    modellib.check_max_length(recipe.model, recipe.data.max_length)
    try:
        train.run(recipe, quiet=args.quiet)
    except RuntimeError as e:
        err = peer_failure(e, recipe.train.timeout_s)
        if err is None:
            raise
        raise err from e
    return 0


def print_plan(recipe_name: str, overrides: list[str], topo) -> int:
    from ftdist.dryrun import print_plan as dry_run

    return dry_run(recipe_name, overrides, topo)


def cmd_plan(args) -> int:
    import shutil

    from ftdist import launcher

    largs = launcher.parse([*( [args.config] if args.config else []), args.recipe, *args.overrides,
                            *(["--nodes", str(args.nodes)] if args.nodes else []),
                            *(["--nproc", str(args.nproc)] if args.nproc else [])])
    topo = launcher.build(largs).topology
    try:
        return print_plan(topo.recipe, topo.overrides, topo)
    finally:  # the materialized preset copy: a plan launches nothing
        if topo.workdir:
            shutil.rmtree(topo.workdir, ignore_errors=True)


def cmd_report(args) -> int:
    from ftdist import report

    print(report.build(args.run_dir))
    return 0


def cmd_env(args) -> int:
    import json

    from ftdist import envinfo

    info = envinfo.collect()
    print(json.dumps(info, indent=1) if args.json else envinfo.render(info))
    return 0


def cmd_predict(args) -> int:
    from ftdist import predict

    out = predict.predict(args.model, args.file, args.out, args.text_column, args.text_pair_column, args.batch_size,
                          trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                          calibrated=args.calibrated, argmax=args.argmax, image_column=args.image_column)
    print(f"predictions written to {out}")
    return 0


def cmd_eval(args) -> int:
    import json

    from ftdist import evalreport, predict

    if args.report:
        evalreport.check_report_dir(args.report)  # before the model loads: a refusal costs nothing
    result = predict.evaluate(args.model, args.data, args.label_column, args.text_column, args.text_pair_column,
                              args.metrics.split(",") if args.metrics else None, args.batch_size,
                              trust_remote_code=args.trust_remote_code, image_column=args.image_column)
    if args.report:
        print(f"report written to {evalreport.write_report(args.report, result, args.model, args.data)}")
    if "calibration" in result and not args.json:  # classification: readable tables, then the JSON
        from ftdist.analysis import text

        print(text(result))
    print(json.dumps(result, indent=1))
    return 0


def cmd_ablate(args) -> int:
    from ftdist import ablate

    seeds = [int(x) for x in args.seeds.split(",")]
    ablate.run(args.recipe, args.overrides, args.out, seeds, args.steps,
               args.variants.split(",") if args.variants else None, args.metric, args.split)
    return 0


def cmd_sweep(args) -> int:
    from ftdist import sweep

    return sweep.main(args)


def cmd_verify(args) -> int:
    from ftdist import verify

    results = verify.run(args.recipe, args.overrides, args.preset, args.steps, args.out)
    return 0 if all(c.passed for c in results) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftdist", description="Fine-tune pretrained transformers, one recipe at every scale.")
    sub = parser.add_subparsers(dest="command", required=True)
    # only listed here: main() hands `ftdist launch ...` to the launcher before this parser sees it
    sub.add_parser("launch", add_help=False, help="what ./launch does, for an installed package: [PRESET] RECIPE "
                   "[key=value ...] [--dry-run] [--cpu-fallback] [-- accelerate args] (see `ftdist launch --help`)")
    p = sub.add_parser("train", help="train from a recipe (run it under `accelerate launch` or ./launch for several processes)")
    _add_recipe_args(p)
    p.set_defaults(fn=cmd_train)
    p = sub.add_parser("plan", help="check a recipe with an accelerate config and print the plan (same as ./launch --dry-run)")
    _add_recipe_args(p)
    p.add_argument("--config", help="preset name or accelerate config file (default: what ./launch would pick)")
    p.add_argument("--nodes", type=int)
    p.add_argument("--nproc", type=int, help="processes per node")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("ablate", help="full vs gradual vs lp-ft vs layer-wise LR decay: same data, seeds and step budget")
    _add_recipe_args(p)
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=200, help="optimizer-step budget of every run")
    p.add_argument("--variants", help="comma list from full,gradual,lp-ft,lr-decay (default: all)")
    p.add_argument("--metric", help="default: eval.best_metric")
    p.add_argument("--split", default="test", help="test (falls back to validation)")
    p.add_argument("--out", default="runs/ablation")
    p.set_defaults(fn=cmd_ablate)
    p = sub.add_parser("verify", help="check the promise on your recipe and machine: 1 vs N processes, and "
                       "kill-and-resume vs an uninterrupted run")
    _add_recipe_args(p)
    p.add_argument("--preset", default="cpu-2", help="the preset you will train with (default: cpu-2)")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps of each run (default 8)")
    p.add_argument("--out", help="folder for the verification runs (default: a new temporary folder)")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("sweep", help="hyperparameter search with Optuna: every trial a normal ftdist run, pruned on "
                       "its eval metric; resumable; several local workers or a SLURM array (slurm/sweep.sbatch)")
    _add_recipe_args(p)
    p.add_argument("--space", help="search-space YAML (default: RECIPE.sweep.yaml next to the recipe file)")
    p.add_argument("--preset", help="preset or accelerate config of every trial (default: what ./launch picks for "
                   "one worker's devices)")
    p.add_argument("--workers", type=int, default=1, help="trials run at once here, each pinned to its GPUs "
                   "(round-robin, shared when workers outnumber GPUs) or to its slice of the CPU cores (default 1)")
    p.add_argument("--gpus-per-trial", type=int, help="GPUs of each worker (default: visible GPUs / workers, at least 1)")
    p.add_argument("--n-trials", type=int, help="finished (complete or pruned) trials the study is to reach, over all "
                   "workers and array tasks (default: n_trials of the search space, else 20)")
    p.add_argument("--storage", help="Optuna storage: an RDB URL (postgresql://, mysql://, sqlite:///) or a journal "
                   "file path (default: a journal file in the sweep folder)")
    p.add_argument("--study-name", help="default: the sweep folder's name")
    p.add_argument("--out", help="sweep folder (default: output_dir of the search space, else <log.output_dir>-sweep)")
    p.add_argument("--top-k", type=int, default=0, help="re-train the best K trials over --seeds seeds at the end")
    p.add_argument("--seeds", type=int, default=3, help="seeds of each --top-k re-run (default 3)")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep finished trials' checkpoints (default: "
                   "dropped; metrics, best/ and model/ stay)")
    p.set_defaults(fn=cmd_sweep)
    p = sub.add_parser("report", help="(re)build report.md and plots of a run folder")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("env", help="versions, devices, backends, DeepSpeed ops, SLURM: what a bug report needs")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_env)
    for name, fn in (("eval", cmd_eval), ("predict", cmd_predict)):
        p = sub.add_parser(name, help="score a model on a labelled file" if name == "eval" else
                           "write predictions with probabilities to CSV or JSONL")
        p.add_argument("model", help="exported model folder (<run>/model) or checkpoint folder")
        if name == "eval":
            p.add_argument("--data", required=True, help="csv/tsv/json/jsonl/parquet file with text and label columns; "
                           "image models: a folder with one subfolder per class, or a csv/jsonl of image paths and labels "
                           "(token models: also CoNLL .conll/.txt, or list-valued token and tag columns)")
            p.add_argument("--label-column", help="default: the model's recipe (data.label_column), else 'label'")
            p.add_argument("--metrics", help="comma list; default: the model's recipe (eval.metrics), else accuracy,f1 "
                           "(classification), pearson,spearman (regression), seqeval (token classification)")
            p.add_argument("--json", action="store_true", help="print the JSON only (classification models also "
                           "print per-class, confusion and calibration tables before it)")
            p.add_argument("--report", metavar="DIR", help="also write report.md, eval.json, reliability.png and "
                           "confusion-eval.png into DIR (a new or empty folder, or one an earlier --report wrote)")
        else:
            p.add_argument("file", metavar="FILE", help="csv/tsv/json/jsonl/parquet file with a text column; image "
                           "models: a folder of images, or a csv/jsonl of image paths "
                           "(token models: also CoNLL .conll/.txt)")
            p.add_argument("--out", default="predictions.csv", help=".csv or .jsonl (token models: one row per "
                           "sentence with tokens, tags and scores as JSON lists). Never the input file, a file of "
                           "the model folder or a folder; an existing file only with --overwrite")
            p.add_argument("--overwrite", action="store_true", help="replace an existing --out file. Off by default: "
                           "ftdist does not overwrite a file it may not have written (a rerun to the same --out "
                           "needs it too)")
            p.add_argument("--calibrated", action="store_true", help="probabilities from softmax(logits / T), T the "
                           "temperature fitted on validation (the model's calibration.json, from "
                           "eval.calibration=temperature); labels do not change")
            p.add_argument("--argmax", action="store_true", help="label = the most probable class, ignoring the "
                           "model's decision.json (eval.decision); by default a model's decision is applied")
        p.add_argument("--text-column", help="default: the model's recipe (data.text_column), else 'text'")
        p.add_argument("--text-pair-column", help="default: the model's recipe (data.text_pair_column)")
        p.add_argument("--image-column", help="image models, csv/jsonl input: the column of image paths (relative to "
                       "the file); default: the model's recipe (data.image_column), else 'image'. A folder needs none")
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--trust-remote-code", action="store_true", help="run Python code that the model folder "
                       "names in its config.json (auto_map). Off by default, and never asked for interactively: only "
                       "for a model whose code you have read and trust")
        p.set_defaults(fn=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["launch"]:  # the launcher's own parser: its `--` and argument order rules apply unchanged
        from ftdist import launcher

        return launcher.main(argv[1:], prog="ftdist launch")
    parser = build_parser()
    # key=value overrides may come before or after flags: collect the ones argparse left over
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", []) or []) + extra
    setup_logging(getattr(args, "quiet", False), getattr(args, "verbose", False))
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
