"""mBA and boundary F against hand-computed values and brute-force oracles."""

import numpy as np
import pytest
import torch

from diffseg.metrics.boundary import boundary_f, ellipse_kernel, inner_boundary, mba, mba_radii


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
    assert boundary_f(g, g) == 1.0
    assert mba(g.numpy(), g.numpy()) == 1.0  # numpy masks are accepted too
    assert boundary_f(g.numpy(), g.long()) == 1.0


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


def test_boundary_f_shift_within_and_beyond_tolerance():
    # 6x6 squares shifted by 2 px: 12 of the 20 boundary pixels of either are within 1 px of the
    # other's boundary (P = R = 0.6), all are within 2 px.
    g = square(16, 4, 4, 6)
    p = square(16, 4, 6, 6)
    assert boundary_f(p, g, tolerances=(1,)) == pytest.approx(0.6)
    assert boundary_f(p, g, tolerances=(2,)) == pytest.approx(1.0)
    assert boundary_f(p, g) == pytest.approx((0.6 + 4 * 1.0) / 5)
    # a 1-px shift is within every tolerance 1..5
    assert boundary_f(square(16, 4, 5, 6), g) == pytest.approx(1.0)


def test_boundary_f_far_apart_is_zero_and_empty_conventions():
    g = square(30, 2, 2, 5)
    p = square(30, 20, 20, 5)  # 18 px away: beyond every tolerance
    assert boundary_f(p, g) == 0.0
    z = torch.zeros(30, 30, dtype=torch.bool)
    assert boundary_f(z, z) == 1.0
    assert boundary_f(~z, ~z) == 1.0
    assert boundary_f(z, ~z) == 0.0  # both boundaries empty but the masks differ
    assert boundary_f(z, g) == 0.0 and boundary_f(g, z) == 0.0


def test_boundary_f_against_brute_force():
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:40, :36]
    g = (yy - 20) ** 2 + (xx - 17) ** 2 < 12**2
    p = (yy - 19) ** 2 / 14**2 + (xx - 20) ** 2 / 9**2 < 1
    p[rng.random(p.shape) < 0.02] = True
    bp, bg = np.argwhere(inner_boundary(p)), np.argwhere(inner_boundary(g))
    d = np.sqrt(((bp[:, None, :] - bg[None, :, :]) ** 2).sum(-1))
    fs = []
    for t in (1, 2, 3, 4, 5):
        pr, rc = (d.min(1) <= t).mean(), (d.min(0) <= t).mean()
        fs.append(2 * pr * rc / (pr + rc))
    assert boundary_f(torch.from_numpy(p), torch.from_numpy(g)) == pytest.approx(np.mean(fs), abs=1e-12)


def test_inner_boundary_by_hand():
    m = np.zeros((5, 5), dtype=bool)
    m[1:4, 1:4] = True
    want = m.copy()
    want[2, 2] = False
    assert np.array_equal(inner_boundary(m), want)


def test_bad_input():
    with pytest.raises(ValueError, match="2D"):
        mba(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="same"):
        boundary_f(torch.zeros(4, 4, dtype=torch.bool), torch.zeros(4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="binary"):
        mba(torch.full((4, 4), 0.5), torch.zeros(4, 4))
    with pytest.raises(ValueError, match="tolerances"):
        boundary_f(torch.zeros(4, 4), torch.zeros(4, 4), tolerances=())
