"""Integrity check: synthetic data sets, broken on purpose; every problem names the right file."""
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from diffseg.data.errors import DataError
from diffseg.data.formats import BratsSource, Folder2DSource, MSDSource
from diffseg.data.integrity import assert_dataset_ok, check_dataset
from diffseg.data.synthetic import write_brats_synthetic, write_msd_synthetic, write_shapes2d

C0, C1, C2 = "BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    base = tmp_path_factory.mktemp("integrity")
    return {"brats": write_brats_synthetic(base / "brats", num_cases=3, shape=(16, 16, 16)),
            "msd": write_msd_synthetic(base / "msd", num_cases=2, shape=(12, 12, 12)),
            "shapes": write_shapes2d(base / "shapes", num_cases=3, size=16, num_classes=3)}


@pytest.fixture
def brats(clean, tmp_path):
    return Path(shutil.copytree(clean["brats"], tmp_path / "brats"))


def f(root: Path, case: str, key: str) -> Path:
    return root / case / f"{case}_{key}.nii.gz"


def rewrite(path: Path, fn) -> None:
    img = nib.load(path)
    data, affine = fn(np.asanyarray(img.dataobj).copy()), img.affine
    nib.save(nib.Nifti1Image(data, affine), path)


def only(problems, needle):
    hits = [p for p in problems if needle in p]
    assert len(hits) == 1, problems
    return hits[0]


@pytest.mark.parametrize("fast", [False, True])
def test_clean_sets_have_no_problems(clean, fast):
    splits = {"train": [C0], "val": [C1], "test": [C2]}
    assert check_dataset(BratsSource(clean["brats"]), splits, fast=fast) == []
    assert check_dataset(MSDSource(clean["msd"]), fast=fast) == []
    assert check_dataset(Folder2DSource(clean["shapes"], num_classes=3), fast=fast) == []
    assert_dataset_ok(BratsSource(clean["brats"]), splits, fast=fast)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.01])  # truncated data, truncated header
def test_truncated_nifti_named(brats, fast, keep):
    path = f(brats, C1, "t2")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    problem = only(check_dataset(BratsSource(brats), fast=fast), str(path))
    assert problem.startswith(f"{path}: unreadable NIfTI")
    assert len(check_dataset(BratsSource(brats), fast=fast)) == 1


def test_corrupt_uncompressed_nifti_fast(brats):
    path = f(brats, C0, "t1")
    nib.save(nib.load(path), brats / C0 / f"{C0}_t1.nii")
    path.unlink()
    raw = brats / C0 / f"{C0}_t1.nii"
    raw.write_bytes(raw.read_bytes()[:1000])
    only(check_dataset(BratsSource(brats), fast=True), f"{raw}: unreadable NIfTI")


def test_missing_modality_named(brats):
    f(brats, C2, "flair").unlink()
    problems = check_dataset(BratsSource(brats))
    assert problems == [f"{brats / C2}: missing {C2}_flair.nii.gz (expected CASE/CASE_{{t1,t1ce,t2,flair,seg}}.nii.gz)"]


def test_label_value_7_named(brats):
    rewrite(f(brats, C0, "seg"), lambda a: np.where(a == 2, 7, a).astype(np.uint8))
    for fast in (False, True):
        problem = only(check_dataset(BratsSource(brats), fast=fast), str(f(brats, C0, "seg")))
        assert "label values [7] not in the label map (expected values [0, 1, 2, 4]" in problem
        assert "found [0, 1, 4, 7]" in problem


def test_2023_labels_read_with_2021_scheme(brats):
    rewrite(f(brats, C1, "seg"), lambda a: np.where(a == 4, 3, a).astype(np.uint8))
    problem = only(check_dataset(BratsSource(brats), fast=True), str(f(brats, C1, "seg")))
    assert "label values [3]" in problem
    assert check_dataset(BratsSource(brats, label_scheme="brats2023"), fast=True) == [
        f"{f(brats, c, 'seg')}: label values [4] not in the label map (expected values [0, 1, 2, 3] for "
        f"['background', 'ncr', 'ed', 'et'], found [0, 1, 2, 4])" for c in (C0, C2)]


