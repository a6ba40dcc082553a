"""Sources: folder2d, MSD (+ nnU-Net v2 dataset.json), BraTS 2021/2023 names, the registry."""
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from diffseg.data.datamodule import SegDataModule
from diffseg.data.errors import DataError
from diffseg.data.formats import SOURCES, BratsSource, Folder2DSource, MSDSource, build_source
from diffseg.data.synthetic import write_brats_synthetic, write_msd_synthetic, write_shapes2d


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    return {
        "shapes": write_shapes2d(base / "shapes", num_cases=5, size=24),
        "brats": write_brats_synthetic(base / "brats", num_cases=3, shape=(16, 16, 16)),
        "brats23": write_brats_synthetic(base / "brats23", num_cases=2, shape=(16, 16, 16),
                                         label_scheme="brats2023"),
        "msd": write_msd_synthetic(base / "msd", num_cases=3, shape=(12, 12, 12),
                                   spacing=(0.8, 0.8, 1.5)),
        "msd1": write_msd_synthetic(base / "msd1", num_cases=2, shape=(12, 12, 12), num_modalities=1),
    }


def copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def save_png(path: Path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8)).save(path)


# ----------------------------------------------------------------------------- folder2d
def test_folder2d_rgb_binary(data):
    src = Folder2DSource(data["shapes"])
    info = src.info()
    assert (info.spatial_dims, info.in_channels, info.spacing) == (2, 3, (1.0, 1.0))
    assert info.label_map.binary and info.label_map.values == [0, 1]
    cases = src.cases()
    assert [c.id for c in cases] == [f"case_{i:03d}" for i in range(5)]
    assert cases[0].images == [str(data["shapes"] / "images" / "case_000.png")]
    assert cases[0].label == str(data["shapes"] / "masks" / "case_000.png") and cases[0].coarse is None


def test_folder2d_gray_multiclass_tif_and_names(tmp_path):
    for stem in ["b", "a"]:
        save_png(tmp_path / "images" / f"{stem}.png", np.zeros((8, 8)))
        save_png(tmp_path / "masks" / f"{stem}.tif", np.zeros((8, 8)))
    (tmp_path / "images" / "._a.png").write_bytes(b"macOS junk")
    src = Folder2DSource(tmp_path, num_classes=3, class_names=["bg", "x", "y"])
    info = src.info()
    assert info.in_channels == 1 and info.modalities == ["gray"]
    assert not info.label_map.binary and info.label_map.values == [0, 1, 2]
    assert info.label_map.names == ["bg", "x", "y"]
    assert [c.id for c in src.cases()] == ["a", "b"]


def test_folder2d_unmatched_stems_listed(tmp_path):
    for stem in ["a", "b", "c"]:
        save_png(tmp_path / "images" / f"{stem}.png", np.zeros((8, 8, 3)))
    for stem in ["a", "d", "e"]:
        save_png(tmp_path / "masks" / f"{stem}.png", np.zeros((8, 8)))
    with pytest.raises(DataError) as err:
        Folder2DSource(tmp_path).cases()
    msg = str(err.value)
    assert "['b', 'c']" in msg and "['d', 'e']" in msg and len(err.value.problems) == 2


def test_folder2d_mixed_channels(tmp_path):
    save_png(tmp_path / "images" / "a.png", np.zeros((8, 8, 3)))
    save_png(tmp_path / "images" / "b.png", np.zeros((8, 8)))
    for stem in "ab":
        save_png(tmp_path / "masks" / f"{stem}.png", np.zeros((8, 8)))
    with pytest.raises(DataError, match=r"b\.png: 1 channel\(s\) \(expected 3"):
        Folder2DSource(tmp_path).info()


