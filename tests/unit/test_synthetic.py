"""Synthetic generators: content (nesting, contrasts, shapes), determinism, idempotence, atomicity."""
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diffseg.data import synthetic
from diffseg.data.errors import DataError
from diffseg.data.formats import BratsSource, MSDSource
from diffseg.data.synthetic import (MARKER, write_brats_synthetic, write_msd_synthetic,
                                    write_shapes2d)

MODS = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    return write_brats_synthetic(tmp_path_factory.mktemp("syn") / "brats", num_cases=4, shape=(32, 32, 32))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes2d(tmp_path_factory.mktemp("syn") / "shapes", num_cases=12, size=48)


def load_case(root: Path, cid: str):
    arrays = {m: np.asanyarray(nib.load(root / cid / f"{cid}_{m}.nii.gz").dataobj) for m in MODS + ["seg"]}
    return arrays, nib.load(root / cid / f"{cid}_seg.nii.gz").affine


def read_png(path):
    return np.asarray(Image.open(path))


# ----------------------------------------------------------------------------- shapes2d
def test_shapes2d_files_and_masks(shapes):
    images = sorted((shapes / "images").iterdir())
    assert [p.name for p in images] == [f"case_{i:03d}.png" for i in range(12)]
    touching = 0
    for p in images:
        img, mask = read_png(p), read_png(shapes / "masks" / p.name)
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert mask.shape == (48, 48) and set(np.unique(mask)) == {0, 255}  # never empty
        fg = mask > 0
        touching += bool(fg[0].any() or fg[-1].any() or fg[:, 0].any() or fg[:, -1].any())
        # learnable (mean colours differ) but not separable by one intensity threshold
        g = img.astype(float)
        assert np.linalg.norm(g[fg].mean(0) - g[~fg].mean(0)) > 10
        lum = g.mean(-1)
        lo_fg, hi_fg = np.percentile(lum[fg], [5, 95])
        lo_bg, hi_bg = np.percentile(lum[~fg], [5, 95])
        assert min(hi_fg, hi_bg) > max(lo_fg, lo_bg)  # the intensity ranges overlap
    assert touching >= 4
    sizes = [np.count_nonzero(read_png(shapes / "masks" / p.name)) for p in images]
    assert max(sizes) > 3 * min(sizes)  # varied sizes


def test_shapes2d_deterministic_and_multiclass(shapes, tmp_path):
    again = write_shapes2d(tmp_path / "again", num_cases=12, size=48)
    other = write_shapes2d(tmp_path / "other", num_cases=2, size=48, seed=1)
    for name in ["images/case_003.png", "masks/case_003.png"]:
        np.testing.assert_array_equal(read_png(again / name), read_png(shapes / name))
    assert not np.array_equal(read_png(other / "images/case_001.png"), read_png(shapes / "images/case_001.png"))
    multi = write_shapes2d(tmp_path / "multi", num_cases=6, size=48, num_classes=4)
    for i in range(6):
        assert set(np.unique(read_png(multi / "masks" / f"case_{i:03d}.png"))) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- brats
def test_brats_nested_tumour_and_layout(brats):
    cases = sorted(p.name for p in brats.iterdir() if p.is_dir())
    assert cases == [f"BraTS2021_{i:05d}" for i in range(4)]
    for cid in cases:
        a, affine = load_case(brats, cid)
        np.testing.assert_array_equal(affine, np.eye(4))
        assert a["seg"].dtype == np.uint8 and all(a[m].dtype == np.float32 for m in MODS)
        assert all(a[m].shape == (32, 32, 32) for m in MODS + ["seg"])
        seg = a["seg"]
        assert set(np.unique(seg)) == {0, 1, 2, 4}
        ncr, ed, et = seg == 1, seg == 2, seg == 4
        core, wt = ncr | et, seg > 0
        # ET is a rim around NCR: NCR's neighbours are in the core; the core sits inside the WT
        assert np.count_nonzero(ndimage.binary_dilation(ncr) & ~core) <= 0.05 * np.count_nonzero(ncr)
        assert np.count_nonzero(ndimage.binary_dilation(core) & ~wt) <= 0.2 * np.count_nonzero(core)
        assert np.count_nonzero(ed) > np.count_nonzero(ncr)
        head = a["flair"] != 0
        assert not head[0, 0, 0] and head[16, 16, 16]  # the corner is air, the centre is inside the head
        assert np.all(head[wt])  # the tumour lies inside the head
        assert all(np.all(a[m][~head] == 0) for m in MODS)  # zero outside the head
        brain = head & ~wt

        def mean(m, region):
            return float(a[m][region].mean())

        # each region is told apart only by combining channels
        assert mean("flair", ed) > 1.3 * mean("flair", brain) and mean("flair", core) > 1.2 * mean("flair", brain)
        assert mean("t2", ed) > 1.3 * mean("t2", brain) and mean("t2", ncr) > 1.1 * mean("t2", et)
        assert mean("t1ce", et) > 1.3 * max(mean("t1ce", ed), mean("t1ce", ncr), mean("t1ce", brain))
        assert mean("t1", core) < 0.8 * min(mean("t1", ed), mean("t1", brain))


