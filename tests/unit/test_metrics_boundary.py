"""mBA and boundary F against hand-computed values and brute-force oracles."""

import numpy as np
import pytest
import torch

from diffseg.metrics.boundary import disk, ellipse_kernel, fbound, mba, mba_radii, seg2bmap
from diffseg.metrics.overlap import wcov


def test_ellipse_kernel_matches_opencv_by_hand():
    # cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)) and (5, 5), written out by hand
    k3 = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    k5 = [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]]
    k7 = [
        [0, 0, 0, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 1, 0, 0, 0],
    ]
    assert ellipse_kernel(0).astype(int).tolist() == [[1]]
    assert ellipse_kernel(1).astype(int).tolist() == k3
    assert ellipse_kernel(2).astype(int).tolist() == k5
    assert ellipse_kernel(3).astype(int).tolist() == k7
    with pytest.raises(ValueError):
        ellipse_kernel(1.5)


def test_mba_radii_truncate_toward_zero():
    assert mba_radii(64, 64) == [1, 1, 1, 1, 1]  # r_max < 1: int() of a negative step is 0
    assert mba_radii(300, 300) == [1, 1, 1, 1, 1]  # r_max = 2, steps 0.2 * i
    assert mba_radii(400, 400) == [1, 1, 1, 2, 2]  # r_max = 8/3, steps i/3
    assert mba_radii(1024, 2048) == [1, 2, 4, 6, 8]  # r_max = 10.24, steps 1.848 * i


def square(n, r0, c0, k, w=None):
    m = torch.zeros(n, w or n, dtype=torch.bool)
    m[r0 : r0 + k, c0 : c0 + k] = True
    return m


def test_mba_identical_is_one():
    g = square(40, 5, 7, 20)
    assert mba(g, g) == 1.0
    assert fbound(g, g) == 1.0
    assert mba(g.numpy(), g.numpy()) == 1.0  # numpy masks are accepted too
    assert fbound(g.numpy(), g.long()) == 1.0


def test_mba_shifted_square_by_hand():
    # 8x8 image, radius 1 (cross kernel). gt = rows/cols 2..5. Dilation = 6x6 block minus its 4
    # corners (32 px), erosion = the 2x2 centre (4 px): band = 28 px. pred shifted 1 px right errs on
    # col 2 (4 px) and col 6 (4 px), all inside the band: accuracy 20/28 at every radius.
    g = square(8, 2, 2, 4)
    p = square(8, 2, 3, 4)
    assert mba(p, g) == pytest.approx(5 / 7)


def test_mba_border_is_not_a_boundary():
    # gt = left half of a 6x6 image: the band (r=1) is cols 2 and 3 only, nothing along the image edge
    g = torch.zeros(6, 6, dtype=torch.bool)
    g[:, :3] = True
    p = g.clone()
    p[0, 0] = False  # outside the band: not counted
    assert mba(p, g) == 1.0
    p[0, 2] = False  # inside the 12-px band
    assert mba(p, g) == pytest.approx(11 / 12)


def test_mba_empty_band_convention():
    z = torch.zeros(10, 10, dtype=torch.bool)
    assert mba(z, z) == 1.0
    assert mba(~z, ~z) == 1.0
    p = z.clone()
    p[0, :5] = True  # 5 wrong pixels of 100, gt has no boundary -> whole-image pixel accuracy
    assert mba(p, z) == pytest.approx(0.95)
    assert mba(z, ~z) == 0.0


def _band_brute_force(g, r):
    """Pixels whose (2r+1) elliptical neighbourhood, clipped to the image, holds both 0 and 1."""
    k = ellipse_kernel(r)
    h, w = g.shape
    lo = np.ones_like(g, dtype=bool)
    hi = np.zeros_like(g, dtype=bool)
    for dy, dx in np.argwhere(k) - r:
        ys, xs = slice(max(dy, 0), h + min(dy, 0)), slice(max(dx, 0), w + min(dx, 0))
        yd, xd = slice(max(-dy, 0), h + min(-dy, 0)), slice(max(-dx, 0), w + min(-dx, 0))
        hi[yd, xd] |= g[ys, xs]
        lo[yd, xd] &= g[ys, xs]
    return hi & ~lo


def test_mba_against_brute_force_band_with_varying_radii():
    rng = np.random.default_rng(1)
    h = w = 400  # radii [1, 1, 1, 2, 2]
    yy, xx = np.mgrid[:h, :w]
    g = (yy - 200) ** 2 / 120**2 + (xx - 190) ** 2 / 90**2 < 1
    p = g ^ (rng.random((h, w)) < 0.2)
    want = np.mean([(p == g)[b].mean() for b in (_band_brute_force(g, r) for r in mba_radii(h, w))])
    assert mba(torch.from_numpy(p), torch.from_numpy(g)) == pytest.approx(want, abs=1e-12)


