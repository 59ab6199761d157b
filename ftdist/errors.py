"""One exception type for every user-facing error, the exit statuses, and the did-you-mean hint.

The CLI prints its message (one paragraph, naming the key or file, what was wrong
and how to fix it) and exits with status 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

PREEMPTED_EXIT = 99
"""Exit status of a run stopped by a signal after saving a checkpoint: "requeue me". The trainer and
./launch exit with it and slurm/train.sbatch requeues the job on it; distinct from every error status."""

INTERRUPTED_EXIT = 130
"""Exit status after an interactive Ctrl-C: the shell's own status for SIGINT (128 + 2), not a requeue."""


class FtdistError(Exception):
    """A problem with the user's input: recipe, data, flag, checkpoint or environment."""

    exit_code = 2


class RecipeError(FtdistError):
    pass


class DataError(FtdistError):
    pass


class CheckpointError(FtdistError):
    pass


class NonFiniteError(FtdistError):
    """Training produced NaN/inf and the policy says stop. Exit 3: not a bad-input error."""

    exit_code = 3


class PeerFailureError(FtdistError):
    """A collective with the other ranks failed: one of them hung or died. Exit 1: not bad input."""

    exit_code = 1


def did_you_mean(name: object, choices: Iterable[object], n: int = 1) -> str:
    """`" (did you mean 'x'?)"` naming the choice closest to `name` (up to `n` of them, joined with "or"),
    or "" when none is close. Used by every "unknown key / preset / column" message.

    Also finds a choice that is one `_`-separated word of the name (`lr_rate` -> `lr`: too short for
    difflib's similarity ratio). Never raises, and stays fast on a pasted blob."""
    try:
        text = str(name)[:200]  # difflib is quadratic: a pasted blob must not make the hint slow
    except (RecursionError, ValueError):  # a list nested too deeply, an integer too long to print
        return ""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(text, names, n=n, cutoff=0.6)
    if not close:
        close = [c for c in names if c in text.split("_")][:n]
    return " (did you mean " + " or ".join(f"'{c}'" for c in close) + "?)" if close else ""
