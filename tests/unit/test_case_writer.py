"""Decoding class probabilities into a data set's label values (diffseg.inference.case_writer)."""
import numpy as np
import pytest
import torch

from diffseg.data.labels import LabelMap, brats_label_map, class_label_map
from diffseg.inference.case_writer import decode_probabilities, nested_region_chain


def _probs(*columns):
    """Class probabilities (C, N) from per-voxel rows [p_bg, p_1, ...]."""
    return torch.tensor(columns, dtype=torch.float32).T


def test_brats_regions_are_decoded_the_brats_way():
    # voxel rows: [bg, ncr, ed, et]; WT = ncr+ed+et, TC = ncr+et, ET = et, each present above 0.5
    probs = _probs([0.40, 0.20, 0.15, 0.25],   # WT 0.60, TC 0.45: ED (argmax would say background)
                   [0.10, 0.30, 0.05, 0.55],   # ET 0.55: ET
                   [0.10, 0.35, 0.20, 0.35],   # TC 0.70, ET 0.35: NCR
                   [0.60, 0.10, 0.10, 0.20],   # WT 0.40: background
                   [0.00, 0.00, 1.00, 0.00])   # one-hot ED
    np.testing.assert_array_equal(decode_probabilities(probs, brats_label_map("brats2021")), [2, 4, 1, 0, 2])
    np.testing.assert_array_equal(decode_probabilities(probs, brats_label_map("brats2023")), [2, 3, 1, 0, 2])


def test_non_nested_label_maps_take_the_most_probable_class():
    probs = _probs([0.40, 0.20, 0.15, 0.25], [0.1, 0.3, 0.05, 0.55])
    # BraTS with target=labels (ncr / ed / et regions): argmax
    np.testing.assert_array_equal(decode_probabilities(probs, brats_label_map("brats2021", "labels")), [0, 4])
    msd = LabelMap([0, 2, 5, 7], ["bg", "a", "b", "c"])  # dataset.json values, one region per class
    np.testing.assert_array_equal(decode_probabilities(probs, msd), [0, 7])
    assert nested_region_chain(class_label_map(4).regions, 4) is None


@pytest.mark.parametrize("regions,expected", [
    ({"wt": [1, 2, 3], "tc": [1, 3], "et": [3]}, [([1, 2, 3], 2), ([1, 3], 1), ([3], 3)]),
    ({"fg": [1]}, [([1], 1)]),
    ({"wt": [1, 2, 3], "tc": [1, 3]}, None),          # TC adds two classes
    ({"a": [1, 2], "b": [2, 3]}, None),                # not nested
    ({"tc": [1, 3], "et": [3]}, None),                 # the largest region misses ED
])
def test_nested_region_chain(regions, expected):
    assert nested_region_chain(regions, 4 if len(regions) != 1 else 2) == expected
