"""The framework end to end through scripts/fit.py, evaluate.py and check_data.py (issue: foundation)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import read_metrics, run_script

pytestmark = pytest.mark.slow

TINY_BRATS = ["experiment=unet_brats", "data=brats_synthetic", "scale=tiny"]


@pytest.fixture(scope="module")
def unet_run(trained_run):
    """The must-show command: the UNet baseline at tiny scale on the built-in BraTS data (trained once per
    session, tests/conftest.py::trained_run)."""
    out = trained_run(*TINY_BRATS)
    return out, (out / "fit_stdout.txt").read_text()


def test_unet_brats_tiny_learns_and_writes_every_output(unet_run):
    out, stdout = unet_run
    metrics = read_metrics(out)
    # the bar: WT Dice >= 0.8 at tiny scale (chance is ~0.1 for a 32^3 volume)
    assert metrics["test/dice/wt"] >= 0.8, metrics
    for key in ("test/dice", "test/dice/tc", "test/dice/et", "test/hd95", "test/hd95/wt", "test/iou",
                "test/nsd/wt"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["test/num_cases"] == 5  # 24 cases, 0.7/0.1/0.2 split
    for rel in ("config.yaml", "splits.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                "test_cases.csv", "csv/metrics.csv", "plots/test.png", "plots/val.png"):
        assert (out / rel).is_file(), rel
    assert list((out / "wandb").glob("offline-run-*")), "no offline W&B run"
    config = (out / "config.yaml").read_text()
    assert "${" not in config and "in_channels: 4" in config  # resolved, data description filled in
    splits = json.loads((out / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])
    assert "test/dice/wt" in stdout  # the printed table
    rows = list(csv.DictReader(open(out / "test_cases.csv")))
    assert len(rows) == 5 and {r["case_id"] for r in rows} == set(splits["test"])


def test_evaluate_reproduces_fit_metrics(unet_run, tmp_path, cache_dir):
    out, _ = unet_run
    run_script("evaluate.py", f"ckpt={out}/checkpoints/best.ckpt", f"hydra.run.dir={tmp_path}", cache=cache_dir)
    a, b = read_metrics(out), read_metrics(tmp_path)
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a)


def test_best_checkpoint_loads_the_lightning_way_and_gives_the_run_metrics(unet_run, tmp_path, cache_dir):
    """``UNetSegmenter.load_from_checkpoint(best.ckpt)``, the data rebuilt from the run config stored in its
    hyper-parameters and a plain Lightning Trainer reproduce the run's test metrics (metrics.json)."""
    import lightning as L
    from omegaconf import OmegaConf

    from diffseg.drivers.run import build_datamodule
    from diffseg.models.baseline import UNetSegmenter

    out, _ = unet_run
    model = UNetSegmenter.load_from_checkpoint(out / "checkpoints" / "best.ckpt", output_dir=str(tmp_path))
    dm = build_datamodule(OmegaConf.create(model.hparams.run_config))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer.test(model, datamodule=dm, verbose=False)
    expected = read_metrics(out)
    assert model.test_results.keys() == expected.keys()
    assert all(abs(model.test_results[k] - expected[k]) < 1e-6 for k in expected), \
        {k: (model.test_results[k], expected[k]) for k in expected}


def test_ddp_cpu_scores_each_case_once_and_matches_single_process(tmp_path, cache_dir):
    ddp = tmp_path / "ddp"
    run_script("fit.py", *TINY_BRATS, "trainer=ddp_cpu", "trainer.max_steps=24", "logger=csv",
               f"hydra.run.dir={ddp}", cache=cache_dir)
    single = tmp_path / "single"
    run_script("evaluate.py", f"ckpt={ddp}/checkpoints/best.ckpt", f"hydra.run.dir={single}", cache=cache_dir)
    a, b = read_metrics(ddp), read_metrics(single)
    assert a["test/num_cases"] == b["test/num_cases"] == 5  # 5 test cases on 2 ranks: no padded duplicate
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a), {k: (a[k], b[k]) for k in a}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "single"]  # one output directory per run


def _break(root: Path, how: str) -> str:
    case = sorted(p for p in root.iterdir() if p.is_dir())[3]
    if how == "corrupt":
        path = case / f"{case.name}_t1.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "missing_modality":
        path = case / f"{case.name}_flair.nii.gz"
        path.unlink()
    elif how == "bad_label":
        path = case / f"{case.name}_seg.nii.gz"
        img = nib.load(path)
        seg = np.asarray(img.dataobj).copy()
        seg[0, 0, 0] = 7
        nib.save(nib.Nifti1Image(seg, img.affine), path)
    elif how == "shape_mismatch":
        path = case / f"{case.name}_t2.nii.gz"
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), path)
    return path.name


@pytest.mark.parametrize("how", ["corrupt", "missing_modality", "bad_label", "shape_mismatch"])
def test_bad_data_stops_check_data_and_fit_with_one_message(how, tmp_path, cache_dir):
    from diffseg.data.synthetic import write_brats_synthetic

    root = tmp_path / "brats"
    write_brats_synthetic(root, num_cases=6, shape=(32, 32, 32), seed=1)
    (root / ".diffseg_synthetic.json").unlink(missing_ok=True)
    name = _break(root, how)
    common = ["data=brats", f"data.root={root}", "scale=tiny"]
    check = run_script("check_data.py", *common, cache=cache_dir, check=False)
    fit = run_script("fit.py", "experiment=unet_brats", *common, "logger=none", f"hydra.run.dir={tmp_path}/run",
                     cache=cache_dir, check=False)
    for proc in (check, fit):
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "error:" in proc.stderr and name in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before training


