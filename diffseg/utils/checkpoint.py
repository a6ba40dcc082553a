"""Atomic checkpoints, the last checkpoint of an interrupted run, and reading a checkpoint's run config.

Every checkpoint carries the model's hyper-parameters (``SegmentationModule.save_hyperparameters``):
the model config, so ``Model.load_from_checkpoint(path)`` rebuilds the trained model, and the resolved
run config (``hyper_parameters.run_config``), so evaluate.py, refine.py and compare.py also rebuild its
data without the user repeating the run's overrides.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from omegaconf import DictConfig, OmegaConf

HPARAMS_KEY = LightningModule.CHECKPOINT_HYPER_PARAMS_KEY  # "hyper_parameters"
RUN_CONFIG_KEY = "run_config"  # the SegmentationModule argument that holds the resolved run config


class AtomicCheckpointIO(TorchCheckpointIO):
    """Local files: torch.save into a temporary file in the TARGET folder, fsync, then os.replace.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    truncated file. Lightning's own TorchCheckpointIO (an fsspec transaction) stages the file in the
    system temp folder and ``shutil.move``s it, which is a copy, not an atomic rename, when /tmp and the
    run directory are on different file systems (a node's local /tmp, outputs on a shared file system:
    the usual cluster layout). Remote URLs (s3://, ...) go through Lightning's IO unchanged."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


class LastCheckpointOnInterrupt(OnExceptionCheckpoint):
    """Lightning's OnExceptionCheckpoint writing ``DIR/last.ckpt``, for interruptions only, and kept.

    - Stopped by SIGTERM (a cluster's pre-emption, ``kill``) or Ctrl-C: the progress goes to last.ckpt
      so that ``resume=true`` continues from there. Never after an error (e.g. NaN weights: the last
      good last.ckpt is kept), where OnExceptionCheckpoint would save on any exception.
    - At the end of training too: the ``last_checkpoint`` callback saves every ``checkpoint_every``
      steps only, so a run whose length is not a multiple of it would end with a stale last.ckpt.
    - The file is not removed at teardown (OnExceptionCheckpoint deletes it there): resuming needs it.
    """

    def __init__(self, dirpath: str | os.PathLike):
        super().__init__(str(dirpath), filename="last")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.global_step > 0:
            super().on_exception(trainer, pl_module, exception)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and not trainer.interrupted:
            trainer.save_checkpoint(self.ckpt_path)  # every rank calls it; rank 0 writes (atomically)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        pass


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory of fit.py: its checkpoints/best.ckpt, else last.ckpt
    (the one fit.py tested when no validation ran)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.ckpt", "last.ckpt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict, DictConfig]:
    """(checkpoint dict, run config) with a clear error for a missing or foreign file. ``path`` may
    be a run directory (``resolve_checkpoint``)."""
    from diffseg.utils.errors import ConfigError

    path = resolve_checkpoint(path)
    if not path.is_file():
        raise ConfigError(f"ckpt={path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise ConfigError(f"ckpt={path}: not a readable checkpoint ({type(err).__name__}: {err})") from err
    run_config = (ckpt.get(HPARAMS_KEY) or {}).get(RUN_CONFIG_KEY) if isinstance(ckpt, dict) else None
    if run_config is None:
        raise ConfigError(f"ckpt={path}: has no diffseg config (hyper_parameters.run_config); "
                          "was it written by scripts/fit.py?")
    return ckpt, OmegaConf.create(run_config)
