"""scripts/predict.py (issue 16): new cases -> masks in the input's grid and label values, uncertainty maps,
DDP sharding, and one message per bad input.

The oracle tests run the driver in this process with an "oracle" model that predicts the TRUE classes of
each case in the pipeline's grid (the seg file sent through the same transforms): whatever the orientation,
spacing and padding, writing its prediction must give back the input's label file voxel for voxel.
"""
from __future__ import annotations

import csv
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai import transforms as mt
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO, run_script
from diffseg.data.synthetic import brats_sample
from diffseg.data.transforms import deterministic_transforms
from diffseg.drivers.cli import run_cli
from diffseg.drivers.predict import predict
from diffseg.models.base import FINAL, SegmentationModule

BRATS_REGIONS = {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}
MODALITIES = ("t1", "t1ce", "t2", "flair")
#: the BraTS release's orientation: x and y reversed (LPS), origin away from 0
LPS = np.array([[-1.0, 0, 0, 120.0], [0, -1.0, 0, 130.0], [0, 0, 1.0, -70.0], [0, 0, 0, 1]])


# ---------------------------------------------------------------------------- data on disk
def write_brats_cases(root: Path, truth: Path, n: int, shape=(30, 26, 20), affine=LPS, seed=0) -> dict[str, Path]:
    """BraTS case folders WITHOUT _seg under ``root`` (the seg files, ET = 4, go to ``truth``)."""
    segs = {}
    for i in range(n):
        cid = f"BraTS2021_{i:05d}"
        images, lab = brats_sample(np.random.default_rng([seed, i]), shape)
        (root / cid).mkdir(parents=True)
        for mod in MODALITIES:
            nib.save(nib.Nifti1Image(images[mod], affine), root / cid / f"{cid}_{mod}.nii.gz")
        truth.mkdir(parents=True, exist_ok=True)
        segs[cid] = truth / f"{cid}_seg.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray([0, 1, 2, 4], np.uint8)[lab], affine), segs[cid])
    return segs


def run_config(source: dict, *, patch, spatial_dims, in_channels, num_classes, regions, target_spacing=None,
               resize=None, root="/nonexistent/training/data") -> OmegaConf:
    """The part of a run's config.yaml that predict.py reads."""
    return OmegaConf.create({"data": {
        "source": {**source, "root": root}, "root": root, "patch_size": list(patch), "spatial_dims": spatial_dims,
        "in_channels": in_channels, "num_classes": num_classes, "regions": regions,
        "target_spacing": target_spacing, "resize": resize, "num_workers": 0}})


def predict_config(input_dir: Path, out: Path, *, trainer: dict | None = None, **extra) -> OmegaConf:
    trainer = trainer or {"_target_": "lightning.pytorch.Trainer", "accelerator": "cpu", "devices": 1,
                          "use_distributed_sampler": False, "enable_progress_bar": False}
    return OmegaConf.create({"ckpt": "oracle.ckpt", "input": str(input_dir), "out": str(out), "coarse": None,
                             "overrides": {}, "num_plot_cases": 2, "logger": None, "resume": False,
                             "trainer": trainer, **extra})


class Oracle(SegmentationModule):
    """Predicts the true classes of each case: its seg file through the run's own deterministic pipeline."""

    def __init__(self, run_cfg, label_map, files: dict[str, tuple[list[str], str]]):
        d = run_cfg.data
        super().__init__(net=torch.nn.Identity(), num_classes=d.num_classes, spatial_dims=d.spatial_dims,
                         regions=d.regions, optimizer=None, roi_size=d.patch_size)
        self.files = files
        self.pipeline = mt.Compose(deterministic_transforms(
            spatial_dims=d.spatial_dims, label_map=label_map, patch_size=d.patch_size, has_label=True,
            target_spacing=d.target_spacing, resize=d.resize))

    def predict_case(self, image, case_id, batch=None):
        images, seg = self.files[case_id]
        label = self.pipeline({"image": images if len(images) > 1 else images[0], "label": seg})["label"]
        assert label.shape[1:] == image.shape[2:], "the oracle's grid is the pipeline's"
        onehot = torch.nn.functional.one_hot(label[0].long(), self.num_classes).movedim(-1, 0)[None].float()
        return {FINAL: onehot}


