"""Lightning and W&B conventions: every model loads the Lightning way, W&B follows the WANDB_* variables."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from diffseg.drivers.run import build_loggers, build_model
from diffseg.utils.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parents[2]

# the data description fit.py reads from the files, for the built-in data sets of the experiments below
SHAPES2D = {"spatial_dims": 2, "in_channels": 3, "num_classes": 2, "class_names": ["foreground"],
            "regions": {"foreground": [1]}}
BRATS = {"spatial_dims": 3, "in_channels": 4, "num_classes": 4, "class_names": ["wt", "tc", "et"],
         "regions": {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}}
MODELS = {  # one experiment per LightningModule (few sampling steps: the test predicts one window)
    "unet_folder2d": (["data=shapes2d"], SHAPES2D),
    "imgx_brats": (["data=brats_synthetic"], BRATS),
    "segdiff_folder2d": (["data=shapes2d", "model.sampling.steps=3"], SHAPES2D),
    "segrefiner_folder2d": (["data=shapes2d", "model.num_steps=3"], SHAPES2D),
}


def compose_fit(overrides: list[str], out: Path, data_info: dict | None = None):
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        cfg = compose("fit", overrides=[*overrides, f"paths.output_dir={out}"])
    for key, value in (data_info or {}).items():
        cfg.data[key] = value
    return cfg


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_loads_from_its_checkpoint_the_lightning_way(name, tmp_path):
    """``Model.load_from_checkpoint(ckpt)`` with nothing else rebuilds the model that wrote it: the same
    class, hyper-parameters and weights, and the same prediction of a window for the same noise."""
    data, info = MODELS[name]
    cfg = compose_fit([f"experiment={name}", *data, "scale=tiny", "logger=none"], tmp_path, info)
    L.seed_everything(0)
    model = build_model(cfg)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    loaded = type(model).load_from_checkpoint(path)
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    assert loaded.hparams.run_config["model"]["_target_"] == cfg.model._target_
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert read_checkpoint(path)[1].data.num_classes == info["num_classes"]  # the run config rides along

    roi = model.roi_size
    channels = info["in_channels"] + (1 if name.startswith("segrefiner") else 0)  # + the coarse mask
    image = torch.rand(1, channels, *roi, generator=torch.Generator().manual_seed(1))
    outputs = []
    for m in (model, loaded):
        m.eval()
        m.seed_case("case0", "cpu")
        with torch.no_grad():
            outputs.append(m.predict_window(image)["final"])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def _wandb_logger(monkeypatch, tmp_path, env: dict[str, str], overrides: tuple[str, ...] = ()):
    for key in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = compose_fit(["logger=wandb", *overrides], tmp_path)
    (logger,) = build_loggers(cfg, tmp_path)
    return logger


def test_wandb_follows_the_wandb_environment_variables(monkeypatch, tmp_path):
    """WANDB_MODE / WANDB_PROJECT / WANDB_ENTITY set by the user (or by a `wandb agent`) win over the
    config's defaults; without them the run is offline in project diffseg; the keys still override."""
    logger = _wandb_logger(monkeypatch, tmp_path, {"WANDB_MODE": "online", "WANDB_PROJECT": "brats-study",
                                                   "WANDB_ENTITY": "my-lab"})
    init = logger._wandb_init  # the wandb.init arguments (no network is touched here)
    assert (init["mode"], init["project"], init["entity"]) == ("online", "brats-study", "my-lab")
    assert not logger._offline  # Lightning's offline=True would set WANDB_MODE=dryrun

    init = _wandb_logger(monkeypatch, tmp_path, {})._wandb_init
    assert (init["mode"], init["project"], init["entity"]) == ("offline", "diffseg", None)
    init = _wandb_logger(monkeypatch, tmp_path, {"WANDB_MODE": "online"},
                         ("logger.wandb.mode=disabled", "logger.wandb.entity=team"))._wandb_init
    assert (init["mode"], init["entity"]) == ("disabled", "team")


