"""What a data source is: a description of a data set on disk (paths, label map), no voxels loaded."""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from diffseg.data.errors import DataError
from diffseg.data.labels import LabelMap

NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGE2D_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class Case:
    """One case. ``images``: one path per channel file (a 4D NIfTI or an RGB PNG is ONE path)."""

    id: str
    images: list[str]
    label: str | None = None
    coarse: str | None = None  # SegRefiner: a coarse mask from another model


@dataclass
class DatasetInfo:
    spatial_dims: int
    in_channels: int
    label_map: LabelMap
    modalities: list[str]
    spacing: tuple[float, ...] | None = None  # nominal voxel spacing, if known


@dataclass
class Scan:
    """Result of listing a data set: the complete cases, the problems found, and every case id seen
    (including cases left out of ``cases`` because a file is missing)."""

    cases: list[Case]
    problems: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(name: str) -> str:
    """'x.nii.gz' -> 'x', 'x.nii' -> 'x'."""
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def is_hidden(path: Path) -> bool:
    """Hidden files and macOS resource forks ('._x.nii.gz')."""
    return path.name.startswith(".")


class Source(abc.ABC):
    """A data set on disk. Subclasses implement ``scan`` and ``info``.

    ``cases()`` returns the cases sorted by id and raises ONE DataError listing every problem
    (missing files, unmatched pairs); ``scan()`` returns the same problems without raising, for the
    integrity check. Both raise DataError when the root itself is missing.
    """

    #: data set kind and what its folder must look like, for error messages
    title: str = "data"
    layout: str = ""
    #: how to get built-in synthetic data instead, for error messages
    synthetic_hint: str = ""

    def __init__(self, root) -> None:
        self.root = Path(root).expanduser()
        self._scan: Scan | None = None

    @abc.abstractmethod
    def info(self) -> DatasetInfo: ...

    @abc.abstractmethod
    def _scan_files(self) -> Scan: ...

    def scan(self) -> Scan:
        if self._scan is None:
            self._require_root()
            scan = self._scan_files()
            scan.cases.sort(key=lambda c: c.id)
            scan.ids = sorted(set(scan.ids) | {c.id for c in scan.cases})
            self._scan = scan
        return self._scan

    def cases(self) -> list[Case]:
        scan = self.scan()
        DataError.raise_if(scan.problems, f"{type(self).__name__} at {self.root}")
        return list(scan.cases)

    def label_map(self) -> LabelMap:
        return self.info().label_map

    def not_found(self, what: str = "") -> DataError:
        msg = f"{self.title} data not found at {self.root}"
        msg += f": {what}" if what else f": expected {self.layout}"
        if self.synthetic_hint:
            msg += f"; to try the built-in synthetic data use {self.synthetic_hint}"
        return DataError(msg)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise self.not_found()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r})"
