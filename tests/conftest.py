"""Shared helpers for the cvtrain test suite.

Helpers are exposed as session-scoped fixtures that return plain functions, so
module-scoped fixtures (one training run shared by several tests) can use them.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from cvtrain.config import register_configs

def _run_cli(args, cwd, env=None, timeout=120) -> subprocess.CompletedProcess:
    """`python -m cvtrain *args` in `cwd` (runs land in cwd/outputs).

    stderr is merged into stdout, so `.stdout` holds everything the program printed
    (Hydra's errors and the log go to different streams).
    """
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cvtrain", *map(str, args)], cwd=cwd, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _run_dirs(cwd) -> list:
    """Single-run directories under cwd/outputs/<date>/<time>_<data>_<model>_<optim>/."""
    return sorted(p for p in Path(cwd, "outputs").glob("*/*") if p.is_dir() and p.parent.name != "multirun")


def _run_dir(cwd) -> Path:
    """The one single-run directory under cwd/outputs."""
    dirs = _run_dirs(cwd)
    assert len(dirs) == 1, f"expected exactly one run dir under {cwd}/outputs, found {dirs}"
    return dirs[0]


def _compose(overrides=()):
    """cvtrain's composed config for `overrides`, as `python -m cvtrain` would see it."""
    register_configs()  # the defaults list names the `cvtrain_schema` node
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture(scope="session")
def run_cli():
    return _run_cli


@pytest.fixture(scope="session")
def run_dir_of():
    return _run_dir


@pytest.fixture(scope="session")
def compose_config():
    return _compose
