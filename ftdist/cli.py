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
    # ftdist's own logger, own handler: libraries that add handlers to the root logger (DeepSpeed
    # does) must not make every line appear twice
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    logging.basicConfig(level=logging.WARNING if level < logging.WARNING else level, format="%(levelname)s %(name)s: %(message)s")
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
            transformers.utils.logging.disable_progress_bar()
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
    from ftdist import config, runtime, train

    recipe = config.load(args.recipe, args.overrides)
    try:
        train.run(recipe, quiet=args.quiet)
    except RuntimeError as e:
        err = runtime.peer_failure(e, recipe.train.timeout_s)
        if err is None:
            raise
        raise err from e
    return 0


def print_plan(recipe_name: str, overrides: list[str], topo: dict) -> int:
    """Check recipe + accelerate config together and print what would run, without training."""
    import shlex

    from ftdist import config, data
    from ftdist import model as modellib
    from ftdist import plan as planlib
    from ftdist.sampler import GlobalBatchSampler
    from ftdist.redaction import redact_override
    from ftdist.unfreeze import Schedule

    recipe = config.load(recipe_name, overrides)
    if recipe.train.precision == "fp16" and topo["gpus_per_node"] == 0:
        raise FtdistError("train.precision: fp16 needs a CUDA GPU and none is visible; use bf16 or no")
    p = planlib.resolve(recipe.train, topo["world_size"], topo["nodes"])
    tok = modellib.load_tokenizer(recipe.model)
    splits = data.build(recipe.data, tok)
    net = modellib.build(recipe.model, recipe.data.task, splits.label_names)
    groups = modellib.layer_groups(net, recipe.unfreeze.group_patterns)
    sampler = GlobalBatchSampler(splits.train["length"][:], p.per_device_batch, p.accumulation, p.world_size, 0,
                                 recipe.train.seed, recipe.data.group_by_length)
    spe = sampler.steps_per_epoch()
    sched = Schedule(recipe.unfreeze, len(groups), spe)
    d = topo["describe"]
    # a CPU preset launched as MULTI_GPU (to get torchrun) runs as MULTI_CPU: DDP over gloo
    backend = "MULTI_CPU (DDP over gloo)" if d["use_cpu"] and d["distributed_type"] == "MULTI_GPU" else d["distributed_type"]
    lines = ["plan (dry run: nothing is trained)"] + ["  " + line for line in p.lines()] + [
        f"  precision         {recipe.train.precision}",
        f"  backend           {backend}  zero stage {d['zero_stage']}  offload {d['offload']}",
        f"  preset            {topo['preset']}",
        f"  steps per epoch   {spe}  total {recipe.train.max_steps or recipe.train.epochs * spe}",
        f"  train examples    {len(splits.train)}  " + ", ".join(f"{k}: {v}" for k, v in splits.label_counts.items()),
        "  layer groups:"]
    lines += [f"    {g.name:<14} {g.count(net):>12,} params" for g in groups]
    lines.append("  unfreeze stages:")
    for s in range(sched.n_stages):
        start = sched.transition_step(s)
        lines.append(f"    stage {s} from step {start if start is not None else 'plateau'}: "
                     + ", ".join(groups[i].name for i in sched.trainable_groups(s)))
    lines.append("  command on each node:")
    for rank in range(topo["nodes"]):
        lines.append(f"    node {rank}: ./launch {shlex.quote(topo['preset'])} {shlex.quote(recipe_name)} "
                     + " ".join(shlex.quote(redact_override(o)) for o in overrides)
                     + (f" --nodes {topo['nodes']} --node-rank {rank} --main-address {topo['main_address']} "
                        f"--main-port {topo['main_port']} --nproc {topo['nproc_per_node']}" if topo["nodes"] > 1 else ""))
    print("\n".join(lines), flush=True)
    return 0


def cmd_plan(args) -> int:
    from ftdist import launcher

    largs = launcher.parse([*( [args.config] if args.config else []), args.recipe, *args.overrides,
                            *(["--nodes", str(args.nodes)] if args.nodes else []),
                            *(["--nproc", str(args.nproc)] if args.nproc else [])])
    _, _, topo = launcher.build(largs)
    return print_plan(topo["recipe"], topo["overrides"], topo)


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

    out = predict.predict(args.model, args.file, args.out, args.text_column, args.text_pair_column, args.batch_size)
    print(f"predictions written to {out}")
    return 0


def cmd_eval(args) -> int:
    import json

    from ftdist import predict

    result = predict.evaluate(args.model, args.data, args.label_column, args.text_column, args.text_pair_column,
                              args.metrics.split(",") if args.metrics else None, args.batch_size)
    print(json.dumps(result, indent=1))
    return 0


def cmd_ablate(args) -> int:
    from ftdist import ablate

    seeds = [int(x) for x in args.seeds.split(",")]
    ablate.run(args.recipe, args.overrides, args.out, seeds, args.steps,
               args.variants.split(",") if args.variants else None, args.metric, args.split)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftdist", description="Fine-tune pretrained transformers, one recipe at every scale.")
    sub = parser.add_subparsers(dest="command", required=True)
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
            p.add_argument("--data", required=True, help="csv/tsv/json/jsonl/parquet file with text and label columns "
                           "(token models: also CoNLL .conll/.txt, or list-valued token and tag columns)")
            p.add_argument("--label-column", help="default: the model's recipe (data.label_column), else 'label'")
            p.add_argument("--metrics", help="comma list; default: the model's recipe (eval.metrics), else accuracy,f1 "
                           "(classification), pearson,spearman (regression), seqeval (token classification)")
        else:
            p.add_argument("file")
            p.add_argument("--out", default="predictions.csv", help=".csv or .jsonl (token models: one row per "
                           "sentence with tokens, tags and scores as JSON lists)")
        p.add_argument("--text-column", help="default: the model's recipe (data.text_column), else 'text'")
        p.add_argument("--text-pair-column", help="default: the model's recipe (data.text_pair_column)")
        p.add_argument("--batch-size", type=int, default=64)
        p.set_defaults(fn=fn)
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
