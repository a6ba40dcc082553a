"""Overlap metrics against hand-worked closed forms."""

from collections import OrderedDict

import pytest
import torch

from diffseg.metrics.overlap import as_binary_mask, dice_iou, intersection_union, region_masks

BRATS23 = OrderedDict(wt=[1, 2, 3], tc=[1, 3], et=[3])


def test_region_masks_brats_regions_by_hand():
    labels = torch.tensor([[0, 1, 2], [3, 2, 0]])
    m = region_masks(labels, BRATS23)
    assert m.dtype == torch.bool and m.shape == (3, 2, 3)
    assert m[0].tolist() == [[False, True, True], [True, True, False]]  # wt = 1,2,3
    assert m[1].tolist() == [[False, True, False], [True, False, False]]  # tc = 1,3
    assert m[2].tolist() == [[False, False, False], [True, False, False]]  # et = 3


def test_region_masks_one_class_each_3d_and_order():
    labels = torch.randint(0, 4, (3, 4, 5))
    m = region_masks(labels, {"c2": [2], "c1": [1]})
    assert torch.equal(m[0], labels == 2) and torch.equal(m[1], labels == 1)


@pytest.mark.parametrize(
    "labels, regions",
    [
        (torch.zeros(3, 3), BRATS23),  # float labels
        (torch.zeros(3, 3, dtype=torch.long), {}),
        (torch.zeros(3, 3, dtype=torch.long), {"wt": []}),
        (torch.zeros(3, 3, dtype=torch.long), {"wt": [1.5]}),
    ],
)
def test_region_masks_bad_input(labels, regions):
    with pytest.raises(ValueError):
        region_masks(labels, regions)


def test_dice_iou_closed_form():
    # region 0: |P| = 4, |G| = 6, |P∩G| = 3 -> dice 6/10, iou 3/7
    pred = torch.zeros(4, 1, 10, dtype=torch.bool)
    target = torch.zeros_like(pred)
    pred[0, 0, 0:4] = True
    target[0, 0, 1:7] = True
    # region 1: identical -> 1, 1; region 2: pred empty, target not -> 0, 0; region 3: both empty -> 1, 1
    pred[1, 0, 2:5] = target[1, 0, 2:5] = True
    target[2, 0, 0] = True
    dice, iou = dice_iou(pred, target)
    assert dice.dtype == torch.float64 and dice.shape == (4,)
    torch.testing.assert_close(dice, torch.tensor([0.6, 1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(iou, torch.tensor([3 / 7, 1.0, 0.0, 1.0], dtype=torch.float64))
    # the empty-vs-empty score is a parameter and touches nothing else
    dice0, iou0 = dice_iou(pred, target, empty_score=0.0)
    torch.testing.assert_close(dice0, torch.tensor([0.6, 1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(iou0, torch.tensor([3 / 7, 1.0, 0.0, 0.0], dtype=torch.float64))
    # the other way round (target empty, pred not) is also 0
    d, i = dice_iou(target[2:3], pred[2:3])
    assert d.item() == 0.0 and i.item() == 0.0


def test_dice_iou_accepts_01_integers_3d():
    pred = torch.zeros(1, 2, 2, 2, dtype=torch.long)
    target = torch.zeros_like(pred)
    pred[0, 0] = 1  # 4 voxels
    target[0, :, 0] = 1  # 4 voxels, 2 shared
    dice, iou = dice_iou(pred, target)
    assert dice.item() == pytest.approx(0.5) and iou.item() == pytest.approx(2 / 6)


def test_intersection_union_counts_and_pooled_iou():
    p1 = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    g1 = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    p2 = torch.tensor([[1, 1, 1, 1]], dtype=torch.bool)
    g2 = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    i1, u1 = intersection_union(p1, g1)
    i2, u2 = intersection_union(p2, g2)
    assert i1.dtype == torch.float64 and i1.tolist() == [1.0] and u1.tolist() == [3.0]
    assert i2.tolist() == [3.0] and u2.tolist() == [4.0]
    # pooled IoU = (1 + 3) / (3 + 4), not the mean of 1/3 and 3/4
    assert ((i1 + i2) / (u1 + u2)).item() == pytest.approx(4 / 7)


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="same shape"):
        dice_iou(torch.zeros(1, 3, 3, dtype=torch.bool), torch.zeros(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary"):
        as_binary_mask(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="spatial"):
        intersection_union(torch.zeros(1, 2, 2, 2, 2, dtype=torch.bool), torch.zeros(1, 2, 2, 2, 2, dtype=torch.bool))
