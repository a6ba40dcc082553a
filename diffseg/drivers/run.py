"""Build the datamodule, the model and the trainer from a composed config; train, test, write outputs.

scripts/fit.py is a thin Hydra entry point around ``fit``. Outputs of a run in DIR
(``hydra.run.dir``): config.yaml (resolved), splits.json, checkpoints/{best,last}.ckpt,
metrics.json (test metrics of the best checkpoint), test_cases.csv, run_info.json (parameters, training
time, prediction seconds per case, peak memory), csv/ logs, wandb/, plots/.
"""
from __future__ import annotations

import csv
import logging
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

import diffseg.drivers.cli  # noqa: F401 - registers the config resolvers (${sum:...})
from diffseg.data.datamodule import SegDataModule
from diffseg.data.resumable import RNGStateInCheckpoint
from diffseg.metrics.scoring import scalar_view
from diffseg.utils.checkpoint import AtomicCheckpointIO, LastCheckpointOnInterrupt
from diffseg.utils.errors import ConfigError
from diffseg.utils.outputs import atomic_write_text, write_json

log = logging.getLogger("diffseg")

DATA_INFO_KEYS = ("spatial_dims", "in_channels", "num_classes", "class_names", "regions")


def check_data_root(cfg: DictConfig) -> None:
    """An unset ``data.root`` stops with one message naming the data source's expected layout and
    its built-in synthetic alternative (e.g. BraTS: case folders ...; data=brats_synthetic)."""
    if not OmegaConf.is_missing(cfg.data, "root"):
        return
    try:
        source = instantiate(cfg.data.source, root="ROOT")  # describes the layout; touches no files
    except Exception:  # noqa: BLE001 - fall back to the generic message of diffseg.drivers.cli
        return
    msg = f"data.root is not set: point it at your {source.title} data, data.root=ROOT with {source.layout}"
    if source.synthetic_hint:
        msg += f"; or try the built-in synthetic data with {source.synthetic_hint}"
    raise ConfigError(msg)


def build_datamodule(cfg: DictConfig) -> SegDataModule:
    """Instantiate ``cfg.data`` and fill the data-set description keys that were left null, so that
    model configs can interpolate ``${data.in_channels}`` and friends."""
    dm: SegDataModule = instantiate(cfg.data, _convert_="all")
    with open_dict(cfg):
        for key in DATA_INFO_KEYS:
            if cfg.data.get(key) is None:
                value = getattr(dm, key)
                cfg.data[key] = list(value) if isinstance(value, tuple) else value
    return dm


def build_model(cfg: DictConfig) -> L.LightningModule:
    """``cfg.model`` instantiated with its networks, optimiser and schedule left as configs (the model
    builds them), so that they and the resolved run config (``run_config``) are the model's saved
    hyper-parameters: ``Model.load_from_checkpoint(ckpt)`` rebuilds it from a checkpoint alone."""
    for key in ("spatial_dims", "in_channels", "num_classes"):
        if cfg.data.get(key) is None:
            raise ConfigError(f"data.{key} is unknown: build the datamodule first (diffseg.drivers.run.build_datamodule)")
    return instantiate(OmegaConf.to_container(cfg.model, resolve=True), _recursive_=False, _convert_="all",
                       run_config=OmegaConf.to_container(cfg, resolve=True))


WANDB_ID_FILE = ".wandb_id"


def _wandb_id(out_dir: Path, resume: bool) -> str:
    """One W&B run per output directory: a resumed run continues the same W&B run (its id is kept in
    DIR/.wandb_id, written by ``write_run_files``)."""
    path = out_dir / WANDB_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    import secrets

    # a `wandb agent` (W&B sweep) assigns the run id through WANDB_RUN_ID: keep it, or the run
    # would leave its sweep; otherwise a new id (8 lowercase alphanumerics, as W&B's own)
    return os.environ.get("WANDB_RUN_ID") or secrets.token_hex(4)


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if lcfg is None:
            continue
        kwargs: dict[str, Any] = {}
        if "wandb" in str(lcfg.get("_target_", "")).lower():
            kwargs["id"] = _wandb_id(out_dir, bool(cfg.get("resume", False)))
        loggers.append(instantiate(lcfg, **kwargs))
    return loggers


def build_callbacks(cfg: DictConfig, out_dir: Path, loggers: list) -> list:
    """The ``callbacks`` group (best/last checkpoints, lr monitor, early stopping ...), then the final
    last.ckpt that resuming relies on."""
    callbacks = []
    for name, ccfg in (cfg.get("callbacks") or {}).items():
        if ccfg is None:
            continue
        callback = instantiate(ccfg)
        if isinstance(callback, LearningRateMonitor) and not loggers:
            log.info("callbacks.%s: no logger is configured, so the learning rate is not logged", name)
            continue
        callbacks.append(callback)
    # resuming reproduces the uninterrupted run: the global RNG states travel in every checkpoint
    return callbacks + [RNGStateInCheckpoint(), LastCheckpointOnInterrupt(out_dir / "checkpoints")]