def test_brats_deterministic_and_2023(brats, tmp_path):
    again = write_brats_synthetic(tmp_path / "again", num_cases=2, shape=(32, 32, 32))
    a, _ = load_case(again, "BraTS2021_00001")
    b, _ = load_case(brats, "BraTS2021_00001")
    for key in MODS + ["seg"]:
        np.testing.assert_array_equal(a[key], b[key])
    b23 = write_brats_synthetic(tmp_path / "b23", num_cases=1, shape=(16, 16, 16), label_scheme="brats2023")
    case = BratsSource(b23, label_scheme="brats2023").cases()[0]
    assert case.id == "BraTS-GLI-00000-000"
    assert set(np.unique(np.asanyarray(nib.load(case.label).dataobj))) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- msd
def test_msd_layout(tmp_path):
    root = write_msd_synthetic(tmp_path / "msd", num_cases=3, shape=(16, 16, 16), num_modalities=3,
                               num_classes=4)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "structure1", "2": "structure2", "3": "structure3"}
    assert meta["modality"] == {"0": "T2", "1": "ADC", "2": "FLAIR"} and meta["numTraining"] == 3
    assert meta["training"][2] == {"image": "./imagesTr/synth_002.nii.gz", "label": "./labelsTr/synth_002.nii.gz"}
    case = MSDSource(root).cases()[0]
    assert nib.load(case.images[0]).shape == (16, 16, 16, 3)
    assert set(np.unique(np.asanyarray(nib.load(case.label).dataobj))) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- once, safely
def test_idempotent_and_parameter_mismatch(tmp_path, monkeypatch):
    root = write_shapes2d(tmp_path / "s", num_cases=2, size=16)
    stamp = (root / MARKER).stat().st_mtime_ns
    monkeypatch.setattr(synthetic, "shapes2d_sample", lambda *a, **k: pytest.fail("regenerated"))
    assert write_shapes2d(tmp_path / "s", num_cases=2, size=16) == root
    assert (root / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"other parameters.*delete .* or change data.root"):
        write_shapes2d(root, num_cases=3, size=16)
    with pytest.raises(DataError, match="other parameters"):
        write_brats_synthetic(root, num_cases=2)


def test_refuses_foreign_folder_accepts_empty_one(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("real data")
    with pytest.raises(DataError, match="not synthetic data"):
        write_shapes2d(tmp_path / "mine", num_cases=1, size=16)
    (tmp_path / "empty").mkdir()
    root = write_shapes2d(tmp_path / "empty", num_cases=1, size=16)
    assert (root / "images" / "case_000.png").is_file()
    assert oct(root.stat().st_mode & 0o777) == oct(0o755)


def test_killed_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(rng, shape):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # like a kill in the middle of the data set
        return real(rng, shape)

    real = synthetic.brats_sample
    monkeypatch.setattr(synthetic, "brats_sample", failing)
    with pytest.raises(KeyboardInterrupt):
        write_brats_synthetic(tmp_path / "b", num_cases=3, shape=(16, 16, 16))
    assert os.listdir(tmp_path) == []  # no half data set, no temporary folder


def test_another_process_finishing_first_is_fine(tmp_path):
    root = tmp_path / "race"

    def write(tmp):  # the other "process" completes ROOT while this one is still writing
        write_shapes2d(root, num_cases=1, size=16)
        (tmp / "partial").write_text("x")

    params = dict(num_cases=1, size=16, seed=0, num_classes=2)
    assert synthetic._write_once(root, "write_shapes2d", params, write) == root
    assert not (root / "partial").exists() and sorted(os.listdir(tmp_path)) == ["race"]
