"""nnU-Net-style data set check: readable files, matching geometry, valid labels, sane splits.

Every problem is a line "PATH: what is wrong (expected ..., found ...)"; all are reported, not the first.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, Source, is_nifti
from diffseg.data.labels import LabelMap

_CHUNK = 1 << 20


class _Unreadable(Exception):
    """A file that cannot be read; the message is the full problem line."""


def _fmt(values, n: int = 12) -> str:
    vals = list(values)
    return "[" + ", ".join(str(v) for v in vals[:n]) + (", ..." if len(vals) > n else "") + "]"


def _stream_gzip(path: Path) -> int:
    """Decompress to the end without building arrays (catches truncation, CRC errors); bytes read."""
    total = 0
    with gzip.open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(chunk)
    return total


def _read_nifti(path: Path, load_array: bool, verify: bool):
    """(spatial shape, channels, affine, array or None). Raises _Unreadable with the problem line."""
    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        array = None
        if load_array:
            array = np.asanyarray(img.dataobj)
        elif verify:
            need = int(img.header.get_data_offset()) + int(np.prod(shape)) * img.get_data_dtype().itemsize
            size = _stream_gzip(path) if str(path).lower().endswith(".gz") else path.stat().st_size
            if size < need:
                raise EOFError(f"file holds {size} bytes, the header needs {need}")
    except Exception as exc:  # noqa: BLE001 - corrupt files fail in many ways (zlib, EOF, ...)
        raise _Unreadable(f"{path}: unreadable NIfTI (expected a complete .nii/.nii.gz file, found "
                          f"{type(exc).__name__}: {exc})") from exc
    if len(shape) not in (3, 4):
        raise _Unreadable(f"{path}: wrong number of dimensions (expected 3D or 4D, found shape {shape})")
    return shape[:3], (shape[3] if len(shape) == 4 else 1), np.asarray(img.affine), array


def _read_2d(path: Path, is_label: bool):
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "LA" or (im.mode == "PA" and is_label):
                im = im.getchannel(0)  # drop alpha; a label palette image keeps its indices
            elif im.mode in ("PA", "RGBA", "CMYK", "YCbCr") or (im.mode == "P" and not is_label):
                im = im.convert("RGB")
            array = np.asarray(im)
    except Exception as exc:  # noqa: BLE001
        raise _Unreadable(f"{path}: unreadable image (expected a complete image file, found "
                          f"{type(exc).__name__}: {exc})") from exc
    channels = 1 if array.ndim == 2 else array.shape[2]
    return tuple(array.shape[:2]), channels, None, array


def _read(path: str, *, is_label: bool, fast: bool):
    p = Path(path)
    if is_nifti(p):
        return _read_nifti(p, load_array=is_label or not fast, verify=True)
    return _read_2d(p, is_label)


def _check_label(path: str, array: np.ndarray, channels: int, label_map: LabelMap) -> list[str]:
    if channels != 1:
        if array.ndim == 3 and array.shape[2] in (3, 4) and (array[..., :3] == array[..., :1]).all():
            array = array[..., 0]  # a gray mask saved as RGB
        else:
            return [f"{path}: label has {channels} channels (expected a single-channel label map, "
                    f"found shape {array.shape})"]
    bad = label_map.invalid_values(array)
    if bad:
        allowed = "values >= 0" if label_map.binary else f"values {label_map.values}"
        return [f"{path}: label values {_fmt(bad)} not in the label map (expected {allowed} for "
                f"{label_map.names}, found {_fmt(np.unique(array).tolist())})"]
    return []


def _check_case(case: Case, label_map: LabelMap, in_channels: int | None, fast: bool) -> list[str]:
    problems: list[str] = []
    files = [(p, "image") for p in case.images]
    files += [(p, kind) for p, kind in ((case.label, "label"), (case.coarse, "coarse")) if p]
    ref = None  # (path, spatial shape, affine) of the first readable file
    channels, images_read = 0, True
    for path, kind in files:
        try:
            shape, ch, affine, array = _read(path, is_label=kind != "image", fast=fast)
        except _Unreadable as exc:
            problems.append(str(exc))
            images_read = images_read and kind != "image"
            continue
        if kind == "image":
            channels += ch
            if 0 in shape:
                problems.append(f"{path}: empty image (expected a non-empty array, found shape {shape})")
            elif not fast:
                finite = np.isfinite(array) if array.dtype.kind in "fc" else np.ones(1, bool)
                if not finite.all():
                    problems.append(f"{path}: non-finite intensities (expected finite values, found "
                                    f"{int((~finite).sum())} NaN/inf voxels)")
                elif not array.any():
                    problems.append(f"{path}: image is all zero (expected some signal, found only 0)")
        elif kind == "label":
            problems += _check_label(path, array, ch, label_map)
        elif kind == "coarse":
            problems += _check_label(path, array, ch, LabelMap([0, 1], ["background", "foreground"],
                                                               binary=True))
        if ref is None:
            ref = (path, shape, affine)
            continue
        if shape != ref[1]:
            problems.append(f"{path}: spatial shape differs within case {case.id} (expected {ref[1]} "
                            f"like {Path(ref[0]).name}, found {shape})")
        elif affine is not None and ref[2] is not None and not np.allclose(affine, ref[2], atol=1e-4):
            problems.append(f"{path}: affine differs within case {case.id} (expected "
                            f"{np.round(ref[2], 4).tolist()} like {Path(ref[0]).name}, found "
                            f"{np.round(affine, 4).tolist()})")
    if in_channels is not None and images_read and channels != in_channels:
        problems.append(f"{case.images[0]}: case {case.id} has {channels} image channel(s) "
                        f"(expected {in_channels}, the data set's in_channels)")
    return problems


def _check_splits(splits: dict, ids: list[str], root) -> list[str]:
    problems: list[str] = []
    known = set(ids)
    seen: dict[str, str] = {}
    for name, members in splits.items():
        if isinstance(members, str) or not hasattr(members, "__iter__"):
            problems.append(f"splits[{name}]: expected a list of case ids, found {members!r}")
            continue
        for cid in members:
            cid = str(cid)
            if cid not in known:
                problems.append(f"splits[{name}]: case {cid!r} not found in {root} (expected one of "
                                f"its {len(known)} case ids)")
            if cid in seen:
                where = "twice" if seen[cid] == name else f"in both {seen[cid]} and {name}"
                problems.append(f"splits[{name}]: case {cid!r} is {where} (expected each case in at "
                                f"most one split, once)")
            else:
                seen[cid] = name
    return problems


def check_dataset(source: Source, splits: dict | None = None, fast: bool = False) -> list[str]:
    """All problems of ``source`` (and ``splits``: split name -> case ids), one line each.

    fast=True reads headers for shape/affine, label arrays fully, and streams each compressed image
    through gzip to the end (corrupt files are still caught) but skips the finite-intensity check.
    """
    try:
        scan = source.scan()
    except DataError as exc:
        return exc.problems or [str(exc)]
    problems = list(scan.problems)
    in_channels = None
    try:
        in_channels = source.info().in_channels
    except DataError as exc:
        problems += exc.problems or [str(exc)]
    try:
        label_map = source.label_map()
    except DataError as exc:
        return problems + (exc.problems or [str(exc)])
    for case in scan.cases:
        problems += _check_case(case, label_map, in_channels, fast)
    if splits is not None:
        problems += _check_splits(splits, scan.ids, source.root)
    return list(dict.fromkeys(problems))  # the same line can come from the scan and a read


def assert_dataset_ok(source: Source, splits: dict | None = None, fast: bool = False) -> None:
    """Raise ONE DataError listing every problem found by :func:`check_dataset`."""
    DataError.raise_if(check_dataset(source, splits, fast), f"data set check failed for {source.root}")
