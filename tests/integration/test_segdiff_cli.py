"""SegDiff end to end through scripts/fit.py (docs/methods.md §2): training beats the untrained model on the
built-in shapes, and the MoNuSeg experiment runs on any folder
of images/masks with the metrics of the running mean after 1..N samples (IoU, Dice, mBA, FBound, WCov, ECE)
and the saved uncertainty maps."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import read_metrics, run_script
from diffseg.data.synthetic import write_shapes2d

pytestmark = pytest.mark.slow

SHAPES = ["experiment=segdiff_folder2d", "data=shapes2d", "scale=tiny", "logger=csv",
          "trainer.enable_progress_bar=false"]
NUM_SAMPLES = 3  # sizes/model/segdiff_tiny.yaml (T = 50 there)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("segdiff_trained")
    run_script("fit.py", *SHAPES, f"hydra.run.dir={out}", cache=cache_dir)
    return out


@pytest.fixture(scope="module")
def trained(trained_dir):
    return read_metrics(trained_dir)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, cache_dir):
    """The same seed and configuration with no optimiser step: the initial weights, tested the same way."""
    out = tmp_path_factory.mktemp("segdiff_untrained")
    run_script("fit.py", *SHAPES, "trainer.max_steps=0", f"hydra.run.dir={out}", cache=cache_dir)
    return read_metrics(out)


def test_training_beats_the_untrained_model(trained, untrained):
    assert trained["test/num_cases"] == untrained["test/num_cases"] == 13
    # measured (sizes/model/segdiff_tiny.yaml and sizes/experiment/segdiff_folder2d_tiny.yaml, 1600 steps,
    # seed 0): IoU 0.290 / Dice 0.378 trained vs
    # 0.111 / 0.197 untrained (the zero-initialised network predicts ε = 0: noise, about the foreground
    # fraction). An image-blind model (blobs anywhere) scores about the untrained IoU, so it fails here.
    assert trained["test/iou"] >= max(untrained["test/iou"] + 0.1, 2.0 * untrained["test/iou"]), \
        (trained["test/iou"], untrained["test/iou"])
    assert trained["test/dice"] > untrained["test/dice"] + 0.1
    for key in ("test/fbound", "test/wcov"):  # SegDiff's own measures are reported (docs/methods.md §2)
        assert 0.0 <= trained[key] <= 1.0 and 0.0 <= untrained[key] <= 1.0, key


def test_monuseg_experiment_on_a_folder(tmp_path, cache_dir):
    root = write_shapes2d(tmp_path / "monuseg_like", num_cases=12, size=64, seed=3)
    out = tmp_path / "run"
    run_script("fit.py", "experiment=segdiff_monuseg", "data=folder2d", f"data.root={root}", "scale=tiny",
               "trainer.max_steps=16", "trainer.val_check_interval=8", "save_predictions=true", "logger=csv",
               "trainer.enable_progress_bar=false",
               f"hydra.run.dir={out}", cache=cache_dir)
    metrics = read_metrics(out)
    for prefix in ["", *(f"samples/{k}/" for k in range(1, NUM_SAMPLES + 1))]:
        for name in ("iou", "dice", "mba", "fbound", "wcov", "ece"):
            key = f"test/{prefix}{name}"
            assert key in metrics and np.isfinite(metrics[key]), key
    assert f"test/samples/{NUM_SAMPLES + 1}/iou" not in metrics
    assert metrics["test/iou"] == metrics[f"test/samples/{NUM_SAMPLES}/iou"]  # the final output is the N-mean
    config = (out / "config.yaml").read_text()
    assert "rrdb_blocks: 0" in config and "resize: null" in config  # tiny sizes win over the experiment
    preds = out / "predictions"
    masks = sorted(p for p in preds.glob("*.png") if not p.stem.endswith(("_std", "_entropy")))
    stds, entropies = sorted(preds.glob("*_std.png")), sorted(preds.glob("*_entropy.png"))
    assert len(masks) == len(stds) == len(entropies) == metrics["test/num_cases"] > 0
    std = np.asarray(Image.open(stds[0]))
    assert std.shape == (64, 64) and std.dtype == np.uint8


def test_sampling_sweep_rows_equal_separate_runs(trained_dir, tmp_path, cache_dir):
    """evaluate.py sweep: one pass per step count with 3 samples; its rows for 1 and 2 samples equal
    separate runs with num_samples 1 and 2 (each sample has its own noise stream); W&B gets the table."""
    import csv

    out = tmp_path / "sweep"
    run_script("evaluate.py", f"ckpt={trained_dir}", "sweep.steps=[5,50]", "sweep.samples=[1,2,3]",
               "logger=wandb", f"hydra.run.dir={out}", cache=cache_dir)
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(int(r["steps"]), int(r["samples"])) for r in rows] == [(s, n) for s in (5, 50) for n in (1, 2, 3)]
    assert all(float(r["seconds_per_case"]) > 0 for r in rows)
    # the full-T rows are the trained model's own test metrics (same checkpoint, seeds, samples)
    full = read_metrics(trained_dir)
    for n in (1, 2, 3):
        row = next(r for r in rows if r["steps"] == "50" and r["samples"] == str(n))
        key = "test/iou" if n == NUM_SAMPLES else f"test/samples/{n}/iou"
        assert float(row["iou"]) == pytest.approx(full[key], abs=1e-6)
    for n in (1, 2):
        single = tmp_path / f"n{n}"
        run_script("evaluate.py", f"ckpt={trained_dir}", "+overrides.model.sampling.steps=5",
                   f"+overrides.model.sampling.num_samples={n}", f"hydra.run.dir={single}", cache=cache_dir)
        alone = read_metrics(single)
        row = next(r for r in rows if r["steps"] == "5" and r["samples"] == str(n))
        for name in ("iou", "dice", "ece", "mba", "fbound", "wcov"):
            assert float(row[name]) == pytest.approx(alone[f"test/{name}"], abs=1e-4), (n, name)
    table = (out / "sweep.md").read_text()
    assert "| steps | samples | seconds_per_case |" in table and table.count("\n| 50 |") == 3
    for plot in ("dice_vs_steps", "dice_vs_samples", "ece_vs_samples", "seconds_vs_steps"):
        assert (out / "plots" / f"sweep_{plot}.png").stat().st_size > 1000, plot
    logged = [p.name for p in (out / "wandb").rglob("*") if p.is_file()]
    assert any(name.endswith(".table.json") for name in logged), logged
