"""Shared test helpers: run the CLI scripts as a user would, with a private data cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one thread each (and in the CLI runs they start, which
    # inherit the environment), so that workers do not oversubscribe the cores
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


#: the longest test files first (measured: SegDiff's trained fixture takes ~10 min on 2 cores), so that
#: under pytest-xdist a long file does not start last and leave the other workers idle at the end
#: (pyproject's --no-loadscope-reorder keeps this order: xdist otherwise sorts files by their test count)
LONGEST_FIRST = ("test_segdiff_cli.py", "test_segrefiner_cli.py", "test_framework_cli.py", "test_drivers_cli.py",
                 "test_imgx_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One synthetic-data cache for the whole session (generated once, like a user's ~/.cache)."""
    path = tmp_path_factory.mktemp("diffseg_cache")
    os.environ["DIFFSEG_CACHE"] = str(path)
    return path


def run_script(script: str, *args: str, cache: Path | None = None, timeout: int = 2400,
               check: bool = True) -> subprocess.CompletedProcess:
    """``python scripts/<script> args...`` from the repository root; output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_SILENT="true")
    if cache is not None:
        env["DIFFSEG_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, cache_dir):
    """``trained_run(*fit_args) -> run dir``: a tiny training run done once per test session, shared by every
    test file and every pytest-xdist worker (keyed by its arguments, guarded by a file lock), so that the same
    model is not trained in several places. Tests must treat the run directory as read-only."""
    import hashlib
    import shutil

    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the session's, not the user's
    root = shared / "trained_runs"
    root.mkdir(exist_ok=True)

    def get(*args: str) -> Path:
        key = hashlib.sha1("\0".join(args).encode()).hexdigest()[:12]
        out = root / key
        with FileLock(str(root / f"{key}.lock")):
            if not (out / "metrics.json").is_file():
                shutil.rmtree(out, ignore_errors=True)
                proc = run_script("fit.py", *args, f"hydra.run.dir={out}", cache=cache_dir)
                (out / "fit_stdout.txt").write_text(proc.stdout)  # what the user saw (the metrics table)
        return out

    return get
