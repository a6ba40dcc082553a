"""Atomic checkpoints, and rebuilding a model from a checkpoint alone.

Every checkpoint carries the resolved run config (``diffseg_config``), so evaluate.py, refine.py
and compare.py rebuild exactly the trained model without the user repeating its overrides.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

CONFIG_KEY = "diffseg_config"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file in the target folder, fsync, then os.replace.

    A run killed at any moment leaves either the previous checkpoint or the new one, never a
    truncated file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
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


class ConfigInCheckpoint(Callback):
    """Stores the resolved run config in every checkpoint."""

    def __init__(self, cfg: DictConfig):
        self.cfg = OmegaConf.to_container(cfg, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint[CONFIG_KEY] = self.cfg


class FinalCheckpoint(Callback):
    """Writes ``last.ckpt`` when training ends or is stopped by a signal: ``checkpoint_every`` saves
    every N steps only, so a run whose max_steps is not a multiple of N would otherwise end with a
    stale (or no) last.ckpt."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 and not trainer.interrupted:
            trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes (atomically)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Stopped by SIGTERM (a cluster's pre-emption, ``kill``) or Ctrl-C: keep the progress in
        last.ckpt so that ``resume=true`` continues from here. Never after an error (NaN weights)."""
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)


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
    if CONFIG_KEY not in ckpt:
        raise ConfigError(f"ckpt={path}: has no diffseg config; was it written by scripts/fit.py?")
    return ckpt, OmegaConf.create(ckpt[CONFIG_KEY])
