"""Sampling sweeps without retraining: ``scripts/evaluate.py ckpt=PATH sweep.steps=[..] sweep.samples=[..]``.

One test pass per step setting, with ``max(sweep.samples)`` samples of every window as one batch:
the running means of that batch (``samples/k`` outputs of the model) give every smaller sample
count, and each sample has its own noise generator (``SegmentationModule.sample_generators``), so
the row for k samples is the same as a separate run with ``num_samples=k``. Writes into DIR:
``sweep.csv`` (one row per (steps, samples) cell: every test metric and the prediction seconds per
case of the pass), ``sweep.md`` (the same table), ``plots/sweep_*.png``; each pass's own outputs
are in ``DIR/steps_<S>/``. With a logger (``logger=wandb``) the table and the plots are logged too.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from diffseg.utils.errors import ConfigError
from diffseg.utils.outputs import atomic_write_text, markdown_table

log = logging.getLogger("diffseg")

FIRST_COLUMNS = ("steps", "samples", "seconds_per_case")


def _int_list(value, key: str) -> list[int] | None:
    if value is None:
        return None
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ConfigError(f"{key}: expected a list of ints >= 1, e.g. {key}=[1,2,5], got {value!r}")
    return values


def sweep_keys(model_cfg: DictConfig) -> tuple[str, str | None]:
    """The model config keys that the sweep sets: (steps key, samples key or None)."""
    if "sampling" in model_cfg and "steps" in model_cfg.sampling:
        return "sampling.steps", "sampling.num_samples" if "num_samples" in model_cfg.sampling else None
    if "refine" in model_cfg and "steps" in model_cfg.refine:  # SegRefiner: reverse steps, one sample
        return "refine.steps", None
    raise ConfigError(f"sweep: the checkpoint's model ({model_cfg.get('_target_')}) has no sampling steps to "
                      "sweep (model.sampling.steps or model.refine.steps): sweeps apply to diffusion models")


def reported_metrics(results: dict[str, float]) -> dict[str, float]:
    """``test/<metric>`` -> ``<metric>`` for the final output (not the per-step / per-sample-count curves)."""
    return {k[len("test/"):]: v for k, v in results.items()
            if k.startswith("test/") and not k.startswith(("test/samples/", "test/step/"))}


def cell_metrics(results: dict[str, float], samples: int, max_samples: int) -> dict[str, float]:
    """The reported metrics of the running mean over the first ``samples`` of ``max_samples``:
    ``test/samples/<k>/<metric>``, or the final ``test/<metric>`` when k is the pass's sample count."""
    if samples == max_samples:
        return reported_metrics(results)
    prefix = f"test/samples/{samples}/"
    found = {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}
    if not found:
        raise RuntimeError(f"the {max_samples}-sample pass reported no {prefix}* metrics")
    return found


def write_table(out_dir: Path, rows: list[dict[str, Any]], title: str) -> list[str]:
    metrics = sorted({k for r in rows for k in r} - set(FIRST_COLUMNS))
    columns = [*FIRST_COLUMNS, *metrics]
    with open(out_dir / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    note = ("seconds_per_case: mean prediction time per test case of the pass that produced the row "
            "(one pass per step count, with the largest sample count; smaller counts are its running means)")
    atomic_write_text(out_dir / "sweep.md", f"# {title}\n\n{note}\n\n" + markdown_table(rows, columns))
    return columns


def plot_sweep(out_dir: Path, rows: list[dict[str, Any]], metric: str) -> list[Path]:
    """metric vs steps, metric vs samples, ECE vs samples, seconds per case vs steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = sorted({r["steps"] for r in rows})
    samples = sorted({r["samples"] for r in rows})
    plots = []

    def figure(name, x_key, y_key, group_key, groups, ylabel):
        if not any(y_key in r for r in rows):
            return
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for g in groups:
            pts = sorted((r[x_key], r[y_key]) for r in rows if r[group_key] == g and y_key in r)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{group_key}={g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        if x_key == "steps" and len(steps) > 1 and max(steps) / min(steps) >= 10:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "plots" / f"sweep_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        plots.append(path)

    figure(f"{metric}_vs_steps", "steps", metric, "samples", samples, f"test {metric}")
    figure(f"{metric}_vs_samples", "samples", metric, "steps", steps, f"test {metric}")
    figure("ece_vs_samples", "samples", "ece", "steps", steps, "test ECE (15 bins)")
    figure("seconds_vs_steps", "steps", "seconds_per_case", "samples", [samples[-1]], "seconds per case")
    return plots


def log_sweep(loggers: list, rows: list[dict[str, Any]], columns: list[str], plots: list[Path]) -> None:
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="sweep/table", columns=columns, data=[[r.get(c) for c in columns] for r in rows])
        if hasattr(logger, "log_image"):
            for path in plots:
                logger.log_image(key=f"sweep/{path.stem}", images=[str(path)])
        if not hasattr(logger, "log_table"):
            for i, row in enumerate(rows):
                logger.log_metrics({f"sweep/{k}": float(v) for k, v in row.items()
                                    if isinstance(v, (int, float))}, step=i)
        logger.save()
        if hasattr(logger, "finalize"):
            logger.finalize("success")


def sampling_sweep(cfg: DictConfig, test_pass) -> tuple[list[dict[str, Any]], list[str], list[Path]]:
    """Run the grid; returns (rows, columns, plot paths). ``test_pass(overrides, out_dir)`` tests the
    checkpoint with the given config overrides and returns (test metrics, seconds per case)
    (``diffseg.drivers.run.test_checkpoint``)."""
    from diffseg.utils.checkpoint import read_checkpoint

    out_dir = Path(cfg.paths.output_dir)
    steps_list = _int_list(cfg.sweep.get("steps"), "sweep.steps")
    samples_list = _int_list(cfg.sweep.get("samples"), "sweep.samples")
    _, run_cfg = read_checkpoint(cfg.ckpt)
    steps_key, samples_key = sweep_keys(run_cfg.model)
    if samples_list and samples_key is None and samples_list != [1]:
        raise ConfigError(f"sweep.samples: the model ({run_cfg.model._target_}) draws one sample per input; "
                          "leave sweep.samples unset")
    samples_list = sorted(set(samples_list or [OmegaConf.select(run_cfg.model, samples_key) or 1]
                              if samples_key else [1]))
    steps_list = steps_list or [OmegaConf.select(run_cfg.model, steps_key)]
    n_max = samples_list[-1]
    base = OmegaConf.to_container(cfg.overrides, resolve=True) if cfg.get("overrides") is not None else {}
    rows: list[dict[str, Any]] = []
    for steps in steps_list:
        overrides = OmegaConf.create(base)
        with open_dict(overrides):
            OmegaConf.update(overrides, f"model.{steps_key}", steps, force_add=True)
            if samples_key:
                OmegaConf.update(overrides, f"model.{samples_key}", n_max, force_add=True)
        log.info("sweep: %s=%s with %d sample(s)", steps_key, steps, n_max)
        results, seconds = test_pass(overrides, out_dir / f"steps_{steps}")
        for k in samples_list:
            rows.append({"steps": steps, "samples": k, "seconds_per_case": seconds,
                         **cell_metrics(results, k, n_max)})
    columns = write_table(out_dir, rows, f"sampling sweep of {cfg.ckpt}")
    metric = str(run_cfg.model.get("monitor", "dice"))
    plots = plot_sweep(out_dir, rows, metric)
    return rows, columns, plots
