"""Score one case, and aggregate per-case records into data-set metrics.

A record is a flat dict of floats (and a few small arrays of sufficient statistics for pooled
metrics: intersection/union counts, calibration bins), so that records can be gathered across DDP
ranks, de-duplicated by case id, and aggregated identically on every rank.

Metric names: ``dice``, ``iou``, ``hd95``, ``nsd`` (mean over the evaluation regions, e.g.
WT/TC/ET or each foreground class) and ``dice/<region>`` etc.; for binary tasks also
``iou_pooled`` (sum I / sum U over the data set, SegRefiner's convention) and ``ece``
(15 equal-width bins over all pixels); for 2D binary tasks ``mba`` and SegDiff's ``fbound`` and ``wcov`` (docs/methods.md §2).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from diffseg.metrics.boundary import fbound, mba
from diffseg.metrics.calibration import calibration_bins, ece_from_bins
from diffseg.metrics.overlap import dice_iou, intersection_union, region_masks, wcov
from diffseg.metrics.surface import hd95, nsd

POOLED_KEYS = ("_I", "_U", "_ece_bins")


def score_case(
    probs: torch.Tensor,
    label: torch.Tensor,
    regions: Mapping[str, Sequence[int]],
    spacing: Sequence[float],
    *,
    surface: bool = True,
    nsd_tolerance: float = 1.0,
) -> dict:
    """Metrics of one case.

    probs: (C, *S) class probabilities; label: (*S) class indices; regions: evaluation groups
    name -> class indices. Prediction = argmax over classes.
    """
    if probs.shape[1:] != label.shape:
        raise ValueError(f"prediction shape {tuple(probs.shape[1:])} != label shape {tuple(label.shape)}")
    names = list(regions)
    pred = region_masks(probs.argmax(0), regions)
    true = region_masks(label, regions)
    dice, iou = dice_iou(pred, true)
    rec: dict = {}
    per_region = {"dice": dice, "iou": iou}
    if surface:
        per_region["hd95"] = hd95(pred, true, spacing)
        per_region["nsd"] = nsd(pred, true, spacing, tolerance=nsd_tolerance)
    for metric, values in per_region.items():
        values = torch.as_tensor(values, dtype=torch.float64).cpu()
        rec[metric] = float(values.mean())
        for name, v in zip(names, values.tolist()):
            rec[f"{metric}/{name}"] = float(v)
    inter, union = intersection_union(pred, true)
    rec["_I"] = np.asarray(torch.as_tensor(inter).cpu(), dtype=np.float64)
    rec["_U"] = np.asarray(torch.as_tensor(union).cpu(), dtype=np.float64)
    if probs.shape[0] == 2:  # binary: calibration of the foreground probability, boundary quality in 2D
        fg = probs[1].float()
        rec["_ece_bins"] = np.asarray(calibration_bins(fg, label == 1).cpu(), dtype=np.float64)
        if probs.ndim == 3:
            p, t = pred[0].cpu().numpy(), true[0].cpu().numpy()
            rec["mba"] = float(mba(p, t))
            rec["fbound"] = fbound(p, t)
            rec["wcov"] = wcov(p, t)
    return rec


def aggregate(records: Iterable[Mapping]) -> dict[str, float]:
    """Mean over cases of every scalar (NaN-aware), plus the pooled metrics."""
    records = list(records)
    if not records:
        return {}
    out: dict[str, float] = {}
    scalar_keys = sorted({k for r in records for k in r if not k.startswith("_") and k != "case_id"})
    for key in scalar_keys:
        vals = np.array([r[key] for r in records if key in r], dtype=np.float64)
        finite = vals[np.isfinite(vals)]
        out[key] = float(finite.mean()) if finite.size else math.nan
    if all("_I" in r for r in records):
        inter = np.sum([r["_I"] for r in records], axis=0)
        union = np.sum([r["_U"] for r in records], axis=0)
        out["iou_pooled"] = float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))
    if all("_ece_bins" in r for r in records):
        out["ece"] = float(ece_from_bins(torch.as_tensor(np.sum([r["_ece_bins"] for r in records], axis=0))))
    out["num_cases"] = float(len(records))
    return out


def scalar_view(record: Mapping) -> dict:
    """The record without pooled statistics (for per-case CSV files)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}
