"""Shared pytest setup: `tests/` on sys.path (helpers, slurm_fixture) and the session-wide SLURM test cluster."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from slurm_fixture import slurm_cluster  # noqa: E402,F401  (re-exported: one cluster for the whole session)
