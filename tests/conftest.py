"""Shared helpers for the cvtrain test suite.

Helpers are exposed as session-scoped fixtures that return plain functions, so
module-scoped fixtures (one training run shared by several tests) can use them:

    run_cli(args, cwd)            `python -m cvtrain *args` in cwd -> CompletedProcess
    start_cli(args, cwd, after=)  the same in the background -> Future of a CliRun
    run_dir_of(cwd)               the single run dir under cwd/outputs/<date>/
    compose_config(overrides)     the composed config, as the command line would see it
"""
import copy
import functools
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from cvtrain.config import register_configs

# One thread, here and in the runs: the tensors are tiny, and on a shared 2-core machine
# OpenMP's spinning worker threads make a forward pass many times slower, not faster.
torch.set_num_threads(1)


def _run_cli(args, cwd, env=None, timeout=180) -> subprocess.CompletedProcess:
    """`python -m cvtrain *args` in `cwd` (runs land in cwd/outputs).

    stderr is merged into stdout, so `.stdout` holds everything the program printed
    (Hydra's errors and the log go to different streams).
    """
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cvtrain", *map(str, args)], cwd=cwd, env=full_env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _run_dir(cwd) -> Path:
    """The one single-run directory, cwd/outputs/<date>/<time>_<data>_<model>_<optim>/ (not a sweep's)."""
    dirs = sorted(p for p in Path(cwd, "outputs").glob("*/*") if p.is_dir() and not p.parent.name.startswith("sweep-"))
    assert len(dirs) == 1, f"expected exactly one run dir under {cwd}/outputs, found {dirs}"
    return dirs[0]


@dataclass
class CliRun:
    """A finished `python -m cvtrain` in its own working directory."""
    proc: subprocess.CompletedProcess
    cwd: Path

    @property
    def output(self) -> str:
        return self.proc.stdout

    @property
    def run_dir(self) -> Path:
        return _run_dir(self.cwd)


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple):
    register_configs()  # the defaults list names the `cvtrain_schema` node
    with initialize_config_module(config_module="cvtrain.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _compose(overrides=()):
    """cvtrain's composed config for `overrides`, as `python -m cvtrain` would see it.

    Composing takes ~0.1 s, and many tests compose the same overrides: each gets its own copy
    of a cached result. Errors are not cached: a failing composition raises every time.
    """
    return copy.deepcopy(_composed(tuple(overrides)))


@pytest.fixture(scope="session")
def run_cli():
    return _run_cli


@pytest.fixture(scope="session")
def start_cli():
    """start_cli(args, cwd, after=None) -> Future[CliRun], two runs at a time.

    A `python -m cvtrain` spends ~4 s importing torch before it does anything, so
    independent runs overlap well on 2 cores. With `after` (the Future of an earlier
    start), `args` is a function of that finished CliRun, e.g. to resume its checkpoint;
    the pool starts jobs in order, so `after` is always running or done by then.
    """
    pool = ThreadPoolExecutor(max_workers=2)

    def start(args, cwd, after: Future = None) -> Future:
        def job():
            full_args = args(after.result()) if after is not None else args
            return CliRun(_run_cli(full_args, cwd), Path(cwd))
        return pool.submit(job)

    yield start
    pool.shutdown(cancel_futures=True)  # after `pytest -x` stopped early: skip the runs not yet started


@pytest.fixture(scope="session")
def run_dir_of():
    return _run_dir


@pytest.fixture(scope="session")
def compose_config():
    return _compose
