"""Shared behaviour of the command-line scripts: bad input ends with one readable message."""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable

from diffseg.utils.errors import USER_ERRORS

log = logging.getLogger("diffseg")


def _sum(*values):
    """``${sum:a,b,...}``, e.g. a denoiser's input width = image channels + mask channels; null while
    a term is still unknown (data keys are read from the files when the run starts)."""
    return None if any(v is None for v in values) else sum(values)


#: metrics where lower is better (checkpoint selection and early stopping minimise them)
LOWER_IS_BETTER = ("hd95", "ece", "loss")


def metric_mode(metric: str) -> str:
    """``${metric_mode:hd95}`` -> "min": lower is better for distances, calibration errors and losses
    (``hd95``, ``hd95/wt``, ``ece``, ``samples/3/ece``, ``loss``, ``bce``), higher for everything else."""
    parts = str(metric).split("/")
    return "min" if any(p in LOWER_IS_BETTER or p.endswith("loss") for p in parts) else "max"


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sum"):
        OmegaConf.register_new_resolver("sum", _sum)
    if not OmegaConf.has_resolver("metric_mode"):
        OmegaConf.register_new_resolver("metric_mode", metric_mode)


register_resolvers()  # the scripts import this module before Hydra composes their config


def run_cli(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Call ``fn``; a data/config/divergence error prints ``error: <message>`` and exits with status 2."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return fn(*args, **kwargs)
    except SIGTERMException:  # a SystemExit(None) that would exit 0 as if the run had finished
        print("error: stopped by SIGTERM; the progress is in checkpoints/last.ckpt: run the same command "
              "with resume=true to continue", file=sys.stderr, flush=True)
        sys.exit(128 + 15)
    except Exception as err:  # noqa: BLE001 - only user errors are reported briefly, others re-raised
        user = user_error(err)
        if user is None:
            raise
        print(f"error: {user}", file=sys.stderr, flush=True)
        sys.exit(2)


def user_error(err: BaseException) -> BaseException | str | None:
    """The user-facing error inside ``err`` (Hydra and Lightning wrap exceptions), or None."""
    from omegaconf.errors import MissingMandatoryValue

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, USER_ERRORS):
            return err
        if isinstance(err, MissingMandatoryValue):
            key = getattr(err, "full_key", "") or ""
            if key.startswith("data.root") or "data.root" in str(err) or key == "root":
                return (
                    "data.root is not set: point it at your data set, e.g. data.root=/data/BraTS2021 "
                    "(BraTS: ROOT/CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz; MSD: ROOT/dataset.json, imagesTr/, "
                    "labelsTr/; folder2d: ROOT/images/, ROOT/masks/), or try the built-in data with "
                    "data=brats_synthetic (3D) or data=shapes2d (2D)"
                )
            return f"config key {key or '?'} is missing: {err}"
        err = err.__cause__ or err.__context__
    return None
