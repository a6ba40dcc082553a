"""wandb_sweeps/: every W&B sweep spec runs scripts/fit.py with Hydra overrides, every cell of its
grid composes, and a run of its experiment reports the metric the spec optimises under that name."""
from __future__ import annotations

import itertools
from pathlib import Path

import lightning as L
import pytest
import yaml
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[2]
SPECS = sorted((REPO / "wandb_sweeps").glob("*.yaml"))


def grid(spec: dict) -> list[list[str]]:
    """Every cell of the spec as Hydra overrides (random/bayes ranges: their two ends)."""
    axes = []
    for key, p in spec["parameters"].items():
        if "value" in p:
            values = [p["value"]]
        elif "values" in p:
            values = list(p["values"])
        else:
            values = [p["min"], p["max"]]
        axes.append([f"{key}={_hydra_value(v)}" for v in values])
    return [list(cell) for cell in itertools.product(*axes)]


def _hydra_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    return str(v)


def compose_fit(overrides: list[str], out: Path | None = None):
    extra = [f"paths.output_dir={out}"] if out is not None else ["paths.output_dir=/tmp/unused"]
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        return compose("fit", overrides=[*overrides, *extra])


def test_the_required_specs_exist():
    names = {p.stem for p in SPECS}
    assert {"imgx_brats", "segdiff_folder2d", "segrefiner_folder2d"} <= names
    swept = {p.stem: set(yaml.safe_load(p.read_text())["parameters"]) for p in SPECS}
    assert {"model.diffusion.train_steps", "model.recycling"} <= swept["imgx_brats"]
    assert {"model.num_steps", "model.net.rrdb_blocks"} <= swept["segdiff_folder2d"]
    assert "model.num_steps" in swept["segrefiner_folder2d"]


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_spec_runs_fit_with_hydra_overrides_and_every_cell_composes(path):
    spec = yaml.safe_load(path.read_text())
    assert spec["program"] == "scripts/fit.py"
    assert "${args_no_hyphens}" in spec["command"] and "${program}" in spec["command"]
    assert spec["metric"]["goal"] in ("maximize", "minimize") and spec["metric"]["name"].startswith("val/")
    cells = grid(spec)
    assert len(cells) >= 2
    for cell in cells:
        cfg = compose_fit(cell)  # a key that does not exist fails here (Hydra: "Could not override")
        for override in cell:
            key, value = override.split("=", 1)
            if "." in key:  # a config value (not a group choice): it reached the composed config
                from omegaconf import OmegaConf

                assert str(OmegaConf.select(cfg, key)).lower().replace(" ", "") == value.lower(), override


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_a_run_reports_the_optimised_validation_metric_under_its_name(path, tmp_path_factory, monkeypatch):
    """Builds the first cell's data and (untrained) model and validates it on one case through the same
    code path as fit.py: the spec optimises a validation metric (never a test one), and that metric must be
    among the logged validation metrics."""
    from diffseg.drivers.run import build_datamodule, build_model, build_trainer

    spec = yaml.safe_load(path.read_text())
    monkeypatch.setenv("DIFFSEG_CACHE", str(tmp_path_factory.getbasetemp() / "sweep_cache"))
    out = tmp_path_factory.mktemp(path.stem)
    cell = [c for c in grid(spec)[0] if not c.startswith("logger")]
    cfg = compose_fit([*cell, "logger=none", "+trainer.limit_val_batches=1"], out)
    L.seed_everything(0)
    dm = build_datamodule(cfg)
    model = build_model(cfg)
    trainer = build_trainer(cfg, out, training=False)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert spec["metric"]["name"].startswith("val/")
    assert spec["metric"]["name"] in trainer.callback_metrics, sorted(trainer.callback_metrics)