def run_oracle(monkeypatch, run_cfg, label_map, files, input_dir, out) -> list[dict]:
    oracle = Oracle(run_cfg, label_map, files)
    monkeypatch.setattr("diffseg.drivers.run.load_model", lambda ckpt, overrides=None: (oracle, run_cfg))
    return predict(predict_config(input_dir, out))


def assert_same_grid_and_values(written: Path, original: Path):
    a, b = nib.load(written), nib.load(original)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))


# ---------------------------------------------------------------------------- must-show 1: oracle round trips
def test_oracle_recovers_brats_labels_of_an_lps_volume(tmp_path, monkeypatch):
    from diffseg.data.labels import brats_label_map

    segs = write_brats_cases(tmp_path / "new", tmp_path / "truth", 2)
    run_cfg = run_config({"_target_": "diffseg.data.formats.brats.BratsSource", "label_scheme": "brats2021",
                          "target": "regions"}, patch=(32, 32, 32), spatial_dims=3, in_channels=4, num_classes=4,
                         regions=BRATS_REGIONS)
    files = {cid: ([str(tmp_path / "new" / cid / f"{cid}_{m}.nii.gz") for m in MODALITIES], str(seg))
             for cid, seg in segs.items()}
    rows = run_oracle(monkeypatch, run_cfg, brats_label_map(), files, tmp_path / "new", tmp_path / "out")
    assert [r["case"] for r in rows] == sorted(segs)
    for cid, seg in segs.items():
        written = tmp_path / "out" / f"{cid}.nii.gz"
        assert set(np.unique(np.asarray(nib.load(written).dataobj))) == {0, 1, 2, 4}
        assert_same_grid_and_values(written, seg)
    summary = list(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    assert [r["case"] for r in summary] == sorted(segs) and all(float(r["seconds"]) >= 0 for r in summary)
    assert (tmp_path / "out" / "plots" / "predict.png").stat().st_size > 1000


def test_oracle_recovers_msd_labels_of_an_anisotropic_volume_with_target_spacing(tmp_path, monkeypatch):
    """Spacing (0.8, 0.8, 3.0) mm, x reversed, 2 modalities in one 4D file, resampled to (0.8, 0.8, 1.5) and
    padded; dataset.json's label values 0/2/5 (not class indices)."""
    import json

    from diffseg.data.formats.msd import MSDSource

    root = tmp_path / "new"
    (root / "imagesTs").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T2", "1": "ADC"},
                                                   "labels": {"0": "background", "2": "organ", "5": "lesion"}}))
    affine = np.array([[-0.8, 0, 0, 40.0], [0, 0.8, 0, -20.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(1)
    files = {}
    for i in range(2):
        cid = f"case_{i:03d}"
        lab = np.zeros((28, 22, 9), np.uint8)
        lab[4:20, 5:17, 2:7] = 2
        lab[8 + i:14, 8:12, 3:6] = 5
        image = np.stack([lab * 10.0 + rng.normal(0, 1, lab.shape), rng.normal(0, 1, lab.shape)], -1)
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), root / "imagesTs" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(lab, affine), tmp_path / f"{cid}_truth.nii.gz")
        files[cid] = ([str(root / "imagesTs" / f"{cid}.nii.gz")], str(tmp_path / f"{cid}_truth.nii.gz"))
    run_cfg = run_config({"_target_": "diffseg.data.formats.msd.MSDSource"}, patch=(32, 32, 32), spatial_dims=3,
                         in_channels=2, num_classes=3, regions={"organ": [1], "lesion": [2]},
                         target_spacing=[0.8, 0.8, 1.5])
    run_oracle(monkeypatch, run_cfg, MSDSource(root).label_map(), files, root, tmp_path / "out")
    for cid, (_, seg) in files.items():
        assert_same_grid_and_values(tmp_path / "out" / f"{cid}.nii.gz", Path(seg))


@pytest.mark.parametrize("resize", [None, [48, 48]])
def test_oracle_2d_masks_at_the_input_size(tmp_path, monkeypatch, resize):
    """3-class masks of 40 x 70 px images (smaller than the 64 px patch in one axis, larger in the other):
    PNG class ids at the input's size; exact without resize, at the input's size with data.resize."""
    from diffseg.data.labels import class_label_map

    (tmp_path / "new" / "images").mkdir(parents=True)
    (tmp_path / "truth").mkdir()
    rng = np.random.default_rng(2)
    files = {}
    for i in range(2):
        mask = np.zeros((40, 70), np.uint8)
        mask[5:30, 10:40] = 1
        mask[12:20 + i, 45:66] = 2
        image = (mask * 80 + rng.integers(0, 40, mask.shape)).astype(np.uint8)
        Image.fromarray(image).save(tmp_path / "new" / "images" / f"img{i}.png")
        Image.fromarray(mask).save(tmp_path / "truth" / f"img{i}.png")
        files[f"img{i}"] = ([str(tmp_path / "new" / "images" / f"img{i}.png")], str(tmp_path / "truth" / f"img{i}.png"))
    run_cfg = run_config({"_target_": "diffseg.data.formats.folder2d.Folder2DSource", "num_classes": 3},
                         patch=(64, 64), spatial_dims=2, in_channels=1, num_classes=3,
                         regions={"class1": [1], "class2": [2]}, resize=resize)
    run_oracle(monkeypatch, run_cfg, class_label_map(3), files, tmp_path / "new", tmp_path / "out")
    for cid, (_, truth) in files.items():
        written = np.asarray(Image.open(tmp_path / "out" / f"{cid}.png"))
        expected = np.asarray(Image.open(truth))
        assert written.shape == expected.shape == (40, 70)
        if resize is None:
            np.testing.assert_array_equal(written, expected)
        else:  # resampled twice (nearest to 48 px, bilinear back): boundaries may move by a pixel
            assert (written == expected).mean() > 0.95 and set(np.unique(written)) == {0, 1, 2}


class LabelOracle(SegmentationModule):
    """At test time the batch carries the label in the pipeline's grid: predict exactly it."""

    def predict_case(self, image, case_id, batch=None):
        return {FINAL: torch.nn.functional.one_hot(batch["label"][0, 0].long(), self.num_classes).movedim(-1, 0)[None].float()}


def test_save_predictions_at_test_time_writes_the_input_grid_and_values(tmp_path):
    """save_predictions=true in fit/evaluate: the same writer, so the test cases' files equal their seg files."""
    import lightning as L

    from diffseg.data.datamodule import SegDataModule
    from diffseg.data.formats.brats import BratsSource

    segs = write_brats_cases(tmp_path / "data", tmp_path / "data_truth", 3, shape=(30, 26, 20))
    for cid, seg in segs.items():
        seg.rename(tmp_path / "data" / cid / seg.name)
    dm = SegDataModule(BratsSource(tmp_path / "data"), str(tmp_path / "data"), patch_size=(32, 32, 32))
    model = LabelOracle(net=torch.nn.Identity(), num_classes=4, spatial_dims=3, regions=BRATS_REGIONS, optimizer=None,
                        roi_size=(32, 32, 32), save_predictions=True, output_dir=str(tmp_path / "run"))
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).test(model, datamodule=dm, verbose=False)
    (cid,) = dm.splits["test"]
    assert model.test_results["test/dice"] == 1.0
    assert_same_grid_and_values(tmp_path / "run" / "predictions" / f"{cid}.nii.gz", tmp_path / "data" / cid / f"{cid}_seg.nii.gz")


