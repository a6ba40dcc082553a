"""Expected calibration error (ECE) of a binary foreground probability, per case and pooled.

Binning (docs/methods.md §5): ``n_bins`` (15) equal-width bins on [0, 1] of the predicted FOREGROUND
probability p, as torchmetrics' ``binary_calibration_error``: the "confidence" is p itself and the
"accuracy" is the target (so a bin compares the mean p with the observed foreground rate), bin b
holds p in [b/n, (b+1)/n) (boundaries ``torch.linspace(0, 1, n + 1)`` in float64).

One deliberate difference from torchmetrics 1.9: p == 1.0 exactly falls in the top bin
[(n-1)/n, 1] here, whereas torchmetrics' ``bucketize`` gives it an extra bin of its own. Saturated
sigmoids and averages of thresholded samples (SegDiff) produce exact 1.0 often, and the standard
ECE (Guo et al. 2017) closes the top bin, so :func:`ece` feeds torchmetrics p clamped to the largest
float64 below 1 (a 1e-16 change); :func:`ece` and :func:`ece_from_bins` then agree exactly.

ECE (L1) = sum_b (count_b / N) |acc_b - conf_b| = sum_b |sum_acc_b - sum_conf_b| / N.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.classification import binary_calibration_error

from diffseg.metrics.overlap import as_binary_mask

__all__ = ["calibration_bins", "ece_from_bins", "ece"]

_BELOW_ONE = math.nextafter(1.0, 0.0)


def _check(prob: torch.Tensor, target: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive int, got {n_bins!r}")
    if not isinstance(prob, torch.Tensor) or not prob.is_floating_point():
        got = prob.dtype if isinstance(prob, torch.Tensor) else type(prob).__name__
        raise ValueError(f"prob: expected a floating tensor of foreground probabilities, got {got}")
    target = as_binary_mask(target, "target")
    if prob.shape != target.shape:
        raise ValueError(f"prob and target must have the same shape, got {tuple(prob.shape)} and {tuple(target.shape)}")
    if prob.numel() == 0:
        raise ValueError("prob: expected at least one probability, got an empty tensor")
    prob = prob.detach().double().flatten()
    if not bool(((prob >= 0) & (prob <= 1)).all()):  # also rejects NaN
        raise ValueError("prob: expected probabilities in [0, 1] (apply sigmoid to logits first), got values outside")
    return prob, target.flatten().to(prob.device)


def calibration_bins(prob: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Sufficient statistics of the ECE for one case: float64 (3, n_bins) = per bin
    [count, sum of p, sum of targets]. Sum over cases (and DDP ranks), then :func:`ece_from_bins`."""
    prob, target = _check(prob, target, n_bins)
    boundaries = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64, device=prob.device)
    # as torchmetrics' _binning_bucketize, with p == 1.0 moved from its extra bin to the top bin
    idx = (torch.bucketize(prob, boundaries, right=True) - 1).clamp_(0, n_bins - 1)
    bins = torch.zeros(3, n_bins, dtype=torch.float64, device=prob.device)
    bins[0].scatter_add_(0, idx, torch.ones_like(prob))
    bins[1].scatter_add_(0, idx, prob)
    bins[2].scatter_add_(0, idx, target.double())
    return bins


def ece_from_bins(bins: torch.Tensor) -> float:
    """L1 ECE from (summed) :func:`calibration_bins`: sum_b |sum_acc_b - sum_conf_b| / N."""
    if not isinstance(bins, torch.Tensor) or bins.ndim != 2 or bins.shape[0] != 3 or bins.shape[1] < 1:
        got = tuple(bins.shape) if isinstance(bins, torch.Tensor) else type(bins).__name__
        raise ValueError(f"bins: expected a (3, n_bins) tensor [count, sum conf, sum acc], got {got}")
    bins = bins.double()
    total = bins[0].sum()
    if not total > 0:
        raise ValueError("bins: no samples (total count is 0); ECE is undefined")
    return float((bins[2] - bins[1]).abs().sum() / total)


def ece(prob: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> float:
    """L1 ECE of one case (foreground probabilities ``prob`` in [0, 1], binary ``target``), by
    torchmetrics' ``binary_calibration_error`` with p == 1.0 kept in the top bin (module docstring)."""
    prob, target = _check(prob, target, n_bins)
    prob = prob.clamp(max=_BELOW_ONE)
    return float(binary_calibration_error(prob, target.long(), n_bins=n_bins, norm="l1"))