def test_folder2d_coarse_dir_relative_absolute_and_missing(data, tmp_path):
    root = copy(data["shapes"], tmp_path)
    (root / "coarse").mkdir()
    for i in range(4):  # case_004 has no coarse mask
        shutil.copy(root / "masks" / f"case_{i:03d}.png", root / "coarse")
    # coarse masks may cover part of the data set (another model's test predictions): the source keeps
    # the case without one, and the datamodule refuses a split that needs it, naming the case
    cases = {c.id: c for c in Folder2DSource(root, coarse_dir="coarse").cases()}
    assert cases["case_004"].coarse is None and cases["case_003"].coarse is not None
    splits = root / "splits.json"
    splits.write_text(json.dumps({"train": ["case_000", "case_001"], "val": ["case_002"],
                                  "test": ["case_003", "case_004"]}))
    dm = SegDataModule(Folder2DSource(root, coarse_dir="coarse"), root=str(root), patch_size=(16, 16),
                       splits_file=str(splits), cache="none")
    dm.setup("validate")  # the val split is covered
    with pytest.raises(DataError, match=r"no coarse mask for 1 case\(s\) of the test split.*\['case_004'\]"):
        dm.setup("test")
    with pytest.raises(DataError, match=r"no coarse mask matches an image stem"):
        Folder2DSource(root, coarse_dir=str(_empty_dir(tmp_path))).cases()
    shutil.copy(root / "masks" / "case_004.png", root / "coarse")
    for coarse_dir in ["coarse", str(root / "coarse")]:
        cases = Folder2DSource(root, coarse_dir=coarse_dir).cases()
        assert cases[2].coarse == str(root / "coarse" / "case_002.png")


def _empty_dir(tmp_path):
    d = tmp_path / "no_coarse"
    d.mkdir(exist_ok=True)
    save_png(d / "other.png", np.zeros((8, 8)))
    return d


def test_folder2d_missing_root_hints_synthetic(tmp_path):
    with pytest.raises(DataError, match=r"Folder2D data not found at .*data=shapes2d"):
        Folder2DSource(tmp_path / "nope").cases()


# ----------------------------------------------------------------------------- msd
def test_msd_4d_from_training_list(data):
    src = MSDSource(data["msd"])
    info = src.info()
    assert (info.spatial_dims, info.in_channels, info.modalities) == (3, 2, ["T2", "ADC"])
    assert info.label_map.names == ["background", "structure1", "structure2"]
    np.testing.assert_allclose(info.spacing, (0.8, 0.8, 1.5))  # from the first image header
    cases = src.cases()
    assert [c.id for c in cases] == ["synth_000", "synth_001", "synth_002"]
    assert cases[1].images == [str(data["msd"] / "imagesTr" / "synth_001.nii.gz")]
    assert cases[1].label == str(data["msd"] / "labelsTr" / "synth_001.nii.gz")
    assert nib.load(cases[0].images[0]).shape == (12, 12, 12, 2)


def test_msd_single_modality(data):
    info = MSDSource(data["msd1"]).info()
    assert info.in_channels == 1 and len(MSDSource(data["msd1"]).cases()) == 2
    assert nib.load(MSDSource(data["msd1"]).cases()[0].images[0]).shape == (12, 12, 12)


