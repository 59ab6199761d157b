"""Shared pytest setup: `tests/` on sys.path (helpers, slurm_fixture) and the session-wide SLURM test cluster."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from slurm_fixture import slurm_cluster  # noqa: E402,F401  (re-exported: one cluster for the whole session)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its own hook would otherwise run first)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`-n 2 --dist loadgroup`, the suite's command), one worker per test module, so a
    module's shared runs are made once, and one worker for every module that uses the SLURM test cluster: a
    second cluster on the same machine would fight the first over its daemons and ports."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    slurm = {item.path for item in items if "slurm_cluster" in item.fixturenames}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("slurm" if item.path in slurm else item.path.stem))


@pytest.fixture(autouse=True)
def _logging_restored():
    """A test that runs a command in this process (a dry run, `ftdist eval`) calls ftdist's logging setup: the ftdist
    logger stops propagating and it and the root logger get handlers on that test's captured streams, which are
    closed afterwards. Restored after every test, so a later test's caplog sees ftdist's lines whatever ran first
    (the order differs between a serial run and each xdist worker)."""
    loggers = [logging.getLogger(), logging.getLogger("ftdist")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture
def cli_main(monkeypatch, capsys):
    """`ftdist ARGS` in this process (argument parsing, exit status, error printing), without the process-wide
    logging setup; returns (status, stdout, stderr). Saves a Python start per call. The ftdist logger propagates
    at INFO for the test, as caplog reads the root; `_logging_restored` (autouse, set up first, torn down last)
    puts it back."""
    from ftdist import cli

    monkeypatch.setattr(cli, "setup_logging", lambda quiet, verbose: None)
    log = logging.getLogger("ftdist")
    log.propagate = True
    log.setLevel(logging.INFO)  # setLevel, not an attribute write: it clears the logger's level cache

    def call(args: list):
        capsys.readouterr()
        rc = cli.main([str(a) for a in args])
        out = capsys.readouterr()
        return rc, out.out, out.err

    return call
