"""Console entry points of the package (pyproject.toml ``[project.scripts]``): ``diffseg-fit``,
``diffseg-evaluate``, ``diffseg-check-data``, ``diffseg-refine``, ``diffseg-predict``, ``diffseg-compare`` and
``diffseg-ablate``
take the same arguments as ``python scripts/<name>.py``, which call these functions.

The Hydra configs are the repository's ``experiments/``, given to Hydra as an absolute path (``CONFIG_DIR``:
Hydra would read a relative path as a Python package when the function is called as an installed console
script), so the package is installed from its repository with ``pip install -e .``. Hydra names each job
after its root config (``hydra.job.name`` in experiments/{fit,evaluate,refine}.yaml), not after this file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from diffseg.drivers.cli import run_cli

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"
CONFIG_PATH = str(CONFIG_DIR)


def _check_config_dir() -> None:
    if not (CONFIG_DIR / "fit.yaml").is_file():
        sys.exit(f"error: diffseg's Hydra configs are not at {CONFIG_DIR}: install the package from its "
                 "repository with `pip install -e .` (the configs live in the repository's experiments/)")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit")
def _fit(cfg: DictConfig) -> float:
    from diffseg.drivers.run import fit as fit_run

    metrics = run_cli(fit_run, cfg)
    return metrics[cfg.optimized_metric]  # a validation metric, for Hydra sweepers (never a test one)


def fit() -> float:
    """Train and test one model: diffseg-fit experiment=NAME [key=value ...]"""
    _check_config_dir()
    return _fit()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="evaluate")
def _evaluate(cfg: DictConfig) -> None:
    from diffseg.drivers.run import evaluate as evaluate_run

    run_cli(evaluate_run, cfg)


def evaluate() -> None:
    """Test a trained checkpoint: diffseg-evaluate ckpt=DIR/checkpoints/best.ckpt (or ckpt=DIR)
    [+overrides.KEY=VALUE ...] [sweep.steps=[..] sweep.samples=[..]]"""
    _check_config_dir()
    _evaluate()


def _check(cfg: DictConfig) -> None:
    from diffseg.drivers.run import build_datamodule

    dm = build_datamodule(cfg)
    mode = "fast" if cfg.check_data == "fast" else "full"
    dm.check(fast=mode == "fast")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    print(f"ok: {dm.root} ({mode} check) - {sum(sizes.values())} cases {sizes}, {dm.spatial_dims}D, "
          f"{dm.in_channels} channels, classes {dm.class_names}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="fit")
def _check_data(cfg: DictConfig) -> None:
    run_cli(_check, cfg)


def check_data() -> None:
    """Verify a data set and list every problem with its file: diffseg-check-data data=brats data.root=ROOT
    [check_data=fast]. Exit status 0 when it is clean, 2 when a problem was found."""
    _check_config_dir()
    # the check writes nothing: keep Hydra's run folder out of the way unless the user sets one
    if not any(a.startswith("hydra.run.dir") for a in sys.argv[1:]):
        sys.argv += ["hydra.run.dir=${oc.env:TMPDIR,/tmp}/diffseg_check_data", "hydra.output_subdir=null",
                     "hydra/job_logging=none", "hydra/hydra_logging=none"]
    if not any(a.startswith("check_data=") for a in sys.argv[1:]):
        sys.argv.append("check_data=full")
    _check_data()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="refine")
def _refine(cfg: DictConfig) -> None:
    from diffseg.drivers.refine import refine as refine_run

    run_cli(refine_run, cfg)


def refine() -> None:
    """Refine another model's masks with a SegRefiner checkpoint: diffseg-refine ckpt=... images=DIR
    coarse=DIR out=DIR [masks=DIR] [steps=K] [local=false]"""
    _check_config_dir()
    _refine()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _predict(cfg: DictConfig) -> None:
    from diffseg.drivers.predict import predict as predict_run

    run_cli(predict_run, cfg)


def predict() -> None:
    """Segment new data with a trained model: diffseg-predict ckpt=RUN_DIR_OR_CKPT input=FOLDER out=DIR
    [coarse=DIR_OR_RUN] [trainer=gpu|ddp] (outputs in the input's grid and label values)"""
    _check_config_dir()
    _predict()


def compare() -> None:
    """Compare methods on one split: diffseg-compare experiments=[unet_brats,imgx_brats,...] [options]"""
    from diffseg.drivers.compare import compare as compare_run

    run_cli(compare_run, sys.argv[1:])


def ablate() -> None:
    """Reproduce a paper's ablation grid: diffseg-ablate ablation=imgx|segdiff|segrefiner [seeds=3] [options]"""
    from diffseg.drivers.ablate import ablate as ablate_run

    run_cli(ablate_run, sys.argv[1:])
