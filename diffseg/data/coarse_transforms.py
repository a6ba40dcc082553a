"""SegRefiner coarse masks as MONAI dictionary transforms (docs/methods.md §3).

``RandCoarseMaskd`` (training, after the random crop): a new coarse mask each time the sample is
drawn. ``FixedCoarseMaskd`` (validation/test): one deterministic mask per case, seeded from the case
id and cached, so every evaluation of a checkpoint sees the same coarse masks. Both write
``coarse`` (1, *S) int64 in {0, 1} next to ``label``; wire them through ``data.train_transforms`` /
``data.eval_transforms``.

When the sample already holds a ``coarse`` mask (``data.source.coarse_dir``: masks produced by
another model), the files win: the transform passes the sample through and says so once in the log
(its ``iou_target`` is then not used).
"""
from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor

from diffseg.data.coarse import make_coarse_mask
from diffseg.data.errors import DataError

log = logging.getLogger("diffseg")


class _CoarseMaskBase(mt.MapTransform):
    """Shared checks and the array plumbing; subclasses choose the random generator."""

    _notified = False  # one log line per process when coarse masks come from files

    def __init__(self, label_key: str = "label", coarse_key: str = "coarse",
                 iou_target: float = 0.8, max_rounds: int = 250):
        super().__init__(keys=[label_key])
        if isinstance(iou_target, bool) or not isinstance(iou_target, (int, float)) or not 0.0 < iou_target <= 1.0:
            raise DataError(f"iou_target: expected one number in (0, 1] (the coarse masks' IoU falls just below "
                            f"it; there is no lower bound), got {iou_target!r}")
        self.label_key, self.coarse_key = label_key, coarse_key
        self.iou_target, self.max_rounds = float(iou_target), int(max_rounds)

    def _from_files(self, d) -> bool:
        if self.coarse_key not in d:
            return False
        if not _CoarseMaskBase._notified:
            _CoarseMaskBase._notified = True
            log.warning("coarse masks are read from files (data.source.coarse_dir): %s(iou_target=%s) "
                        "is not used", type(self).__name__, self.iou_target)
        return True

    def _label(self, d) -> np.ndarray:
        if self.label_key not in d:
            raise DataError(f"{type(self).__name__}: the sample has no {self.label_key!r} key "
                            f"(found {sorted(d)}); coarse masks are made from the ground truth")
        label = d[self.label_key]
        arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
        if arr.ndim != 3 or arr.shape[0] != 1:
            raise DataError(f"{type(self).__name__}: expected a 2D label (1, H, W), got shape {arr.shape}")
        return arr[0] > 0  # foreground (any class > 0)

    def _attach(self, d, coarse: np.ndarray) -> dict:
        label = d[self.label_key]
        tensor = torch.as_tensor(coarse[None].astype(np.int64))
        d[self.coarse_key] = MetaTensor(tensor, meta=dict(label.meta)) if isinstance(label, MetaTensor) else tensor
        return d

    def _make(self, fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return make_coarse_mask(fg, rng, iou_target=self.iou_target, max_rounds=self.max_rounds)


class RandCoarseMaskd(mt.Randomizable, _CoarseMaskBase):
    """Training: a fresh coarse mask of the (cropped) ground truth each call (``iou_target``)."""

    def randomize(self, data=None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data):
        d = dict(data)
        if self._from_files(d):
            return d
        self.randomize()
        return self._attach(d, self._make(self._label(d), np.random.default_rng(self._seed)))


class FixedCoarseMaskd(_CoarseMaskBase):
    """Validation/test: a deterministic coarse mask per case (seed, case id), cached in memory.

    The cache key includes the label's shape and a checksum, so a case preprocessed differently
    (another resize, another crop) gets its own mask."""

    def __init__(self, label_key: str = "label", coarse_key: str = "coarse",
                 iou_target: float = 0.8, max_rounds: int = 250, seed: int = 0,
                 id_key: str = "case_id", cache_size: int = 4096):
        super().__init__(label_key, coarse_key, iou_target, max_rounds)
        self.seed, self.id_key, self.cache_size = int(seed), id_key, int(cache_size)
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def __call__(self, data):
        d = dict(data)
        if self._from_files(d):
            return d
        if self.id_key not in d:
            raise DataError(f"FixedCoarseMaskd: the sample has no {self.id_key!r} key (found {sorted(d)}); "
                            "evaluation coarse masks are seeded from the case id")
        fg = self._label(d)
        case_id = str(d[self.id_key])
        key = (case_id, fg.shape, zlib.crc32(np.packbits(fg).tobytes()))
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(case_id.encode())])
            self._cache[key] = self._make(fg, rng)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return self._attach(d, self._cache[key].copy())