def test_wandb_run_honours_wandb_mode_and_project(monkeypatch, tmp_path):
    """A real W&B run (no network: WANDB_MODE=disabled) started by the logger fit.py builds."""
    import wandb

    logger = _wandb_logger(monkeypatch, tmp_path, {"WANDB_MODE": "disabled", "WANDB_PROJECT": "brats-study"})
    try:
        run = logger.experiment
        assert run.settings.mode == "disabled" and run.project == "brats-study"
        assert "WANDB_MODE" not in logger._wandb_init or logger._wandb_init["mode"] == "disabled"
    finally:
        wandb.finish()


def test_2d_panels_are_drawn_in_the_files_orientation(tmp_path, monkeypatch):
    """An asymmetric, non-square PNG (an L-shaped object in the top-right corner) loaded by the data
    pipeline and drawn by the panel writer appears as the file does: image, truth and prediction equal the
    file's pixel rows and columns (imshow draws row 0 at the top), not mirrored on the diagonal."""
    import matplotlib.axes
    import numpy as np
    from monai import transforms as mt
    from PIL import Image

    from diffseg.data.labels import binary_label_map
    from diffseg.data.transforms import deterministic_transforms
    from diffseg.models.base import SegmentationModule
    from diffseg.utils.outputs import save_panel_grid

    mask = np.zeros((24, 40), np.uint8)
    mask[2:6, 25:38] = 255   # the L's bar, along the top edge
    mask[2:14, 34:38] = 255  # its leg, down the right side
    gray = np.where(mask > 0, 200, 30).astype(np.uint8)
    gray[20:, :5] = 120      # a mark in the bottom-left corner
    Image.fromarray(gray).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    load = mt.Compose(deterministic_transforms(spatial_dims=2, label_map=binary_label_map(), patch_size=(16, 16)))
    case = load({"image": str(tmp_path / "image.png"), "label": str(tmp_path / "mask.png")})
    image, label = case["image"][None], case["label"][0].long()
    probs = torch.nn.functional.one_hot(label, 2).movedim(-1, 0)[None].float()  # a perfect prediction

    model = SegmentationModule.__new__(SegmentationModule)  # panel reads spatial_dims only
    model.spatial_dims = 2
    drawn = []
    imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda ax, arr, **kw: drawn.append((np.asarray(arr), kw.get("origin"))) or imshow(ax, arr, **kw))
    save_panel_grid(tmp_path / "panels.png", [(0, "case", *SegmentationModule.panel(model, image, label, {"final": probs}))])
    (img, _), (gt, _), (pred, _) = drawn
    assert all(origin in (None, "upper") for _, origin in drawn)
    assert img.shape == gt.shape == pred.shape == gray.shape
    np.testing.assert_array_equal(gt, mask > 0)
    np.testing.assert_array_equal(pred, mask > 0)
    assert np.corrcoef(img.ravel(), gray.ravel().astype(float))[0, 1] > 0.99


@pytest.mark.parametrize("command,config", [("diffseg-fit", "fit"), ("diffseg-evaluate", "evaluate"),
                                            ("diffseg-predict", "predict")])
def test_console_entry_points_resolve_and_find_their_configs(command, config, tmp_path):
    """The installed console commands (pyproject [project.scripts]) load, and run from any folder: Hydra
    finds the configs (--help lists the config groups and the composed root config)."""
    import os
    import subprocess
    import sys
    from importlib.metadata import entry_points

    from diffseg.drivers import entry_points as entry_module

    (ep,) = [ep for ep in entry_points(group="console_scripts") if ep.name == command]
    assert ep.load() is getattr(entry_module, config)
    script = Path(sys.executable).parent / command
    assert script.is_file(), f"{script}: not installed (pip install -e .)"
    proc = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HYDRA_FULL_ERROR="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{config} is powered by Hydra" in proc.stdout
    assert "trainer: cpu, ddp, ddp_cpu, gpu" in proc.stdout and f"task_name: {config}" in proc.stdout
    assert not list(tmp_path.iterdir())  # --help writes no run folder
