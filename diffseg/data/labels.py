"""Explicit label maps: raw values in label files -> class indices, and evaluation regions.

Never rely on MONAI's ConvertToMultiChannelBasedOnBratsClasses: it assumes the BraTS 2018/2021 values
(ET = 4), while BraTS 2023 uses ET = 3 and MSD Task01 yet another scheme (docs/methods.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from diffseg.data.errors import DataError

_MAX_SHOWN = 20


def _fmt_values(values) -> str:
    vals = [v.item() if hasattr(v, "item") else v for v in values]
    vals = [int(v) if float(v).is_integer() else v for v in vals]
    shown = ", ".join(str(v) for v in vals[:_MAX_SHOWN])
    more = f", ... ({len(vals)} in all)" if len(vals) > _MAX_SHOWN else ""
    return f"[{shown}{more}]"


@dataclass
class LabelMap:
    """values[i] is the raw value of class i in the label files (class 0 = background).

    binary: any value > 0 is class 1 (e.g. 0/255 PNG masks); values must then be [0, 1].
    regions: evaluation groups, name -> foreground class indices (default: each class alone).
    """

    values: list[int]
    names: list[str]
    binary: bool = False
    regions: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = [int(v) for v in self.values]
        self.names = [str(n) for n in self.names]
        problems = []
        if len(self.values) < 2:
            problems.append(f"values: expected at least 2 classes (background + one), found {self.values}")
        if len(self.names) != len(self.values):
            problems.append(f"names: expected one name per value ({len(self.values)}), "
                            f"found {len(self.names)}: {self.names}")
        if len(set(self.values)) != len(self.values) or any(v < 0 for v in self.values):
            problems.append(f"values: expected distinct non-negative integers, found {self.values}")
        if self.binary and self.values != [0, 1]:
            problems.append(f"values: a binary label map has values [0, 1], found {self.values}")
        if not self.regions:
            self.regions = {self.names[i]: [i] for i in range(1, len(self.values))
                            if i < len(self.names)}
        self.regions = {str(k): [int(i) for i in v] for k, v in self.regions.items()}
        for name, idx in self.regions.items():
            if not idx or any(i < 1 or i >= len(self.values) for i in idx):
                problems.append(f"regions[{name}]: expected foreground class indices in "
                                f"1..{len(self.values) - 1}, found {idx}")
        DataError.raise_if(problems, "invalid LabelMap")

    @property
    def num_classes(self) -> int:
        return len(self.values)

    def invalid_values(self, array) -> list:
        """Sorted distinct values of ``array`` that this map cannot encode (empty when all are valid)."""
        a = np.asarray(array)
        if a.size == 0:
            return []
        if a.dtype.kind == "b":
            return [] if self.binary or 1 in self.values else [1]
        if a.dtype.kind not in "iuf":
            return [f"dtype {a.dtype}"]
        if self.binary:
            bad = ~(a >= 0) if a.dtype.kind == "f" else (a < 0)
        else:
            bad = ~np.isin(a, self.values)
        if not bad.any():
            return []
        return np.unique(a[bad]).tolist()

    def encode(self, array, source: str = "<array>") -> np.ndarray:
        """Raw label values -> int64 class indices; unknown values raise DataError naming ``source``."""
        a = np.asarray(array)
        if a.dtype.kind == "b":
            a = a.astype(np.uint8)
        if a.dtype.kind not in "iuf":
            raise DataError(f"{source}: expected an integer label array, found dtype {a.dtype}")
        if a.size == 0:
            return np.zeros(a.shape, np.int64)
        if self.binary:
            if a.dtype.kind == "f" and not np.isfinite(a).all() or a.min() < 0:
                self._raise(a, source)
            return (a > 0).astype(np.int64)
        if a.dtype.kind == "f":
            if not np.isfinite(a).all() or not np.array_equal(a, np.round(a)):
                self._raise(a, source)
            a = a.astype(np.int64)
        vmax = max(self.values)
        if a.min() < 0 or a.max() > vmax:
            self._raise(a, source)
        lut = np.full(vmax + 1, -1, np.int64)  # lookup table: raw value -> class index
        lut[self.values] = np.arange(self.num_classes)
        out = lut[a]
        if (out < 0).any():
            self._raise(a, source)
        return out

    def _raise(self, a: np.ndarray, source: str) -> None:
        allowed = "any value >= 0" if self.binary else _fmt_values(self.values)
        raise DataError(
            f"{source}: label values {_fmt_values(self.invalid_values(a))} are not in the label map "
            f"(expected {allowed} for classes {self.names}, found values "
            f"{_fmt_values(np.unique(a))})")

    def decode(self, classes) -> np.ndarray:
        """Class indices -> raw label values (e.g. to write a prediction in the data set's scheme)."""
        c = np.asarray(classes)
        if c.size and (c.min() < 0 or c.max() >= self.num_classes):
            raise DataError(f"decode: expected class indices in 0..{self.num_classes - 1}, "
                            f"found {_fmt_values(np.unique(c))}")
        return np.asarray(self.values, np.int64)[c]

    def region_masks(self, classes) -> dict[str, np.ndarray]:
        """Class indices -> {region name: bool mask} (e.g. BraTS WT/TC/ET)."""
        c = np.asarray(classes)
        return {name: np.isin(c, idx) for name, idx in self.regions.items()}


def binary_label_map(names: list[str] | None = None) -> LabelMap:
    return LabelMap([0, 1], names or ["background", "foreground"], binary=True)


def class_label_map(num_classes: int, names: list[str] | None = None) -> LabelMap:
    """Class ids 0..num_classes-1 stored as themselves."""
    names = names or ["background"] + [f"class{i}" for i in range(1, num_classes)]
    return LabelMap(list(range(num_classes)), names)


BRATS_SCHEMES = {"brats2021": [0, 1, 2, 4], "brats2023": [0, 1, 2, 3]}
BRATS_TARGETS = {
    "regions": {"wt": [1, 2, 3], "tc": [1, 3], "et": [3]},
    "labels": {"ncr": [1], "ed": [2], "et": [3]},
}


def brats_label_map(scheme: str = "brats2021", target: str = "regions") -> LabelMap:
    """BraTS: NCR = 1, ED = 2, ET = 4 (2021) or 3 (2023) -> classes [background, ncr, ed, et]."""
    if scheme not in BRATS_SCHEMES:
        raise DataError(f"label_scheme: expected one of {sorted(BRATS_SCHEMES)}, found {scheme!r}")
    if target not in BRATS_TARGETS:
        raise DataError(f"target: expected one of {sorted(BRATS_TARGETS)}, found {target!r}")
    return LabelMap(BRATS_SCHEMES[scheme], ["background", "ncr", "ed", "et"],
                    regions={k: list(v) for k, v in BRATS_TARGETS[target].items()})
