"""What the user sees on the console: ftdist's logger, library verbosity, the end-of-run summary table."""

from __future__ import annotations

import logging
import os
import sys
import warnings

log = logging.getLogger("ftdist")


def setup_logging(quiet: bool, verbose: bool) -> None:
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


# The progress bar (tqdm) says what its times are: ETA is the remaining steps at this process's pace (tqdm
# takes the rate over the steps since the bar's initial step, so a resumed run's ETA is not stretched).
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}, {rate_fmt}{postfix}]"


def summary_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line] + [f"{k.ljust(width)}  {v}" for k, v in rows] + [line])


def progress_bar(total: int, done: int, show: bool):
    """The training bar: steps done of all, elapsed time and ETA (tqdm's, from this process's own pace)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, disable=not show, desc="train", unit="step", bar_format=BAR_FORMAT,
                dynamic_ncols=True)