# ---------------------------------------------------------------------------- must-show 5: std over 4 samples
class HalfCertainNet(torch.nn.Module):
    """ImgX denoiser: logits independent of x_t in the first half of x (every sample agrees there), and
    driven by x_t (the noise of each sample) in the second half."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x, t):
        x_t = x[:, -self.num_classes:]
        certain = torch.zeros_like(x_t)
        certain[:, 1] = 8.0
        half = x.shape[2] // 2
        logits = 3.0 * x_t
        logits[:, :, :half] = certain[:, :, :half]
        return logits


def test_imgx_std_map_over_4_samples(tmp_path, monkeypatch):
    from diffseg.data.labels import brats_label_map
    from diffseg.models.imgx import ImgXDiffSeg

    shape = (32, 32, 32)
    eye = np.diag([1.0, 1.0, 1.0, 1.0])  # RAS and the patch size: the pipeline's grid is the input's
    write_brats_cases(tmp_path / "new", tmp_path / "truth", 1, shape=shape, affine=eye)
    run_cfg = run_config({"_target_": "diffseg.data.formats.brats.BratsSource", "label_scheme": "brats2021",
                          "target": "regions"}, patch=shape, spatial_dims=3, in_channels=4, num_classes=4,
                         regions=BRATS_REGIONS)
    model = ImgXDiffSeg(HalfCertainNet(4), sampling={"num_samples": 4, "steps": 5}, num_classes=4, spatial_dims=3,
                        regions=BRATS_REGIONS, optimizer=None, roi_size=shape)
    monkeypatch.setattr("diffseg.drivers.run.load_model", lambda ckpt, overrides=None: (model, run_cfg))
    predict(predict_config(tmp_path / "new", tmp_path / "out"))
    cid = "BraTS2021_00000"
    std = np.asarray(nib.load(tmp_path / "out" / f"{cid}_std.nii.gz").dataobj)
    entropy = np.asarray(nib.load(tmp_path / "out" / f"{cid}_entropy.nii.gz").dataobj)
    assert std.shape == entropy.shape == shape

    # direct computation: the 4 samples from the running means samples/k of the same case (same seeds)
    pipeline = mt.Compose(deterministic_transforms(spatial_dims=3, label_map=brats_label_map(), patch_size=shape,
                                                   has_label=False))
    image = pipeline({"image": [str(tmp_path / "new" / cid / f"{cid}_{m}.nii.gz") for m in MODALITIES]})["image"]
    out = model.predict_case(image[None], cid)
    means = [out[f"samples/{k}"][0].numpy().astype(np.float64) for k in range(1, 5)]
    samples = np.stack([means[0]] + [k * means[k - 1] - (k - 1) * means[k - 2] for k in range(2, 5)])
    direct = samples.std(axis=0).mean(axis=0)  # population std over samples, mean over classes
    assert np.abs(std[:16]).max() == 0.0  # all samples agree in the first half
    assert std[16:].min() > 0 and std[16:].mean() > 0.05, std[16:].mean()  # and differ in the second
    np.testing.assert_allclose(std[16:], direct[16:], atol=1e-5)
    mean = samples.mean(0)
    direct_entropy = -(mean * np.log(np.clip(mean, 1e-12, None))).sum(0) / np.log(4)
    np.testing.assert_allclose(entropy, direct_entropy, atol=1e-4)


# ---------------------------------------------------------------------------- a real checkpoint, the script
def make_checkpoint(out: Path, *overrides: str) -> Path:
    """A run directory with an (untrained) checkpoint of the real config of ``overrides`` (fit.py's
    composition; the data description keys given instead of read from files)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import diffseg.drivers.cli  # noqa: F401 - config resolvers

    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        cfg = compose("fit", overrides=[*overrides, "data.root=/training/data", "scale=tiny",
                                        f"paths.output_dir={out}"])
    torch.manual_seed(0)
    model = instantiate(cfg.model, _convert_="all")
    path = out / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict(), "diffseg_config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return out


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory) -> Path:
    """experiment=unet_brats scale=tiny (32^3 patches), untrained: the real model and pipeline."""
    return make_checkpoint(tmp_path_factory.mktemp("unet_ckpt"), "experiment=unet_brats", "data=brats",
                           "data.num_classes=4", "data.class_names=[wt,tc,et]",
                           "+data.regions={wt:[1,2,3],tc:[1,3],et:[3]}")


