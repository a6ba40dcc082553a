"""SegRefiner coarse masks (docs/methods.md §3) as the reference's perturb_seg/modify_boundary: IoU below the
target with no lower bound, holes and islands, rectangles anywhere, OpenCV's kernels, deterministic."""
import numpy as np
import pytest

from scipy import ndimage

from diffseg.data.coarse import (drop_closest_run, ellipse_element, make_coarse_mask, mask_iou, perturb,
                                 simplify_contours, structuring_element)
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


@pytest.mark.parametrize("target", [0.8, 0.6])
def test_iou_below_the_target_with_no_lower_bound(target):
    """The reference perturbs until the IoU with the simplified mask drops below the target (its only
    bound); with the ground truth the IoU spreads far below it (no lower bound)."""
    masks = random_masks() + list(hand_made().values())
    ious, to_simplified, fp, fn = [], [], 0, 0
    for i, gt in enumerate(masks):
        simplified = simplify_contours(gt, np.random.default_rng(i))
        coarse = perturb(simplified, np.random.default_rng(1000 + i), iou_target=target)
        assert coarse.dtype == np.bool_ and coarse.shape == gt.shape
        to_simplified.append(mask_iou(coarse, simplified))
        coarse = make_coarse_mask(gt, np.random.default_rng(i), iou_target=target)
        ious.append(mask_iou(coarse, gt))
        fp += np.count_nonzero(coarse & ~gt)
        fn += np.count_nonzero(~coarse & gt)
    ious, to_simplified = np.array(ious), np.array(to_simplified)
    assert np.all(to_simplified < target), to_simplified
    assert np.count_nonzero(to_simplified < 0.5) >= 5  # the last round may overshoot far below: no lower bound
    # with the ground truth: below 0.8 at the reference's target; below the target for most masks at 0.6
    # (the bound holds for the simplified mask, which is itself a little off the ground truth)
    assert np.all(ious < 0.8) if target == 0.8 else np.median(ious) < target, ious
    assert (ious < 0.5).mean() > 0.2  # no lower bound: a [0.5, 0.8) generator would fail here
    assert fp > 0 and fn > 0  # the masks both grow (dilation) and shrink (erosion / simplification)


def test_holes_and_islands_away_from_the_boundary():
    """Seed pixels flipped at the centres of rectangles placed anywhere, grown by the morphology: islands
    in the background and holes in the object, farther from the true boundary than any kernel reaches
    (9 px) from it, which rectangles confined to the boundary cannot make."""
    small = disk(64, 6, (10, 10))   # a small object: most of the image is background
    big = disk(64, 26, (32, 32))    # a large one: most of the image is object
    far_from_small = ndimage.distance_transform_edt(~small) > 12
    deep_in_big = ndimage.distance_transform_edt(big) > 12
    islands = holes = 0
    for seed in range(20):
        c = make_coarse_mask(small, np.random.default_rng(seed))
        islands += bool((c & far_from_small).any())
        c = make_coarse_mask(big, np.random.default_rng(seed))
        holes += bool((~c & deep_in_big).any())
    assert islands >= 3 and holes >= 3, (islands, holes)
    # shapes2d: holes (background enclosed by the mask) and extra components (islands) both occur
    with_holes = with_islands = 0
    for i, gt in enumerate(random_masks(60)):
        c = make_coarse_mask(gt, np.random.default_rng(i))
        with_holes += bool((ndimage.binary_fill_holes(c) & ~c).any())
        with_islands += ndimage.label(c)[1] > ndimage.label(gt)[1]
    assert with_holes >= 1 and with_islands >= 5, (with_holes, with_islands)


def test_structuring_elements_are_opencvs():
    """cv2.getStructuringElement(MORPH_ELLIPSE, (5, 5)) and its degenerate half sizes (w x h)."""
    np.testing.assert_array_equal(structuring_element("ellipse", 5).astype(int),
                                  [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]])
    assert structuring_element("flat_ellipse", 5).shape == (2, 5)
    assert structuring_element("tall_ellipse", 5).shape == (5, 2)
    np.testing.assert_array_equal(structuring_element("flat_ellipse", 3).astype(int), [[0, 1, 0]])
    assert structuring_element("square", 4).all() and structuring_element("square", 4).shape == (4, 4)
    np.testing.assert_array_equal(ellipse_element(1, 7).astype(int), np.ones((7, 1), int))


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
    pixel[5, 5] = 255  # non-empty uint8 input: its contour is too short to simplify, the morphology moves it
    outs = [make_coarse_mask(pixel, np.random.default_rng(seed)) for seed in range(5)]
    assert all(o.dtype == np.bool_ and mask_iou(o, pixel > 0) < 0.8 for o in outs)


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


def test_simplified_contour_is_a_coarse_polygon_with_holes_filled():
    gt = disk(128, 40, (64, 64))
    ious = [mask_iou(simplify_contours(gt, np.random.default_rng(s)), gt) for s in range(5)]
    assert all(0.8 < v < 1.0 for v in ious), ious  # ~10% of the vertices kept, a run of 10% dropped
    ring = disk(128, 50, (64, 64)) & ~disk(128, 20, (64, 64))
    filled = simplify_contours(ring, np.random.default_rng(0))
    assert filled[64, 64] and filled[64, 64 + 35]  # every contour is filled: the hole too (the reference)


def test_dropped_run_starts_among_the_closest_endpoints():
    """Brute force over every start: the removed run's endpoint distance is among the ceil(10%) smallest."""
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    pts = np.stack([20 * np.sin(t), 80 * np.cos(t) + 5 * np.cos(7 * t)], axis=1)  # an elongated wavy outline
    run = 20
    dist = np.array([((pts[i] - pts[i + run]) ** 2).sum() for i in range(len(pts) - run)])
    allowed = set(np.argsort(dist, kind="stable")[:18].tolist())  # ceil(0.1 x 180)
    starts = set()
    for seed in range(30):
        rest = drop_closest_run(pts, np.random.default_rng(seed))
        assert len(rest) == 180
        kept = {tuple(p) for p in rest}
        removed = [i for i in range(len(pts)) if tuple(pts[i]) not in kept]
        assert removed == list(range(removed[0], removed[0] + run))  # one consecutive run
        starts.add(removed[0])
    assert starts <= allowed and len(starts) > 5


def test_bad_arguments():
    with pytest.raises(DataError, match="iou_target"):
        make_coarse_mask(disk(), np.random.default_rng(0), iou_target=1.5)
    with pytest.raises(DataError, match="2D mask"):
        make_coarse_mask(np.ones((4, 4, 4)), np.random.default_rng(0))
