"""New cases to segment (scripts/predict.py): a folder in the layout of a run's data source, labels optional.

- BraTS: case folders ``CASE/CASE_{t1,t1ce,t2,flair}.nii.gz`` (BraTS 2023 names too), ``_seg`` not needed;
- MSD: ``FOLDER/imagesTs/`` (or a folder of NIfTI images): ``ID.nii.gz`` (3D, or 4D multi-modality) or
  nnU-Net channel files ``ID_0000.nii.gz``, ``ID_0001.nii.gz`` ...;
- 2D folders: ``FOLDER/images/`` (or a folder of images), png/tif/jpg/bmp; SegRefiner also takes a folder
  of coarse masks matched by file stem.

``list_new_cases`` raises ONE DataError naming the folder and the expected layout when the folder does not
fit; ``check_new_cases`` reads every file before anything is predicted and lists each unreadable file,
geometry mismatch within a case and channel count that does not fit the checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib

from diffseg.data.errors import DataError
from diffseg.data.formats.base import IMAGE2D_SUFFIXES, Case, Source, is_hidden, is_nifti, nifti_stem
from diffseg.data.formats.brats import BratsSource
from diffseg.data.formats.folder2d import Folder2DSource, _list_by_stem, image_channels
from diffseg.data.formats.msd import _CHANNEL_FILE, MSDSource
from diffseg.data.integrity import _check_case
from diffseg.data.labels import binary_label_map


def _files(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.iterdir()) if p.is_file() and not is_hidden(p)]


def _what_is_there(folder: Path) -> str:
    """A short description of a folder's content, for wrong-layout messages."""
    entries = [p for p in sorted(folder.iterdir()) if not is_hidden(p)]
    dirs = [p.name for p in entries if p.is_dir()]
    nifti = [p.name for p in entries if p.is_file() and is_nifti(p)]
    images = [p.name for p in entries if p.is_file() and p.suffix.lower() in IMAGE2D_SUFFIXES]
    parts = [f"{len(v)} {k} (e.g. {v[0]})" for k, v in (("folder(s)", dirs), ("NIfTI file(s)", nifti),
                                                        ("2D image(s)", images)) if v]
    return ", ".join(parts) or "nothing usable"


def _wrong_layout(folder: Path, expected: str) -> DataError:
    return DataError(f"input={folder}: not in the layout the checkpoint's data source reads (expected {expected}, "
                     f"found {_what_is_there(folder)})")


def _brats_cases(source: BratsSource, folder: Path) -> list[Case]:
    layout = source.layout.replace(",seg}", "}")  # new cases need no segmentation
    if not any(p.is_dir() and not is_hidden(p) for p in folder.iterdir()):
        raise _wrong_layout(folder, layout)
    new = BratsSource(folder, label_scheme=source.label_scheme, target=source.target,
                      modalities=source.modalities, require_labels=False)
    scan = new.scan()
    DataError.raise_if(scan.problems, f"input={folder}: BraTS case folders with missing modalities")
    return [Case(c.id, c.images) for c in scan.cases]


def _msd_cases(folder: Path, in_channels: int) -> list[Case]:
    images_dir = folder / "imagesTs" if (folder / "imagesTs").is_dir() else folder
    layout = "FOLDER/imagesTs/*.nii.gz or a folder of NIfTI images (ID.nii.gz, or channel files ID_0000.nii.gz ...)"
    grouped: dict[str, dict[int, Path]] = {}
    for p in _files(images_dir):
        if is_nifti(p):
            m = _CHANNEL_FILE.match(nifti_stem(p.name))
            cid, ch = (m["id"], int(m["ch"])) if m else (nifti_stem(p.name), -1)  # -1: one file, all channels
            grouped.setdefault(cid, {})[ch] = p
    if not grouped:
        raise _wrong_layout(images_dir, layout)
    cases, problems = [], []
    for cid, files in sorted(grouped.items()):
        if -1 in files:
            cases.append(Case(cid, [str(files[-1])]))
            continue
        missing = [f"{cid}_{c:04d}.nii.gz" for c in range(in_channels) if c not in files]
        if missing:
            problems.append(f"{images_dir / missing[0]}: missing, case {cid} lacks channel file(s) {missing} "
                            f"(expected {in_channels} channel files {cid}_0000 .. {cid}_{in_channels - 1:04d})")
            continue
        cases.append(Case(cid, [str(files[c]) for c in sorted(files)]))
    DataError.raise_if(problems, f"input={images_dir}: cases with missing channel files")
    return cases