def test_missing_data_root_says_where_and_how(cache_dir):
    proc = run_script("fit.py", "experiment=unet_brats", check=False, cache=cache_dir)
    assert proc.returncode == 2 and "data.root" in proc.stderr and "data=brats_synthetic" in proc.stderr
    assert "Traceback" not in proc.stderr


def _surface_brute_force(pred: np.ndarray, true: np.ndarray, spacing, tolerance: float) -> tuple[float, float]:
    """HD95 and NSD of two boolean volumes by their definitions, with every distance in mm: surfaces are
    the voxels removed by one erosion (6-connectivity), distances are brute-force Euclidean distances
    between surface voxel centres scaled by the voxel spacing (scipy's cdist on the original grid)."""
    from scipy.ndimage import binary_erosion
    from scipy.spatial.distance import cdist

    def surface(mask):
        return np.argwhere(mask & ~binary_erosion(mask)) * np.asarray(spacing, float)

    sp, st = surface(pred), surface(true)
    d = cdist(sp, st)
    to_true, to_pred = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(to_true, 95), np.percentile(to_pred, 95))
    nsd = ((to_true <= tolerance).sum() + (to_pred <= tolerance).sum()) / (len(sp) + len(st))
    return float(hd95), float(nsd)


def test_msd_anisotropic_spacing_and_folder2d_layouts(tmp_path, cache_dir):
    """MSD layout (ImgX-DiffSeg) with 1 x 1 x 3 mm voxels: HD95 and NSD in test_cases.csv are in mm of the ORIGINAL grid
    (a brute-force computation on the written prediction and the label file, with the header's spacing)."""
    from diffseg.data.synthetic import write_msd_synthetic, write_shapes2d

    spacing = (1.0, 1.0, 3.0)
    msd = write_msd_synthetic(tmp_path / "msd", num_cases=10, shape=(32, 32, 32), num_modalities=2, num_classes=3,
                              spacing=spacing)
    run = tmp_path / "msd_run"
    # the user's command `experiment=imgx_brats data=msd data.root=ROOT scale=tiny` (the one MSD layout of the
    # suite: a diffusion model, the channels and classes read from dataset.json), fewer steps for CI
    run_script("fit.py", "experiment=imgx_brats", "data=msd", f"data.root={msd}", "scale=tiny",
               "trainer.max_steps=16", "logger=csv", "save_predictions=true", f"hydra.run.dir={run}", cache=cache_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["data"]["in_channels"] == 2 and cfg["data"]["num_classes"] == 3
    assert cfg["model"]["net"]["in_channels"] == 2 + 3 and cfg["model"]["net"]["out_channels"] == 3
    m = read_metrics(run)
    labels = json.loads((Path(msd) / "dataset.json").read_text())["labels"]
    names = {int(k): v for k, v in labels.items() if k != "0"}
    assert all(f"test/dice/{n}" in m for n in names.values()), m.keys()
    assert {"test/dice/structure1", "test/dice/structure2", "test/step/5/dice/structure2"} <= m.keys()
    rows = [r for r in csv.DictReader(open(run / "test_cases.csv")) if r["output"] == "final"]  # not step/k
    checked = 0
    for row in rows:
        true_img = nib.load(Path(msd) / "labelsTr" / f"{row['case_id']}.nii.gz")
        pred_img = nib.load(run / "predictions" / f"{row['case_id']}.nii.gz")
        assert np.allclose(pred_img.affine, true_img.affine)  # the prediction lies on the label's grid
        assert np.allclose(true_img.header.get_zooms()[:3], spacing)
        true, pred = np.asarray(true_img.dataobj), np.asarray(pred_img.dataobj)
        for value, name in names.items():
            p, t = pred == value, true == value
            if not (p.any() and t.any()):
                continue  # the empty-mask conventions are tested in tests/unit/test_metrics_surface.py
            hd95, nsd = _surface_brute_force(p, t, spacing, tolerance=1.0)
            assert abs(float(row[f"hd95/{name}"]) - hd95) < 1e-3 * max(1.0, hd95), (row["case_id"], name, hd95)
            assert abs(float(row[f"nsd/{name}"]) - nsd) < 1e-4, (row["case_id"], name, nsd)
            checked += 1
    assert checked >= 2, "no case with both masks non-empty: the spacing check did not run"
    folder = write_shapes2d(tmp_path / "shapes", num_cases=16, size=64)
    run_script("fit.py", "experiment=unet_folder2d", f"data.root={folder}", "scale=tiny", "trainer.max_steps=16",
               "logger=csv", f"hydra.run.dir={tmp_path}/f2d_run", cache=cache_dir)
    m2 = read_metrics(tmp_path / "f2d_run")
    for key in ("test/dice", "test/iou", "test/iou_pooled", "test/mba", "test/fbound", "test/wcov", "test/ece"):
        assert key in m2, key


def test_multirun_and_cfg_job(tmp_path, cache_dir):
    proc = run_script("fit.py", *TINY_BRATS, "--cfg", "job", cache=cache_dir)
    assert "channels:" in proc.stdout and "_target_: diffseg.models.baseline.UNetSegmenter" in proc.stdout
    run_script("fit.py", "-m", *TINY_BRATS, "trainer.max_steps=2", "logger=none", "model.optimizer.lr=1e-3,2e-3",
               f"hydra.sweep.dir={tmp_path}", cache=cache_dir)
    assert sorted(p.parent.name for p in tmp_path.glob("*/metrics.json")) == ["0", "1"]