def compose_predict(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        return compose("predict", overrides=list(overrides))


def test_ddp_cpu_writes_each_case_once_equal_to_single_process(unet_ckpt, tmp_path):
    write_brats_cases(tmp_path / "new", tmp_path / "truth", 3, shape=(40, 36, 30))
    args = [f"ckpt={unet_ckpt}", f"input={tmp_path / 'new'}", "trainer.enable_progress_bar=false"]
    predict(compose_predict(*args, f"out={tmp_path / 'single'}"))  # this process
    run_script("predict.py", *args, f"out={tmp_path / 'ddp'}", "trainer=ddp_cpu", timeout=600)  # 2 ranks (gloo)
    rows = {name: list(csv.DictReader(open(tmp_path / name / "summary.csv"))) for name in ("single", "ddp")}
    cases = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert sorted(r["case"] for r in rows["ddp"]) == cases  # every case once, none repeated by padding
    for cid in cases:
        a, b = (nib.load(tmp_path / name / f"{cid}.nii.gz") for name in ("single", "ddp"))
        assert a.shape == (40, 36, 30)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_allclose(a.affine, LPS)
    assert sorted(p.name for p in (tmp_path / "ddp").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in cases]


# ---------------------------------------------------------------------------- must-show 4: bad input
def _break(root: Path, how: str) -> Path:
    case = sorted(root.iterdir())[1]
    path = case / f"{case.name}_t2.nii.gz"
    if how == "missing_modality":
        path.unlink()
    elif how == "unreadable":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "channels":  # a 2-volume 4D t2: 5 image channels for a 4-channel checkpoint
        img = nib.load(path)
        arr = np.asarray(img.dataobj)
        nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), img.affine), path)
    elif how == "wrong_layout":  # the files of every case directly in the folder (an MSD-like layout)
        for case in sorted(p for p in root.iterdir() if p.is_dir()):
            for f in case.iterdir():
                f.rename(root / f.name)
            case.rmdir()
        return root
    return path


