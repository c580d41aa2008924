"""A regular (non-editable) install ships its configs; the repository tracks every file it ships.

The venv that runs the tests holds an *editable* install. Its finder
(__editable___cvtrain_*_finder) sits at the end of sys.meta_path, behind the
normal path finder, so a PYTHONPATH entry wins over it; the test still checks
that every module it relies on (cvtrain, cvtrain.configs) came from the
--target copy, so a shadowing editable install would fail it instead of
passing vacuously.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = ["pyproject.toml", "README.md", "src", "configs"]  # what building the wheel reads


def shipped_files():
    """The package's sources and configs, relative to the repository root."""
    return sorted(p.relative_to(REPO_ROOT).as_posix()
                  for top in ("src/cvtrain", "configs") for p in (REPO_ROOT / top).rglob("*")
                  if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --target` of a copy of the package sources: the directory to put on PYTHONPATH.

    A copy, because building in the repository itself leaves build/ behind, and a stale
    build/lib would be packed into the next wheel.
    """
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"
    source.mkdir()
    for name in PACKAGE_SOURCES:
        src = REPO_ROOT / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            shutil.copy2(src, source / name)
    target = tmp / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--target", str(target), str(source)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout
    return target


def run_installed(target, args):
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, *args], cwd=target.parent, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_installed_copy_is_the_one_imported(installed):
    out = run_installed(installed, ["-c", "import cvtrain, cvtrain.configs, cvtrain.data.loader as m; "
                                          "print(cvtrain.__file__); print(cvtrain.configs.__file__); print(m.__file__)"])
    paths = [Path(line) for line in out.split()]
    assert len(paths) == 3
    for path in paths:
        assert path.is_relative_to(installed), f"{path} is not the installed copy under {installed}"


def test_installed_copy_ships_every_config(installed):
    in_repo = {f.removeprefix("configs/") for f in shipped_files() if f.startswith("configs/")}
    shipped = {p.relative_to(installed / "cvtrain" / "configs").as_posix()
               for p in (installed / "cvtrain" / "configs").rglob("*") if p.suffix in (".py", ".yaml")}
    assert shipped == in_repo


def test_installed_copy_composes_its_config(installed):
    out = run_installed(installed, ["-m", "cvtrain", "--cfg", "job", "data=synthetic"])
    assert "name: synthetic" in out and "name: train" in out
    assert "name: lenet" in out


@pytest.mark.skipif(shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs a git checkout")
def test_git_ignores_no_shipped_file():
    """New files may be untracked while they are being written; ignored ones would never be committed."""
    ignored = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "--stdin"], input="\n".join(shipped_files()),
                             stdout=subprocess.PIPE, text=True).stdout.split()
    assert ignored == []
