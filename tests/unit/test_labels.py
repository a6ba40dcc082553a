"""Label maps: BraTS 2021/2023 worked out by hand, MONAI as an oracle for the 2021 regions, binary masks."""
import time

import nibabel as nib
import numpy as np
import pytest

from diffseg.data.errors import DataError
from diffseg.data.labels import LabelMap, binary_label_map, brats_label_map, class_label_map

# every BraTS label value, twice, in a tiny 2x4 "volume"; expected class indices and regions by hand
RAW_2021 = np.array([[0, 1, 2, 4], [4, 2, 1, 0]])
RAW_2023 = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
CLASSES = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
WT = np.array([[0, 1, 1, 1], [1, 1, 1, 0]], bool)  # NCR + ED + ET
TC = np.array([[0, 1, 0, 1], [1, 0, 1, 0]], bool)  # NCR + ET
ET = np.array([[0, 0, 0, 1], [1, 0, 0, 0]], bool)  # ET


@pytest.mark.parametrize("scheme,raw", [("brats2021", RAW_2021), ("brats2023", RAW_2023)])
def test_brats_schemes_by_hand(scheme, raw):
    lm = brats_label_map(scheme, "regions")
    assert lm.num_classes == 4
    assert lm.names == ["background", "ncr", "ed", "et"]
    classes = lm.encode(raw, source="x.nii.gz")
    assert classes.dtype == np.int64
    np.testing.assert_array_equal(classes, CLASSES)
    regions = lm.region_masks(classes)
    assert list(regions) == ["wt", "tc", "et"]
    np.testing.assert_array_equal(regions["wt"], WT)
    np.testing.assert_array_equal(regions["tc"], TC)
    np.testing.assert_array_equal(regions["et"], ET)
    np.testing.assert_array_equal(lm.decode(classes), raw)


def test_brats_labels_target():
    lm = brats_label_map("brats2023", "labels")
    assert lm.regions == {"ncr": [1], "ed": [2], "et": [3]}
    regions = lm.region_masks(CLASSES)
    np.testing.assert_array_equal(regions["ncr"], np.array([[0, 1, 0, 0], [0, 0, 1, 0]], bool))
    np.testing.assert_array_equal(regions["ed"], np.array([[0, 0, 1, 0], [0, 1, 0, 0]], bool))
    np.testing.assert_array_equal(regions["et"], ET)


def test_brats2021_regions_match_monai():
    """Independent oracle: MONAI's transform is correct for the 2021 values (channels TC, WT, ET)."""
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    raw = np.random.default_rng(0).choice([0, 1, 2, 4], size=(1, 9, 8, 7))
    oracle = np.asarray(ConvertToMultiChannelBasedOnBratsClasses()(raw))
    regions = brats_label_map("brats2021").region_masks(brats_label_map("brats2021").encode(raw))
    for channel, name in enumerate(["tc", "wt", "et"]):
        np.testing.assert_array_equal(regions[name], oracle[channel][None])


def test_2023_file_read_with_2021_scheme_names_the_file(tmp_path):
    path = tmp_path / "BraTS-GLI-00000-000-seg.nii.gz"
    nib.save(nib.Nifti1Image(RAW_2023[..., None].astype(np.uint8), np.eye(4)), path)
    data = np.asanyarray(nib.load(path).dataobj)
    with pytest.raises(DataError) as err:
        brats_label_map("brats2021").encode(data, source=str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "[3]" in msg and "[0, 1, 2, 4]" in msg
    assert brats_label_map("brats2021").invalid_values(data) == [3]
    # float arrays (nibabel get_fdata) with integral values encode the same
    np.testing.assert_array_equal(brats_label_map("brats2023").encode(nib.load(path).get_fdata())[..., 0],
                                  CLASSES)


def test_unknown_scheme_or_target_lists_options():
    with pytest.raises(DataError, match=r"brats2021.*brats2023.*'brats2018'"):
        brats_label_map("brats2018")
    with pytest.raises(DataError, match=r"labels.*regions.*'wt'"):
        brats_label_map("brats2021", "wt")


def test_binary_folder_masks():
    lm = binary_label_map()
    mask = np.array([[0, 255, 255], [0, 0, 255]], np.uint8)
    np.testing.assert_array_equal(lm.encode(mask), [[0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(lm.encode(mask.astype(bool)), [[0, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(lm.encode(np.array([0.0, 0.4, 1.0])), [0, 1, 1])
    assert lm.regions == {"foreground": [1]}
    with pytest.raises(DataError, match="m.png"):
        lm.encode(np.array([0, -1]), source="m.png")


def test_class_ids_and_non_integer_values():
    lm = class_label_map(3, ["bg", "a", "b"])
    np.testing.assert_array_equal(lm.encode(np.array([0, 2, 1])), [0, 2, 1])
    with pytest.raises(DataError, match=r"mask\.png.*\[7\].*\[0, 1, 2\]"):
        lm.encode(np.array([0, 7, 1], np.uint8), source="mask.png")
    with pytest.raises(DataError, match=r"\[1\.5\]"):
        lm.encode(np.array([0.0, 1.5]))


def test_invalid_label_maps_list_every_problem():
    with pytest.raises(DataError) as err:
        LabelMap([0, 1, 1], ["bg", "a"], regions={"x": [5]})
    assert len(err.value.problems) == 3  # names count, duplicate values, bad region


def test_encode_is_fast_on_a_brats_volume():
    raw = np.random.default_rng(0).choice(np.array([0, 1, 2, 4], np.uint8), size=(240, 240, 155))
    lm = brats_label_map()
    start = time.perf_counter()
    classes = lm.encode(raw)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.5, elapsed  # a lookup table: ~0.1 s on one core
    np.testing.assert_array_equal(np.bincount(classes.ravel(), minlength=4),
                                  [np.count_nonzero(raw == v) for v in (0, 1, 2, 4)])