@pytest.mark.parametrize("how", ["missing_modality", "unreadable", "channels", "wrong_layout"])
def test_bad_input_stops_before_any_case_naming_the_file(unet_ckpt, tmp_path, capsys, how):
    write_brats_cases(tmp_path / "new", tmp_path / "truth", 3, shape=(20, 20, 16))
    named = _break(tmp_path / "new", how)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        run_cli(predict, compose_predict(f"ckpt={unet_ckpt}", f"input={tmp_path / 'new'}", f"out={out}"))
    message = capsys.readouterr().err
    assert stop.value.code == 2 and message.startswith("error:")
    expected = named.name if how != "missing_modality" else f"{named.parent.name}_t2.nii.gz"
    assert expected in message, message
    assert not out.exists() or not list(out.glob("*.nii.gz"))  # nothing predicted


def test_bad_input_through_the_script(unet_ckpt, tmp_path):
    write_brats_cases(tmp_path / "new", tmp_path / "truth", 2, shape=(20, 20, 16))
    path = _break(tmp_path / "new", "unreadable")
    proc = run_script("predict.py", f"ckpt={unet_ckpt}", f"input={tmp_path / 'new'}", f"out={tmp_path / 'out'}",
                      check=False)
    assert proc.returncode == 2 and str(path) in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


# ---------------------------------------------------------------------------- SegRefiner: coarse folder, cascade
def test_segrefiner_refines_a_coarse_folder_or_another_models_output(tmp_path):
    from diffseg.data.synthetic import write_shapes2d

    two_d = ["data.in_channels=3", "data.num_classes=2", "data.class_names=[foreground]",
             "+data.regions={foreground:[1]}"]
    unet = make_checkpoint(tmp_path / "unet", "experiment=unet_folder2d", *two_d)
    refiner = make_checkpoint(tmp_path / "refiner", "experiment=segrefiner_folder2d", *two_d)
    data = write_shapes2d(tmp_path / "shapes", num_cases=2, size=64)
    args = [f"input={data / 'images'}", "trainer.enable_progress_bar=false", "+overrides.model.refine.steps=2"]
    predict(compose_predict(f"ckpt={refiner}", f"coarse={unet}", f"out={tmp_path / 'cascade'}", *args))
    predict(compose_predict(f"ckpt={unet}", f"out={tmp_path / 'unet_out'}", *args))
    predict(compose_predict(f"ckpt={refiner}", f"coarse={tmp_path / 'unet_out'}", f"out={tmp_path / 'folder'}", *args))
    stems = sorted(p.stem for p in (data / "images").iterdir())
    for stem in stems:
        coarse = np.asarray(Image.open(tmp_path / "cascade" / "coarse" / f"{stem}.png"))
        np.testing.assert_array_equal(coarse, np.asarray(Image.open(tmp_path / "unet_out" / f"{stem}.png")))
        refined = np.asarray(Image.open(tmp_path / "cascade" / f"{stem}.png"))
        assert refined.shape == (64, 64) and set(np.unique(refined)) <= {0, 255}
        np.testing.assert_array_equal(refined, np.asarray(Image.open(tmp_path / "folder" / f"{stem}.png")))
    with pytest.raises(Exception, match="SegRefiner checkpoints refine coarse masks"):
        predict(compose_predict(f"ckpt={refiner}", f"out={tmp_path / 'none'}", *args))
