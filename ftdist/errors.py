"""One exception type for every user-facing error.

The CLI prints its message (one paragraph, naming the key or file, what was wrong
and how to fix it) and exits with status 2, without a traceback.
"""


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
