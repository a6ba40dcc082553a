"""HD95 / NSD against closed forms (shifted boxes) and a brute-force numpy oracle."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffseg.metrics.surface import hd95, image_diagonal, nsd


def box(shape, lo, hi):
    m = torch.zeros(shape, dtype=torch.bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.mark.parametrize("shift", [1, 2, 3])
def test_hd95_shifted_square_anisotropic(shift):
    # every surface distance is <= shift along the shifted axis, and the far face sits at exactly that
    # distance (25% of the surface > 5%), so HD95 = shift * spacing of that axis.
    a = box((16, 16), (4, 4), (10, 10))[None]
    b = box((16, 16), (4, 4 + shift), (10, 10 + shift))[None]
    assert hd95(b, a, (1.0, 1.0)).item() == pytest.approx(shift)
    assert hd95(b, a, (0.5, 3.0)).item() == pytest.approx(3.0 * shift)
    assert hd95(a, b, (3.0, 0.5)).item() == pytest.approx(0.5 * shift)


def test_hd95_shifted_cube_anisotropic_3d():
    a = box((12, 12, 12), (3, 3, 3), (8, 8, 8))
    b = box((12, 12, 12), (4, 3, 3), (9, 8, 8))  # shift 1 voxel along axis 0
    out = hd95(torch.stack([b, a]), torch.stack([a, a]), (2.0, 0.8, 1.5))
    assert out.shape == (2,) and out.dtype == torch.float64
    assert out.tolist() == pytest.approx([2.0, 0.0])


def test_nsd_shift_vs_tolerance_by_hand():
    # 6x6 squares shifted by 2 px. Of the 20 surface pixels of b, 12 are within 1 px of a's surface
    # (top and bottom rows except the outermost pixel: 2 x 5; the left column's pixels next to the
    # corners: 2), symmetric for a -> b: NSD(1) = 24 / 40. Within 2 px: all of them.
    a = box((16, 16), (4, 4), (10, 10))[None]
    b = box((16, 16), (4, 6), (10, 12))[None]
    assert nsd(b, a, 1.0, tolerance=1.0).item() == pytest.approx(0.6)
    assert nsd(b, a, 1.0, tolerance=2.0).item() == pytest.approx(1.0)
    # tolerance is in mm: with 0.5 mm pixels the 2-px shift is 1 mm
    assert nsd(b, a, (0.5, 0.5), tolerance=1.0).item() == pytest.approx(1.0)
    assert nsd(b, a, (0.5, 0.5), tolerance=0.5).item() == pytest.approx(0.6)


def test_identical_masks():
    a = box((10, 10, 10), (2, 3, 4), (7, 8, 9))[None]
    assert hd95(a, a, (1.0, 2.0, 3.0)).item() == 0.0
    assert nsd(a, a, (1.0, 2.0, 3.0), tolerance=0.0).item() == 1.0


def test_empty_conventions_no_nan():
    a = box((8, 10), (2, 2), (5, 5))
    z = torch.zeros_like(a)
    pred = torch.stack([z, a, z])  # both empty, pred empty, target empty
    target = torch.stack([z, z, a])
    sp = (2.0, 0.5)
    diag = math.sqrt((8 * 2.0) ** 2 + (10 * 0.5) ** 2)
    assert image_diagonal((8, 10), sp) == pytest.approx(diag)
    assert hd95(pred, target, sp).tolist() == pytest.approx([0.0, diag, diag])
    assert nsd(pred, target, sp).tolist() == [1.0, 0.0, 0.0]


def _edges(m):
    m = np.pad(m, 1)
    return (m & ~ndimage.binary_erosion(m))[1:-1, 1:-1]


def test_against_brute_force_oracle():
    rng = np.random.default_rng(0)
    sp = np.array([0.7, 1.9])
    for _ in range(3):
        p = ndimage.binary_opening(rng.random((24, 20)) < 0.55)
        g = ndimage.binary_opening(rng.random((24, 20)) < 0.55)
        cp, cg = np.argwhere(_edges(p)) * sp, np.argwhere(_edges(g)) * sp
        d = np.sqrt(((cp[:, None, :] - cg[None, :, :]) ** 2).sum(-1))
        d_pg, d_gp = d.min(1), d.min(0)
        want_hd = max(np.percentile(d_pg, 95), np.percentile(d_gp, 95))
        want_nsd = ((d_pg <= 1.5).sum() + (d_gp <= 1.5).sum()) / (len(d_pg) + len(d_gp))
        tp, tg = torch.from_numpy(p)[None], torch.from_numpy(g)[None]
        assert hd95(tp, tg, tuple(sp)).item() == pytest.approx(want_hd, rel=1e-5)
        assert nsd(tp, tg, tuple(sp), tolerance=1.5).item() == pytest.approx(want_nsd, rel=1e-6)


@pytest.mark.parametrize(
    "spacing", [(1.0,), (1.0, 0.0), (1.0, float("nan")), "ab", (1.0, 1.0, 1.0)]
)
def test_bad_spacing(spacing):
    a = box((6, 6), (1, 1), (3, 3))[None]
    with pytest.raises(ValueError, match="spacing"):
        hd95(a, a, spacing)


def test_bad_tolerance_and_dims():
    a = box((6, 6), (1, 1), (3, 3))[None]
    with pytest.raises(ValueError, match="tolerance"):
        nsd(a, a, 1.0, tolerance=-1.0)
    with pytest.raises(ValueError, match="spatial"):
        hd95(torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 5, dtype=torch.bool), 1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_inputs_come_back_on_cuda():
    a = box((16, 16), (4, 4), (10, 10))[None].cuda()
    b = box((16, 16), (4, 6), (10, 12))[None].cuda()
    out = hd95(b, a, 1.0)
    assert out.device.type == "cuda" and out.item() == pytest.approx(2.0)
    assert nsd(b, a, 1.0).item() == pytest.approx(0.6)
