"""SegRefiner coarse masks (docs/methods.md §3): IoU lands in the target range, binary, deterministic."""
import numpy as np
import pytest

from diffseg.data.coarse import make_coarse_mask, mask_iou, simplify_contours
from diffseg.data.errors import DataError
from diffseg.data.synthetic import shapes2d_sample


def disk(size=64, r=20, centre=(32, 32)):
    yy, xx = np.mgrid[:size, :size]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < r * r


def hand_made():
    bar = np.zeros((64, 64), bool)
    bar[30:33, 4:60] = True  # 3 px thin bar
    return {"disk": disk(), "two blobs": disk(r=10, centre=(18, 18)) | disk(r=8, centre=(46, 44)),
            "thin bar": bar, "ring": disk(r=25) & ~disk(r=12), "full image": np.ones((32, 32), bool),
            "corner blob": disk(r=14, centre=(0, 0))}


def random_masks(n=50, size=64):
    return [shapes2d_sample(np.random.default_rng([7, i]), size)[1] > 0 for i in range(n)]


@pytest.mark.parametrize("iou_range", [(0.5, 0.8), (0.3, 0.6)])
def test_iou_lands_in_range_for_every_mask(iou_range):
    lo, hi = iou_range
    masks = random_masks() + list(hand_made().values())
    ious, fp, fn = [], 0, 0
    for i, gt in enumerate(masks):
        coarse = make_coarse_mask(gt, np.random.default_rng(i), iou_range=iou_range)
        assert coarse.dtype == np.bool_ and coarse.shape == gt.shape and coarse.any()
        ious.append(mask_iou(coarse, gt))
        fp += np.count_nonzero(coarse & ~gt)
        fn += np.count_nonzero(~coarse & gt)
    ious = np.array(ious)
    assert np.all((ious >= lo) & (ious < hi)), ious[(ious < lo) | (ious >= hi)]  # no failures allowed
    assert fp > 0 and fn > 0  # the masks both grow (dilation) and shrink (erosion / simplification)
    assert ious.std() > 0.02  # not one fixed degradation


def test_deterministic_given_rng():
    gt = random_masks(1)[0]
    a = make_coarse_mask(gt, np.random.default_rng(3))
    b = make_coarse_mask(gt, np.random.default_rng(3))
    c = make_coarse_mask(gt, np.random.default_rng(4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_empty_and_tiny_masks():
    empty = np.zeros((16, 16), np.uint8)
    out = make_coarse_mask(empty, np.random.default_rng(0))
    assert out.dtype == np.bool_ and not out.any()
    pixel = empty.copy()
    pixel[5, 5] = 255  # non-empty uint8 input
    for seed in range(5):
        out = make_coarse_mask(pixel, np.random.default_rng(seed))
        assert out.any() and mask_iou(out, pixel > 0) == 0.5  # the only IoU a 1-px mask allows in range


def test_mask_iou_closed_form():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[0:4, 0:4] = True  # 16 px
    b[2:6, 2:6] = True  # 16 px, overlap 2x2 = 4
    assert mask_iou(a, b) == pytest.approx(4 / 28)
    assert mask_iou(a, a) == 1.0 and mask_iou(a, ~a) == 0.0
    assert mask_iou(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    with pytest.raises(DataError, match="same shape"):
        mask_iou(a, a[:5])


def test_simplified_contour_is_a_coarse_polygon():
    gt = disk(128, 40, (64, 64))
    ious = [mask_iou(simplify_contours(gt, np.random.default_rng(s)), gt) for s in range(5)]
    assert all(0.85 < v < 1.0 for v in ious), ious  # ~10% of the vertices kept: close, not equal
    holes = simplify_contours(disk(128, 50, (64, 64)) & ~disk(128, 20, (64, 64)), np.random.default_rng(0))
    assert not holes[64, 64] and holes[64, 64 + 35]  # a hole stays a hole


def test_bad_arguments():
    with pytest.raises(DataError, match="iou_range"):
        make_coarse_mask(disk(), np.random.default_rng(0), iou_range=(0.8, 0.5))
    with pytest.raises(DataError, match="2D mask"):
        make_coarse_mask(np.ones((4, 4, 4)), np.random.default_rng(0))