def best_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that monitors a metric (checkpoints/best.ckpt), if any."""
    return next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)


def check_optimized_metric(metric: str) -> None:
    if not str(metric).startswith("val/"):
        raise ConfigError(f"optimized_metric={metric}: expected a validation metric (val/...): choices are made "
                          "on the validation split, never on test")


def optimized_value(trainer: L.Trainer, metric: str) -> float:
    """The value of ``metric`` (a val/ metric) for Hydra sweepers: at the best checkpoint when it is the
    monitored metric, else at the last validation."""
    check_optimized_metric(metric)
    best = best_checkpoint_callback(trainer)
    if best is not None and best.monitor == metric and best.best_model_score is not None:
        return float(best.best_model_score)
    value = trainer.callback_metrics.get(metric)
    return float(value) if value is not None else float("nan")


def build_trainer(cfg: DictConfig, out_dir: Path, *, loggers: list | None = None, training: bool = True) -> L.Trainer:
    """The Trainer of ``cfg.trainer``. Once it is built, Lightning's ``rank_zero_only.rank`` is this
    process's global rank (also on nodes > 0 of a multi-node run), which the writers here rely on."""
    callbacks = build_callbacks(cfg, out_dir, loggers or []) if training else []
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers if loggers else False,
                       plugins=[AtomicCheckpointIO()], default_root_dir=str(out_dir), _convert_="all")


def write_test_outputs(model, out_dir: Path) -> dict[str, float]:
    metrics = {k: float(v) for k, v in sorted(model.test_results.items())}
    _write_test_files(model, out_dir, metrics)
    return metrics


@rank_zero_only
def _write_test_files(model, out_dir: Path, metrics: dict[str, float]) -> None:
    write_json(out_dir / "metrics.json", metrics)
    rows = [{"output": r["_output"], **scalar_view(r)} for r in model.test_records]
    if rows:
        keys = ["case_id", "output"] + sorted({k for r in rows for k in r} - {"case_id", "output"})
        path = out_dir / "test_cases.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys, restval="")
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: (r["output"], r["case_id"])))


