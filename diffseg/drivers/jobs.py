"""Drivers that run scripts/fit.py and scripts/evaluate.py jobs through a Hydra launcher (ablate.py, compare.py).

The jobs of a grid are handed to a Hydra launcher plugin (``launcher=joblib`` by default: processes on this
machine; ``launcher=submitit_local``: the submitit path on this machine; ``launcher=submitit_slurm``: one SLURM
job each, with ``hydra.launcher.partition=...`` etc.). Each job is the task of fit.py / evaluate.py run by
Hydra with the job's overrides, its output directory set through ``hydra.sweep.dir``/``hydra.sweep.subdir``.
Jobs that depend on others (``after``) go in a later launch.

Each run is a directory: it is finished when ``metrics.json`` exists (written last, atomically); a
directory with ``checkpoints/last.ckpt`` but no metrics is an interrupted run, continued with
``resume=true``. A driver that is stopped and started again therefore re-runs nothing that finished.
"""
from __future__ import annotations

import json
import os
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


def split_launcher_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """(``hydra.launcher.*`` overrides, for the launcher; the rest, for every job)."""
    mine = [o for o in overrides if o.lstrip("+~").startswith("hydra.launcher.")]
    return mine, [o for o in overrides if o not in mine]


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
    """One run of ``scripts/<script>`` with ``args`` (Hydra overrides), writing into ``run_dir``."""

    name: str
    script: str                       # fit.py | evaluate.py
    args: list[str]
    run_dir: Path
    after: list[str] = field(default_factory=list)  # names of jobs that must finish first

    def overrides(self) -> list[str]:
        """The job's overrides for the launcher: its arguments, its output directory and, for an interrupted
        training run, ``resume=true`` (it continues from its last checkpoint)."""
        args = [*self.args, f"hydra.sweep.dir={self.run_dir.parent}", f"hydra.sweep.subdir={self.run_dir.name}"]
        if self.script == "fit.py" and (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            args.append("resume=true")
        return args


class JobFailed(ConfigError):
    """A run failed; its log is named in the message (finished runs are kept)."""


#: the launchers of the hydra-joblib-launcher and hydra-submitit-launcher plugins
LAUNCHERS = ("joblib", "submitit_local", "submitit_slurm")
#: scripts/<script> -> its Hydra config
CONFIG_OF = {"fit.py": "fit", "evaluate.py": "evaluate"}


def fit_task(cfg) -> None:
    """The task of scripts/fit.py (what the launcher runs for a fit.py job)."""
    from diffseg.drivers.run import fit

    fit(cfg)


def evaluate_task(cfg) -> None:
    """The task of scripts/evaluate.py."""
    from diffseg.drivers.run import evaluate

    evaluate(cfg)


TASKS = {"fit": fit_task, "evaluate": evaluate_task}


def launcher_overrides(launcher: str, parallel: int, extra: Sequence[str] = ()) -> list[str]:
    """``hydra/launcher=<launcher>`` and its parallelism (joblib: ``n_jobs``), then the user's ``hydra.launcher.*``
    overrides (e.g. ``hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1`` for SLURM)."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher: expected one of {' | '.join(LAUNCHERS)}, got {launcher!r}")
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"jobs: expected an int >= 1, got {parallel!r}")
    own = [f"hydra/launcher={launcher}"] + ([f"hydra.launcher.n_jobs={parallel}"] if launcher == "joblib" else [])
    return [*own, *extra]


def compose_launch_config(config_name: str, overrides: Sequence[str], sweep_dir: Path):
    """(Hydra instance, the MULTIRUN config of ``config_name`` with the launcher overrides). The caller clears
    GlobalHydra afterwards."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    GlobalHydra.instance().clear()
    hydra = Hydra.create_main_hydra2(task_name=config_name,
                                     config_search_path=create_config_search_path(str(REPO / "experiments")))
    cfg = hydra.compose_config(config_name, [*overrides, f"hydra.sweep.dir={sweep_dir}"], run_mode=RunMode.MULTIRUN,
                               with_log_configuration=False)
    return hydra, cfg


def launch(jobs: Sequence[Job], config_name: str, overrides: Sequence[str], sweep_dir: Path) -> list[BaseException]:
    """Hand ``jobs`` (all of one script) to the launcher configured by ``overrides``; returns their errors."""
    from hydra._internal.callbacks import Callbacks
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins
    from hydra.core.utils import JobStatus
    from hydra.types import HydraContext

    hydra, cfg = compose_launch_config(config_name, overrides, sweep_dir)
    try:
        context = HydraContext(config_loader=hydra.config_loader, callbacks=Callbacks(cfg))
        launcher = Plugins.instance().instantiate_launcher(hydra_context=context, task_function=TASKS[config_name],
                                                           config=cfg)
        returns = launcher.launch([job.overrides() for job in jobs], initial_job_idx=0)
    finally:
        GlobalHydra.instance().clear()
    errors = []
    for job, ret in zip(jobs, returns):
        if ret.status == JobStatus.FAILED or not run_is_finished(job.run_dir):
            cause = getattr(ret, "_return_value", None)
            errors.append(JobFailed(f"{job.name} failed: {cause!r}; its log: the .log file in {job.run_dir}"))
        else:
            print(f"[ok  ] {job.name}", flush=True)
    return errors


def run_jobs(jobs: Iterable[Job], parallel: int = 1, launcher: str = "joblib", extra: Sequence[str] = (),
             sweep_dir: Path | None = None) -> None:
    """Run jobs through the Hydra launcher, each once the jobs it depends on have finished (one launch per
    wave of ready jobs and script); finished runs are skipped. After a failed wave nothing more starts and the
    first failure is raised."""
    overrides = launcher_overrides(launcher, parallel, extra)
    pending = {j.name: j for j in jobs}
    unknown = {d for j in pending.values() for d in j.after} - set(pending)
    if unknown:
        raise ConfigError(f"jobs depend on jobs that are not scheduled: {sorted(unknown)}")
    done = {n for n, j in pending.items() if run_is_finished(j.run_dir)}
    for name in sorted(done):
        print(f"[done] {name}: {pending.pop(name).run_dir} (finished earlier, not re-run)", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS")
    if launcher == "joblib" and parallel > 1 and threads is None:  # share the cores between the parallel runs
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    try:
        while pending:
            ready = [j for j in pending.values() if set(j.after) <= done]
            if not ready:
                raise ConfigError(f"jobs left waiting on jobs that did not finish: {sorted(pending)}")
            for script in sorted({j.script for j in ready}):
                wave = [j for j in ready if j.script == script]
                for job in wave:
                    job.run_dir.mkdir(parents=True, exist_ok=True)
                    print(f"[run ] {job.name}: {script} {' '.join(job.overrides())}", flush=True)
                errors = launch(wave, CONFIG_OF[script], overrides, sweep_dir or wave[0].run_dir.parent)
                if errors:
                    raise errors[0]
                for job in wave:
                    done.add(job.name)
                    pending.pop(job.name)
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)


def check_overrides_compose(config_name: str, overrides: Sequence[str], what: str) -> None:
    """Compose ``config_name`` with ``overrides`` (no training): a typo stops the driver before any run."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
            compose(config_name, overrides=[*overrides, "paths.output_dir=/dev/null"])
    except Exception as err:  # noqa: BLE001 - Hydra composition errors
        raise ConfigError(f"{what}: the overrides {list(overrides)} do not compose: {err}") from None
