"""ECE: closed forms, and pooled bins against torchmetrics on the concatenated data."""

import pytest
import torch
from torchmetrics.functional.classification import binary_calibration_error

from diffseg.metrics.calibration import calibration_bins, ece, ece_from_bins


def test_pooled_bins_match_torchmetrics_on_concatenated_data():
    g = torch.Generator().manual_seed(0)
    probs, targets, bins = [], [], torch.zeros(3, 15, dtype=torch.float64)
    for n in (50, 300, 1000, 7):
        p = torch.rand(n, generator=g, dtype=torch.float64) ** 2
        t = (torch.rand(n, generator=g, dtype=torch.float64) < p.sqrt()).long()  # miscalibrated
        probs.append(p)
        targets.append(t)
        bins += calibration_bins(p.view(1, -1), t.view(1, -1))
        assert ece(p, t) == pytest.approx(binary_calibration_error(p, t, n_bins=15).item(), abs=1e-12)
    want = binary_calibration_error(torch.cat(probs), torch.cat(targets), n_bins=15, norm="l1").item()
    assert want > 0.05
    assert ece_from_bins(bins) == pytest.approx(want, abs=1e-6)
    assert bins.dtype == torch.float64 and bins.shape == (3, 15) and bins[0].sum() == 1357


def test_bin_contents_by_hand():
    p = torch.tensor([0.0, 0.05, 0.1, 0.5, 0.99, 1.0])
    t = torch.tensor([0, 1, 0, 1, 1, 1])
    b = calibration_bins(p, t, n_bins=10)
    assert b[0].tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]  # 0.1 opens bin 1; 1.0 joins the top bin
    assert b[1].tolist() == pytest.approx([0.05, 0.1, 0, 0, 0, 0.5, 0, 0, 0, 1.99])
    assert b[2].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 2]


def test_closed_forms():
    t = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 1])  # 7 positives
    assert ece(t.double(), t) == pytest.approx(0.0, abs=1e-12)  # probabilities 0/1 equal to the targets
    assert ece_from_bins(calibration_bins(t.float(), t)) == 0.0
    p7 = torch.full((10,), 0.7)  # 7 of 10 positive
    assert ece(p7, t) == pytest.approx(0.0, abs=1e-6)
    assert ece_from_bins(calibration_bins(p7, t)) == pytest.approx(0.0, abs=1e-6)
    t5 = torch.tensor([1, 0] * 5)
    p9 = torch.full((10,), 0.9)  # 50% positive at p = 0.9
    assert ece(p9, t5) == pytest.approx(0.4, abs=1e-6)
    assert ece_from_bins(calibration_bins(p9, t5)) == pytest.approx(0.4, abs=1e-6)


def test_probability_one_goes_to_top_bin_unlike_torchmetrics():
    # documented deviation: torchmetrics puts p == 1.0 in an extra bin of its own
    p = torch.tensor([1.0, 0.95], dtype=torch.float64)
    t = torch.tensor([0, 1])
    ours = 0.5 - 0.975  # one top bin: mean acc 0.5, mean conf 0.975
    assert ece(p, t) == pytest.approx(abs(ours))
    assert ece_from_bins(calibration_bins(p, t)) == pytest.approx(abs(ours))
    assert binary_calibration_error(p, t, n_bins=15).item() == pytest.approx(0.5 * 0.05 + 0.5 * 1.0)


def test_bad_input():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        calibration_bins(torch.tensor([1.5, 0.2]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece(torch.tensor([float("nan")]), torch.tensor([1]))
    with pytest.raises(ValueError, match="floating"):
        ece(torch.tensor([1, 0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="same shape"):
        ece(torch.rand(3), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="n_bins"):
        calibration_bins(torch.rand(3), torch.tensor([1, 0, 1]), n_bins=0)
    with pytest.raises(ValueError, match=r"\(3, n_bins\)"):
        ece_from_bins(torch.zeros(2, 15))
    with pytest.raises(ValueError, match="no samples"):
        ece_from_bins(torch.zeros(3, 15))