def _seg2bmap_brute_force(m: np.ndarray) -> np.ndarray:
    """DAVIS seg2bmap written pixel by pixel: differs from its right, lower or lower-right neighbour
    (a neighbour outside the image counts as 0); last row: right neighbour only; last column: lower only;
    the bottom-right pixel never."""
    h, w = m.shape
    out = np.zeros_like(m, dtype=bool)

    def at(y, x):
        return bool(m[y, x]) if y < h and x < w else False

    for y in range(h):
        for x in range(w):
            if y == h - 1 and x == w - 1:
                continue
            if y == h - 1:
                out[y, x] = at(y, x) != at(y, x + 1)
            elif x == w - 1:
                out[y, x] = at(y, x) != at(y + 1, x)
            else:
                out[y, x] = any(at(y, x) != at(y + dy, x + dx) for dy, dx in ((0, 1), (1, 0), (1, 1)))
    return out


def _fbound_brute_force(p: np.ndarray, g: np.ndarray) -> float:
    """The reference's db_eval_boundary for d = 1..5, by pairwise distances between boundary pixels."""
    bp, bg = np.argwhere(_seg2bmap_brute_force(p)), np.argwhere(_seg2bmap_brute_force(g))
    fs = []
    for d in range(1, 6):
        if len(bp) == 0 and len(bg) == 0:
            pr, rc = 1.0, 1.0
        elif len(bp) == 0:
            pr, rc = 1.0, 0.0
        elif len(bg) == 0:
            pr, rc = 0.0, 1.0
        else:
            dist2 = ((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1)
            pr, rc = (dist2.min(1) <= d * d).mean(), (dist2.min(0) <= d * d).mean()
        fs.append(0.0 if pr + rc == 0 else 2 * pr * rc / (pr + rc))
    return float(np.mean(fs))


def test_seg2bmap_by_hand_and_brute_force():
    m = np.zeros((4, 5), dtype=bool)
    m[1:3, 1:3] = True
    want = np.array([[1, 1, 1, 0, 0],   # (0, 0) differs from its lower-right neighbour
                     [1, 0, 1, 0, 0],
                     [1, 1, 1, 0, 0],
                     [0, 0, 0, 0, 0]], dtype=bool)
    assert np.array_equal(seg2bmap(m), want)
    rng = np.random.default_rng(0)
    for _ in range(20):
        r = rng.random((int(rng.integers(1, 9)), int(rng.integers(1, 9)))) < rng.random()
        assert np.array_equal(seg2bmap(r), _seg2bmap_brute_force(r))
    assert np.array_equal(disk(2).astype(int).sum(), 13)  # skimage.morphology.disk(2)


def test_fbound_against_brute_force_on_random_masks():
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(40):
        h, w = int(rng.integers(2, 20)), int(rng.integers(2, 20))
        kind = rng.integers(4)
        g = rng.random((h, w)) < rng.random()
        p = g ^ (rng.random((h, w)) < 0.15) if kind else rng.random((h, w)) < rng.random()
        cases.append((p, g))
    z = np.zeros((9, 11), dtype=bool)
    blob = z.copy()
    blob[2:6, 3:8] = True
    cases += [(z, z), (~z, z), (z, blob), (blob, z), (~z, blob), (blob, blob)]  # empty boundaries included
    for p, g in cases:
        want = _fbound_brute_force(p, g)
        assert fbound(torch.from_numpy(p), torch.from_numpy(g)) == pytest.approx(want, abs=1e-12), (p, g)
    # the reference's empty-boundary conventions
    assert fbound(z, z) == 1.0 and fbound(~z, z) == 1.0  # both boundaries empty: P = R = 1
    assert fbound(z, blob) == 0.0 and fbound(blob, z) == 0.0  # one empty: (P, R) = (1, 0) or (0, 1)


def test_fbound_shift_within_and_beyond_the_disk():
    # seg2bmap of a 6x6 square at (4, 4): the square's top/left rows and the pixels just outside its
    # bottom/right; the same square 2 px to the right: matched within d >= 2 only
    g = square(16, 4, 4, 6)
    p = square(16, 4, 6, 6)
    assert fbound(p, g, radii=(2,)) == pytest.approx(1.0)
    assert fbound(p, g, radii=(1,)) < 1.0
    assert fbound(p, g) == pytest.approx((fbound(p, g, radii=(1,)) + 4.0) / 5)
    assert fbound(square(30, 20, 20, 5), square(30, 2, 2, 5)) == 0.0  # 18 px apart: beyond every radius


def test_wcov_against_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(30):
        shape = (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        p, g = rng.random(shape) < rng.random(), rng.random(shape) < rng.random() * rng.integers(2)
        a, b = sum(bool(v) for v in p.flat), sum(bool(v) for v in g.flat)
        want = 1.0 if a == b == 0 else min(a, b) / max(a, b)
        assert wcov(torch.from_numpy(p), torch.from_numpy(g)) == pytest.approx(want)
    z = torch.zeros(5, 5, dtype=torch.bool)
    assert wcov(z, z) == 1.0 and wcov(~z, z) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        wcov(z, torch.zeros(5, 4, dtype=torch.bool))


def test_bad_input():
    with pytest.raises(ValueError, match="2D"):
        mba(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same"):
        fbound(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary"):
        mba(torch.full((4, 4), 0.5), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="radii"):
        fbound(torch.zeros(4, 4), torch.zeros(4, 4), radii=())
