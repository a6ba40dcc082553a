"""SegRefiner end to end (docs/methods.md §3): fit on shapes2d with online coarse masks, refine.py on another
method's masks (a threshold of the image), and the cascade from the UNet baseline's saved predictions.

The trained runs are shared through module-scoped fixtures (one SegRefiner fit, one short UNet fit).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from diffseg.data.synthetic import write_shapes2d

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
SHAPES = "shapes2d/n64_s64_seed0"  # data=shapes2d scale=tiny


def run(args, cache: Path, expect: int = 0, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DIFFSEG_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def segrefiner_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("segrefiner_run")
    # budget=none: SegRefiner's own (the reference's) recipe, 160 tiny steps instead of the 2D family's 400
    run(["scripts/fit.py", "experiment=segrefiner_folder2d", "data=shapes2d", "scale=tiny", "budget=none",
         f"hydra.run.dir={out}", "logger=csv", "trainer.enable_progress_bar=false"], cache)
    return out


@pytest.fixture(scope="module")
def unet_run(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("unet_run")
    run(["scripts/fit.py", "experiment=unet_folder2d", "data=shapes2d", "scale=tiny", "save_predictions=true",
         "trainer.max_steps=48", f"hydra.run.dir={out}", "logger=none", "trainer.enable_progress_bar=false"], cache)
    return out


def threshold_mask(image: np.ndarray) -> np.ndarray:
    """Another method's masks: Otsu threshold of the local high-frequency energy of the image (the
    foreground is striped and grainy); blobby, with an IoU of about 0.6 on shapes2d."""
    x = image.astype(np.float64) / 255
    energy = ndimage.uniform_filter(((x - ndimage.gaussian_filter(x, (2, 2, 0))) ** 2).sum(-1), 7)
    return energy > threshold_otsu(energy)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory):
    """A held-out shapes2d set (another seed), with threshold coarse masks in ROOT/threshold/."""
    root = write_shapes2d(tmp_path_factory.mktemp("heldout") / "shapes", num_cases=16, size=64, seed=1)
    (root / "threshold").mkdir()
    for path in sorted((root / "images").glob("*.png")):
        mask = threshold_mask(np.asarray(Image.open(path)))
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "threshold" / path.name)
    return root


def test_fit_refined_beats_coarse(segrefiner_run):
    metrics = json.loads((segrefiner_run / "metrics.json").read_text())
    for key in ("iou", "iou_pooled", "mba", "fbound"):
        assert f"test/{key}" in metrics and f"test/coarse_{key}" in metrics
    assert not any(k.startswith("test/global_") for k in metrics)  # images = training size: plain refinement
    # online coarse masks as the reference makes them: perturbed until the IoU drops below 0.8, no lower bound
    assert metrics["test/coarse_iou"] < 0.8
    # measured (seed 0, the reference's coarse masks, 160 steps): IoU pooled 0.515 -> 0.787, mBA (radius 1 at
    # 64 px: the 3-px band at the true boundary) 0.565 -> 0.653; margins well inside those gains
    assert metrics["test/iou_pooled"] > metrics["test/coarse_iou_pooled"] + 0.10, metrics
    assert metrics["test/mba"] > metrics["test/coarse_mba"] + 0.03, metrics


def test_refine_threshold_masks_improves_iou_and_mba(segrefiner_run, heldout, cache, tmp_path):
    ckpt = segrefiner_run / "checkpoints" / "best.ckpt"
    out = tmp_path / "refined"
    proc = run(["scripts/refine.py", f"ckpt={ckpt}", f"images={heldout}/images", f"coarse={heldout}/threshold",
                f"masks={heldout}/masks", f"out={out}"], cache)
    result = json.loads((out / "refine_metrics.json").read_text())
    assert result["num_cases"] == 16
    assert result["refined"]["iou_pooled"] > result["coarse"]["iou_pooled"] + 0.02, result
    assert result["refined"]["mba"] > result["coarse"]["mba"] + 0.02, result
    assert result["improved"]["iou_pooled"] and result["improved"]["mba"]
    assert "IoU (pooled) improved" in proc.stdout and "mBA improved" in proc.stdout, proc.stdout
    # the written masks are the scored ones: 0/255 PNGs of the images' size, stems kept
    written = sorted(p.name for p in out.glob("*.png"))
    assert written == sorted(p.name for p in (heldout / "images").glob("*.png"))
    mask = np.asarray(Image.open(out / written[0]))
    assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    # the coarse row is the threshold masks' own quality
    from diffseg.metrics.boundary import mba

    gt = [np.asarray(Image.open(heldout / "masks" / n)) > 0 for n in written]
    thr = [np.asarray(Image.open(heldout / "threshold" / n)) > 0 for n in written]
    assert result["coarse"]["mba"] == pytest.approx(np.mean([mba(t, g) for t, g in zip(thr, gt)]), abs=1e-9)
    inter = sum((t & g).sum() for t, g in zip(thr, gt))
    union = sum((t | g).sum() for t, g in zip(thr, gt))
    assert result["coarse"]["iou_pooled"] == pytest.approx(inter / union, abs=1e-9)


def test_refine_without_masks_local_and_missing_pairs(segrefiner_run, heldout, cache, tmp_path):
    ckpt = segrefiner_run / "checkpoints" / "best.ckpt"
    # 128 x 128 images (twice the training size) refined globally then locally, no ground truth given
    big = write_shapes2d(tmp_path / "big", num_cases=2, size=128, seed=2)
    coarse = tmp_path / "big_coarse"
    coarse.mkdir()
    for path in sorted((big / "images").glob("*.png")):
        Image.fromarray(threshold_mask(np.asarray(Image.open(path))).astype(np.uint8) * 255).save(coarse / path.name)
    out = tmp_path / "big_refined"
    proc = run(["scripts/refine.py", f"ckpt={ckpt}", f"images={big}/images", f"coarse={coarse}", f"out={out}",
                "steps=4"], cache)
    assert "local=True" in proc.stdout and "steps=4" in proc.stdout  # global-then-local is the default
    assert "global-then-local on 2 image(s)" in proc.stdout and "local patches per image" in proc.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["case_000.png", "case_001.png"]
    assert np.asarray(Image.open(out / "case_000.png")).shape == (128, 128)
    assert not (out / "refine_metrics.json").exists()
    # a missing coarse mask and a stray one: one error listing both, nothing refined
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in sorted((heldout / "threshold").glob("*.png"))[1:]:
        (partial / path.name).write_bytes(path.read_bytes())
    (partial / "stray.png").write_bytes(path.read_bytes())
    proc = run(["scripts/refine.py", f"ckpt={ckpt}", f"images={heldout}/images", f"coarse={partial}",
                f"out={tmp_path / 'none'}"], cache, expect=2)
    assert "no coarse mask for 1 stem(s): ['case_000']" in proc.stderr
    assert "no image for 1 stem(s): ['stray']" in proc.stderr
    assert not list((tmp_path / "none").glob("*.png"))


def test_cascade_refines_unet_predictions(segrefiner_run, unet_run, cache, tmp_path):
    """UNet baseline test predictions (save_predictions=true) -> refine.py: its coarse row is exactly
    the UNet's own test score."""
    unet_metrics = json.loads((unet_run / "metrics.json").read_text())
    test_ids = json.loads((unet_run / "splits.json").read_text())["test"]
    preds = unet_run / "predictions"
    assert sorted(p.stem for p in preds.glob("*.png")) == sorted(test_ids)
    data = cache / SHAPES
    out = tmp_path / "cascade"
    proc = run(["scripts/refine.py", f"ckpt={segrefiner_run / 'checkpoints' / 'best.ckpt'}",
                f"images={data}/images", f"coarse={preds}", f"masks={data}/masks", "match=coarse", f"out={out}"], cache)
    result = json.loads((out / "refine_metrics.json").read_text())
    assert result["num_cases"] == len(test_ids)
    for key in ("iou_pooled", "mba", "iou"):
        assert result["coarse"][key] == pytest.approx(unet_metrics[f"test/{key}"], abs=1e-6)
        assert 0.0 <= result["refined"][key] <= 1.0
    assert "coarse vs refined masks" in proc.stdout