def peak_memory_mb(device: torch.device | None = None) -> tuple[float, str]:
    """(peak MiB, what was measured): CUDA allocator peak on a GPU, else the process's peak RSS."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_max_rss"  # Linux: KiB


def write_run_info(model, out_dir: Path, train_seconds: float | None = None) -> dict[str, Any]:
    """DIR/run_info.json: the cost side of a run (compare.py's leaderboard reads it): network
    parameters (the EMA copy not counted), training wall seconds (of this process; a resumed run
    counts its own part), mean prediction seconds per test case, peak memory and the device."""
    net = getattr(model, "_raw_net", model.net)
    memory, memory_kind = peak_memory_mb(model.device)
    info = {
        "parameters": int(sum(p.numel() for p in net.parameters())),
        "train_seconds": None if train_seconds is None else round(float(train_seconds), 3),
        "test_seconds_per_case": model.test_seconds_per_case,
        "peak_memory_mb": round(memory, 1),
        "peak_memory_kind": memory_kind,
        "device": str(model.device),
    }
    rank_zero_only(write_json)(out_dir / "run_info.json", info)
    return info


def format_table(metrics: dict[str, float], title: str = "test metrics (best checkpoint)") -> str:
    width = max([len(k) for k in metrics] + [len(title)])
    lines = [title, "-" * (width + 12)]
    lines += [f"{k:<{width}}  {v:>10.4f}" for k, v in metrics.items()]
    return "\n".join(lines)


@rank_zero_only
def write_run_files(cfg: DictConfig, dm: SegDataModule, out_dir: Path, loggers: list) -> None:
    """DIR/config.yaml, splits.json and the W&B run id (.wandb_id), by global rank 0 (call it once the
    Trainer is built)."""
    atomic_write_text(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    dm.write_splits(out_dir)
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            atomic_write_text(out_dir / WANDB_ID_FILE, str(logger.version))  # the id, without starting the run


def fit(cfg: DictConfig) -> dict[str, float]:
    """Train, then test the best checkpoint. Returns the test metrics (also in DIR/metrics.json) and the
    value of ``cfg.optimized_metric`` (a validation metric, see ``optimized_value``)."""
    out_dir = Path(cfg.paths.output_dir)
    check_data_root(cfg)
    check_optimized_metric(cfg.optimized_metric)
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision("high")

    dm = build_datamodule(cfg)
    if cfg.check_data not in ("off", "fast", "full"):
        raise ConfigError(f"check_data: expected off | fast | full, got {cfg.check_data!r}")
    if cfg.check_data != "off":
        dm.check(fast=cfg.check_data == "fast")
    model = build_model(cfg)

    last = out_dir / "checkpoints" / "last.ckpt"
    ckpt_path = None
    if not cfg.resume and last.is_file():
        # Lightning's OnExceptionCheckpoint makes fit(ckpt_path=None) continue from the newest last checkpoint
        # by itself: a new run must not start (or silently continue) in a folder that holds another run
        raise ConfigError(f"hydra.run.dir={out_dir} already holds a run ({last}): pass resume=true to continue "
                          "it, or choose another output folder (hydra.run.dir=...)")
    if cfg.resume:
        if last.is_file():
            ckpt_path = str(last)
            log.info("resuming from %s", last)
        else:
            log.warning("resume=true but %s does not exist: starting a new run", last)

    loggers = build_loggers(cfg, out_dir)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = build_trainer(cfg, out_dir, loggers=loggers)
    write_run_files(cfg, dm, out_dir, loggers)
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    train_seconds = time.perf_counter() - start

    best_callback = best_checkpoint_callback(trainer)
    best = best_callback.best_model_path if best_callback is not None else ""
    optimized = optimized_value(trainer, cfg.optimized_metric)
    test_ckpt = best if best and Path(best).is_file() else (str(last) if last.is_file() else None)
    trainer.test(model, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
    metrics = write_test_outputs(model, out_dir)
    write_run_info(model, out_dir, train_seconds)
    if trainer.is_global_zero:
        print(format_table(metrics, f"test metrics ({Path(test_ckpt).name if test_ckpt else 'final weights'})"))
    for logger in loggers:
        if hasattr(logger, "experiment") and hasattr(logger, "finalize"):
            logger.finalize("success")
    return {**metrics, cfg.optimized_metric: optimized}


def load_model(ckpt_path: str | os.PathLike, overrides: DictConfig | dict | None = None):
    """(model, run config) from a checkpoint alone, the Lightning way (``Model.load_from_checkpoint``);
    ``overrides`` are merged into the stored run config (e.g. other sampling steps, another data root)
    and its model part replaces the saved hyper-parameters."""
    from hydra.utils import get_class

    from diffseg.utils.checkpoint import read_checkpoint, resolve_checkpoint

    _, cfg = read_checkpoint(ckpt_path)
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    model_kwargs = OmegaConf.to_container(cfg.model, resolve=True)
    model_class = get_class(model_kwargs.pop("_target_"))
    try:
        model = model_class.load_from_checkpoint(resolve_checkpoint(ckpt_path), map_location="cpu",
                                                 run_config=OmegaConf.to_container(cfg, resolve=True), **model_kwargs)
    except RuntimeError as err:  # load_state_dict: missing / unexpected / mis-shaped weights
        raise ConfigError(f"ckpt={ckpt_path}: weights do not fit the model ({err})") from err
    return model, cfg


def test_checkpoint(cfg: DictConfig, overrides: dict | DictConfig, out_dir: Path) -> tuple[dict[str, float], float]:
    """Test ``cfg.ckpt`` with config ``overrides`` on ``cfg.trainer``; writes metrics.json,
    test_cases.csv, run_info.json and plots into ``out_dir``. Returns (metrics, seconds per case)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    overrides = OmegaConf.to_container(OmegaConf.create(overrides), resolve=True)
    overrides.setdefault("model", {})["output_dir"] = str(out_dir)
    model, run_cfg = load_model(cfg.ckpt, overrides)
    with open_dict(run_cfg):
        run_cfg.paths.output_dir = str(out_dir)
        run_cfg.trainer = cfg.trainer  # evaluation hardware is chosen now (trainer=cpu|gpu|ddp...)
    dm = build_datamodule(run_cfg)
    trainer = build_trainer(run_cfg, out_dir, loggers=[], training=False)
    trainer.test(model, datamodule=dm, verbose=False)
    metrics = write_test_outputs(model, out_dir)
    write_run_info(model, out_dir)
    if trainer.is_global_zero:
        print(format_table(metrics, f"test metrics ({Path(cfg.ckpt).name})"))
    return metrics, model.test_seconds_per_case


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint (``cfg.ckpt``) on the test split of its data set (or of ``data`` overrides):
    writes metrics.json / test_cases.csv / plots into the run directory, prints the table. With
    ``sweep.steps`` / ``sweep.samples`` set, runs the sampling sweep instead (diffseg.drivers.sweep)."""
    from diffseg.drivers.sweep import log_sweep, sampling_sweep

    out_dir = Path(cfg.paths.output_dir)
    overrides = cfg.get("overrides") or {}
    sweep = cfg.get("sweep") or {}
    if sweep.get("steps") is None and sweep.get("samples") is None:
        metrics, _ = test_checkpoint(cfg, overrides, out_dir)
        return metrics
    rows, columns, plots = sampling_sweep(cfg, lambda ov, d: test_checkpoint(cfg, ov, d))
    if rank_zero_only.rank == 0:
        log_sweep(build_loggers(cfg, out_dir), rows, columns, plots)
        print((out_dir / "sweep.md").read_text())
    return {f"steps={r['steps']},samples={r['samples']}": r for r in rows}