def _folder2d_cases(folder: Path, coarse: Path | None) -> list[Case]:
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    problems: list[str] = []
    images = _list_by_stem(images_dir, "image", problems)
    if not images:
        raise _wrong_layout(images_dir, "FOLDER/images/* or a folder of 2D images (png, tif, jpg, bmp)")
    masks: dict[str, Path] = {}
    if coarse is not None:
        masks = _list_by_stem(coarse, "coarse mask", problems)
        problems += [f"{images[s]}: no coarse mask {coarse}/{s}.png (expected one per image, matched by file stem)"
                     for s in sorted(set(images) - set(masks))]
    DataError.raise_if(problems, f"input={images_dir}: images do not pair up")
    return [Case(s, [str(images[s])], coarse=str(masks[s]) if coarse is not None else None) for s in images]


def list_new_cases(source: Source, folder: str | Path, *, in_channels: int, coarse: str | Path | None = None) -> list[Case]:
    """The cases of ``folder`` in the layout of ``source`` (the run's data source), sorted by id."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataError(f"input={folder}: no such folder (expected new cases in the layout of the run's "
                        f"{source.title} data: {source.layout})")
    if coarse is not None and not Path(coarse).is_dir():
        raise DataError(f"coarse={coarse}: no such folder (expected coarse masks named like the images)")
    if isinstance(source, BratsSource):
        cases = _brats_cases(source, folder)
    elif isinstance(source, MSDSource):
        cases = _msd_cases(folder, in_channels)
    elif isinstance(source, Folder2DSource):
        cases = _folder2d_cases(folder, None if coarse is None else Path(coarse))
    else:
        raise DataError(f"input={folder}: new data in the layout of {type(source).__name__} is not supported "
                        "(expected a BraTS, MSD or folder2d run)")
    if not cases:
        raise _wrong_layout(folder, source.layout)
    return sorted(cases, key=lambda c: c.id)


def _channels(path: str, spatial_dims: int) -> int:
    if spatial_dims == 2:
        return image_channels(path)
    shape = nib.load(path).shape
    return shape[3] if len(shape) == 4 else 1


def check_new_cases(cases: list[Case], *, spatial_dims: int, in_channels: int, ckpt: str) -> None:
    """Read every file (headers, whole compressed streams, 2D images) before any case is predicted:
    ONE DataError lists each unreadable file, shape/affine mismatch within a case, and case whose
    image channels do not fit the checkpoint's ``in_channels``."""
    problems: list[str] = []
    for case in cases:
        # label_map only matters for labels; new cases have none (a coarse mask is checked as binary)
        found = _check_case(case, binary_label_map(), None, fast=True)
        problems += found
        if found:
            continue
        per_file = {p: _channels(p, spatial_dims) for p in case.images}
        channels = sum(per_file.values())
        if channels != in_channels:
            # one file per channel (BraTS modalities, nnU-Net channel files): name the file that holds more
            culprit = next((p for p, n in per_file.items() if n != 1), case.images[0]) if len(per_file) > 1 \
                else case.images[0]
            problems.append(f"{culprit}: {per_file[culprit]} channel(s), so case {case.id} has {channels} image "
                            f"channel(s); the checkpoint {ckpt} was trained on {in_channels} (data.in_channels)")
    DataError.raise_if(problems, "new cases cannot be predicted; nothing was written")
