"""Drivers that run scripts/fit.py and scripts/evaluate.py as child processes (ablate.py, compare.py).

Each run is a directory: it is finished when ``metrics.json`` exists (written last, atomically); a
directory with ``checkpoints/last.ckpt`` but no metrics is an interrupted run, continued with
``resume=true``. A driver that is stopped and started again therefore re-runs nothing that finished.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from diffseg.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"


def split_overrides(argv: Sequence[str], own: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` arguments -> (the driver's own keys, parsed with Hydra's override grammar and
    defaulted from ``own``; every other override, verbatim, for fit.py)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    mine, rest = dict(own), []
    for arg in argv:
        try:
            override = parser.parse_override(arg)
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors are long; keep the gist
            raise ConfigError(f"cannot parse the argument {arg!r}: expected key=value ({err})") from None
        key = override.key_or_group
        if key in own and not override.is_add() and not override.is_delete():
            mine[key] = override.value()
        else:
            rest.append(arg)
    return mine, rest


def group_choice(overrides: Sequence[str], group: str) -> str | None:
    """The value of ``group=VALUE`` in ``overrides`` (last wins), or None."""
    found = None
    for o in overrides:
        if o.startswith(f"{group}="):
            found = o.split("=", 1)[1]
    return found


def run_is_finished(run_dir: Path) -> bool:
    return (run_dir / "metrics.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class Job:
    """One child process: ``scripts/<script> args...`` writing its run into ``run_dir``."""

    name: str
    script: str                       # fit.py | evaluate.py
    args: list[str]
    run_dir: Path
    after: list[str] = field(default_factory=list)  # names of jobs that must finish first

    def command(self) -> list[str]:
        args = [*self.args, f"hydra.run.dir={self.run_dir}"]
        if self.script == "fit.py" and (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            args.append("resume=true")  # an interrupted run continues from its last checkpoint
        return [sys.executable, str(SCRIPTS / self.script), *args]


class JobFailed(ConfigError):
    """A child run failed; its log is named in the message (finished runs are kept)."""


def run_job(job: Job, threads: int | None = None) -> Path:
    """Run ``job`` unless its run is finished; its output goes to ``run_dir/driver.log``."""
    if run_is_finished(job.run_dir):
        print(f"[done] {job.name}: {job.run_dir} (finished earlier, not re-run)", flush=True)
        return job.run_dir
    job.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = job.command()
    log_path = job.run_dir / "driver.log"
    print(f"[run ] {job.name}: {shlex.join(cmd[1:])}", flush=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code != 0 or not run_is_finished(job.run_dir):
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise JobFailed(f"{job.name} failed (exit {code}); full log: {log_path}\n  " + "\n  ".join(tail))
    print(f"[ok  ] {job.name}", flush=True)
    return job.run_dir


def run_jobs(jobs: Iterable[Job], parallel: int = 1, threads: int | None = None) -> None:
    """Run jobs, up to ``parallel`` at a time, each once the jobs it depends on have finished. After
    a failure no new job starts (running ones finish) and the first failure is raised."""
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"jobs: expected an int >= 1, got {parallel!r}")
    if parallel > 1 and threads is None:  # share the cores between the parallel runs
        threads = max(1, (os.cpu_count() or 1) // parallel)
    pending = {j.name: j for j in jobs}
    unknown = {d for j in pending.values() for d in j.after} - set(pending)
    if unknown:
        raise ConfigError(f"jobs depend on jobs that are not scheduled: {sorted(unknown)}")
    done: set[str] = set()
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        running: dict = {}
        while pending or running:
            if not errors:
                for name in [n for n, j in pending.items() if set(j.after) <= done]:
                    if len(running) >= parallel:
                        break
                    running[pool.submit(run_job, pending.pop(name), threads)] = name
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    future.result()
                    done.add(name)
                except JobFailed as err:
                    errors.append(err)
    if errors:
        raise errors[0]
    if pending:
        raise ConfigError(f"jobs left waiting on failed jobs: {sorted(pending)}")


def check_overrides_compose(config_name: str, overrides: Sequence[str], what: str) -> None:
    """Compose ``config_name`` with ``overrides`` (no training): a typo stops the driver before any run."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
            compose(config_name, overrides=[*overrides, "paths.output_dir=/dev/null"])
    except Exception as err:  # noqa: BLE001 - Hydra composition errors
        raise ConfigError(f"{what}: the overrides {list(overrides)} do not compose: {err}") from None