def test_msd_nnunet_v2_json_channel_files_and_macos_junk(data, tmp_path):
    root = tmp_path / "v2"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i in range(2):
        img = nib.load(data["msd"] / "imagesTr" / f"synth_00{i}.nii.gz")
        arr = np.asarray(img.dataobj)
        for ch in range(2):
            nib.save(nib.Nifti1Image(arr[..., ch], img.affine), root / "imagesTr" / f"p{i}_{ch:04d}.nii.gz")
        shutil.copy(data["msd"] / "labelsTr" / f"synth_00{i}.nii.gz", root / "labelsTr" / f"p{i}.nii.gz")
    (root / "imagesTr" / "._p0_0000.nii.gz").write_bytes(b"junk")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "T2", "1": "ADC"}, "labels": {"background": 0, "zone": 1, "lesion": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    src = MSDSource(root)
    assert src.info().label_map.names == ["background", "zone", "lesion"]
    assert src.info().in_channels == 2
    cases = src.cases()
    assert [c.id for c in cases] == ["p0", "p1"]
    assert [Path(p).name for p in cases[0].images] == ["p0_0000.nii.gz", "p0_0001.nii.gz"]
    (root / "imagesTr" / "p1_0001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"case p1 lacks channel file\(s\) \['p1_0001.nii.gz'\]"):
        MSDSource(root).cases()


def test_msd_listed_file_missing_and_bad_json(data, tmp_path):
    root = copy(data["msd"], tmp_path)
    (root / "labelsTr" / "synth_001.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/synth_001.nii.gz: listed in .*dataset.json"):
        MSDSource(root).cases()
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset.json: cannot parse"):
        MSDSource(root).info()
    with pytest.raises(DataError, match=r"MSD data not found at .*dataset.json"):
        MSDSource(tmp_path / "nope").cases()


# ----------------------------------------------------------------------------- brats
def test_brats_2021(data):
    src = BratsSource(data["brats"])
    info = src.info()
    assert (info.spatial_dims, info.in_channels, info.spacing) == (3, 4, (1.0, 1.0, 1.0))
    assert info.modalities == ["t1", "t1ce", "t2", "flair"]
    assert info.label_map.values == [0, 1, 2, 4] and set(info.label_map.regions) == {"wt", "tc", "et"}
    cases = src.cases()
    assert [c.id for c in cases] == ["BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"]
    folder = data["brats"] / "BraTS2021_00001"
    assert cases[1].images == [str(folder / f"BraTS2021_00001_{m}.nii.gz") for m in info.modalities]
    assert cases[1].label == str(folder / "BraTS2021_00001_seg.nii.gz")


def test_brats_2023_names_and_scheme(data):
    src = BratsSource(data["brats23"], label_scheme="brats2023", target="labels")
    assert src.info().label_map.values == [0, 1, 2, 3]
    folder = data["brats23"] / "BraTS-GLI-00000-000"
    assert src.cases()[0].images[3] == str(folder / "BraTS-GLI-00000-000-t2f.nii.gz")
    assert src.cases()[0].label == str(folder / "BraTS-GLI-00000-000-seg.nii.gz")
    # 2021-style file names are accepted with the 2023 scheme too; 2023 names are not with 2021
    assert len(BratsSource(data["brats"], label_scheme="brats2023").cases()) == 3
    with pytest.raises(DataError, match="BraTS-GLI-00000-000_t1.nii.gz"):
        BratsSource(data["brats23"]).cases()


def test_brats_missing_modality_names_folder_and_file(data, tmp_path):
    root = copy(data["brats"], tmp_path)
    (root / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        BratsSource(root).cases()
    assert err.value.problems == [
        f"{root / 'BraTS2021_00001'}: missing BraTS2021_00001_t2.nii.gz "
        f"(expected CASE/CASE_{{t1,t1ce,t2,flair,seg}}.nii.gz)"]
    scan = BratsSource(root).scan()  # the integrity check sees the rest
    assert len(scan.cases) == 2 and "BraTS2021_00001" in scan.ids


def test_brats_missing_root_message(tmp_path):
    with pytest.raises(DataError) as err:
        BratsSource(tmp_path / "none").cases()
    assert str(err.value) == (
        f"BraTS data not found at {tmp_path / 'none'}: expected case folders "
        "CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz; to try the built-in synthetic data use data=brats_synthetic")
    with pytest.raises(DataError, match="brats2021"):
        BratsSource(tmp_path, label_scheme="msd")


def test_brats_without_labels(data, tmp_path):
    root = copy(data["brats"], tmp_path)
    (root / "BraTS2021_00000" / "BraTS2021_00000_seg.nii.gz").unlink()
    with pytest.raises(DataError, match="BraTS2021_00000_seg.nii.gz"):
        BratsSource(root).cases()
    cases = BratsSource(root, require_labels=False).cases()
    assert cases[0].label is None and cases[1].label is not None


# ----------------------------------------------------------------------------- registry
def test_registry(data):
    assert set(SOURCES) == {"folder2d", "msd", "brats"}
    assert isinstance(build_source("brats", root=data["brats"], target="labels"), BratsSource)
    assert build_source("folder2d", root=data["shapes"], num_classes=2).info().in_channels == 3
    assert build_source("msd", root=str(data["msd"])).info().in_channels == 2
    with pytest.raises(DataError, match=r"data.format: expected one of \['brats', 'folder2d', 'msd'\]"):
        build_source("nifti", root=".")
    with pytest.raises(DataError, match=r"unknown option\(s\) \['scheme'\] for format 'brats'"):
        build_source("brats", root=".", scheme="brats2023")
    with pytest.raises(DataError, match=r"needs option\(s\) \['root'\]"):
        build_source("msd")
