"""What pip gets: the sdist carries every tracked file the build and the tests need (a wheel built
from it, as `python -m build` and `pip install rims_fast-*.tar.gz` do, compiles csrc/), and the
installed distribution exposes the benchmark suite as ``rims_fast.benchmarks`` with its
``rims-bench`` script, not as a top-level ``benchmarks`` package."""

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Tracked files an sdist may leave out: CI's script, git's own file, and the recorded results
# (provenance kept in the repository; MANIFEST.in prunes them).
NOT_SHIPPED = (".ci/", ".gitignore", "benchmarks/results/")


def _tracked_files():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (the expected file list is git's)")
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"git ls-files failed: {r.stderr.strip()}")
    return sorted(f for f in r.stdout.split("\0") if f)


def test_sdist_carries_the_build_and_the_tests(tmp_path):
    # In a copy of the tracked tree: setup.py writes rims_fast/_build_info.py when it runs with
    # RIMS_FAST_SKIP_BUILD (no torch import, a few seconds), which must not touch this checkout's.
    files = _tracked_files()
    src = tmp_path / "src"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    env = dict(os.environ, RIMS_FAST_SKIP_BUILD="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                       cwd=src, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
    (sdist,) = (tmp_path / "dist").glob("rims_fast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    shipped = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    expected = [f for f in files if not f.startswith(NOT_SHIPPED)]
    missing = [f for f in expected if f not in shipped]
    assert not missing, f"{len(missing)} tracked files missing from the sdist: {missing[:20]}"
    # The csrc/ files are what a build from the sdist compiles: count them, not only compare.
    assert sum(f.startswith("csrc/kernels/") for f in shipped) >= 10
    assert not any(n.startswith("benchmarks/results/") or n.endswith((".so", ".pyc"))
                   for n in shipped)


def _distribution():
    try:
        return importlib.metadata.distribution("rims_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("rims_fast is not installed (run from a checkout on PYTHONPATH)")


def test_benchmarks_installed_inside_the_package():
    dist = _distribution()
    (script,) = [e for e in dist.entry_points if e.name == "rims-bench"]
    assert script.value == "rims_fast.benchmarks.__main__:main"
    main = script.load()  # imports rims_fast.benchmarks through the installed mapping
    assert callable(main)
    top_level = (dist.read_text("top_level.txt") or "").split()
    assert "benchmarks" not in top_level, top_level
