"""Shared fixtures. Trained problems are cached per session: they are deterministic and read-only."""

from __future__ import annotations

import warnings

import pytest

from . import problems

#: run as a script by tests/integration/test_distributed.py, never imported (--doctest-modules would)
collect_ignore = ["integration/ddp_fit.py"]


def pytest_configure(config):  # keep Lightning's tips and PossibleUserWarnings out of the output
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*litmodels.*")


@pytest.fixture(scope="session")
def logreg() -> problems.Problem:
    return problems.trained_logreg()


@pytest.fixture(scope="session")
def mlp() -> problems.Problem:
    return problems.trained_mlp()
