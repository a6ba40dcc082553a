"""Data sources: describe a data set on disk (paths + label map) without loading voxels."""
from __future__ import annotations

import inspect

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, DatasetInfo, Scan, Source
from diffseg.data.formats.brats import BratsSource
from diffseg.data.formats.folder2d import Folder2DSource
from diffseg.data.formats.msd import MSDSource

SOURCES: dict[str, type[Source]] = {"folder2d": Folder2DSource, "msd": MSDSource, "brats": BratsSource}


def build_source(format: str, **kwargs) -> Source:  # noqa: A002 - mirrors the config key
    """``build_source("brats", root=..., label_scheme="brats2023")``; bad names raise DataError."""
    if format not in SOURCES:
        raise DataError(f"data.format: expected one of {sorted(SOURCES)}, found {format!r}")
    cls = SOURCES[format]
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise DataError(f"data: unknown option(s) {unknown} for format {format!r} "
                        f"(expected some of {accepted})")
    required = [p for p, v in params.items() if p != "self" and v.default is inspect.Parameter.empty]
    missing = [p for p in required if p not in kwargs]
    if missing:
        raise DataError(f"data: format {format!r} needs option(s) {missing} (found {sorted(kwargs)})")
    return cls(**kwargs)


__all__ = ["SOURCES", "build_source", "Case", "DatasetInfo", "Scan", "Source",
           "BratsSource", "Folder2DSource", "MSDSource"]