@pytest.mark.parametrize("fast", [False, True])
def test_shape_and_affine_mismatch_named(brats, fast):
    rewrite(f(brats, C1, "t1ce"), lambda a: a[:15])
    img = nib.load(f(brats, C2, "t2"))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), np.diag([1.0, 1.0, 1.2, 1.0])), f(brats, C2, "t2"))
    problems = check_dataset(BratsSource(brats), fast=fast)
    assert len(problems) == 2
    assert only(problems, str(f(brats, C1, "t1ce"))).endswith(
        f"spatial shape differs within case {C1} (expected (16, 16, 16) like {C1}_t1.nii.gz, found (15, 16, 16))")
    assert "affine differs within case" in only(problems, str(f(brats, C2, "t2")))


def test_non_finite_only_in_full_mode(brats):
    rewrite(f(brats, C0, "t1"), lambda a: np.where(a > a.max() * 0.9, np.nan, a).astype(np.float32))
    assert "non-finite intensities" in only(check_dataset(BratsSource(brats)), str(f(brats, C0, "t1")))
    assert check_dataset(BratsSource(brats), fast=True) == []
    rewrite(f(brats, C1, "t2"), lambda a: np.zeros_like(a))
    assert "all zero" in only(check_dataset(BratsSource(brats)), str(f(brats, C1, "t2")))


def test_splits_overlap_and_unknown_ids(brats):
    splits = {"train": [C0, C1], "val": [C1, "BraTS2021_09999"], "test": [C2, C2]}
    problems = check_dataset(BratsSource(brats), splits, fast=True)
    assert problems == [
        f"splits[val]: case '{C1}' is in both train and val (expected each case in at most one split, once)",
        f"splits[val]: case 'BraTS2021_09999' not found in {brats} (expected one of its 3 case ids)",
        f"splits[test]: case '{C2}' is twice (expected each case in at most one split, once)"]


def test_every_problem_in_one_error(brats):
    f(brats, C2, "flair").unlink()
    rewrite(f(brats, C0, "seg"), lambda a: np.where(a == 2, 7, a).astype(np.uint8))
    path = f(brats, C1, "t2")
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(DataError) as err:
        assert_dataset_ok(BratsSource(brats), {"train": [C0, C1], "val": [C1], "test": []}, fast=True)
    assert len(err.value.problems) == 4
    lines = str(err.value).splitlines()
    assert lines[0].startswith(f"data set check failed for {brats} (4 problems)") and len(lines) == 5
    for needle in [f"{C2}_flair", f"{C0}_seg", f"{C1}_t2", "in both train and val"]:
        assert any(needle in line for line in lines[1:])


def test_msd_channel_count_and_labels(clean, tmp_path):
    root = Path(shutil.copytree(clean["msd"], tmp_path / "msd"))
    img = root / "imagesTr" / "synth_001.nii.gz"
    rewrite(img, lambda a: a[..., :1])
    rewrite(root / "labelsTr" / "synth_000.nii.gz", lambda a: np.where(a == 2, 5, a).astype(np.uint8))
    problems = check_dataset(MSDSource(root))
    assert only(problems, str(img)).endswith("case synth_001 has 1 image channel(s) (expected 2, the data "
                                             "set's in_channels)")
    assert "label values [5]" in only(problems, "synth_000")
    assert check_dataset(MSDSource(tmp_path / "missing")) and "MSD data not found" in check_dataset(
        MSDSource(tmp_path / "missing"))[0]


def test_folder2d_corrupt_png_bad_mask_and_size(clean, tmp_path):
    root = Path(shutil.copytree(clean["shapes"], tmp_path / "shapes"))
    png = root / "images" / "case_000.png"
    png.write_bytes(png.read_bytes()[:60])
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(root / "masks" / "case_001.png")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(root / "masks" / "case_002.png")
    problems = check_dataset(Folder2DSource(root, num_classes=3))
    assert any(p.startswith(f"{png}:") for p in problems)
    assert "label values [7]" in only(problems, "case_001.png")
    assert "spatial shape differs within case case_002 (expected (16, 16)" in only(problems, "case_002.png")
