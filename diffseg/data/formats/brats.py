"""BraTS layout: one folder per case, one NIfTI per modality plus the segmentation."""
from __future__ import annotations

from pathlib import Path

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, DatasetInfo, Scan, Source, is_hidden
from diffseg.data.labels import brats_label_map

# BraTS 2023 file names: CASE-t1n, -t1c, -t2w, -t2f, -seg
BRATS2023_NAMES = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}


def brats_file_names(case: str, key: str, label_scheme: str) -> list[str]:
    """Accepted file names for modality (or 'seg') ``key`` of ``case``, preferred first."""
    names = [f"{case}_{key}.nii.gz", f"{case}_{key}.nii"]
    if label_scheme == "brats2023":
        new = BRATS2023_NAMES.get(key, key)
        names = [f"{case}-{new}.nii.gz", f"{case}-{new}.nii"] + names
    return names


class BratsSource(Source):
    """CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz (BraTS 2021), or with ``label_scheme="brats2023"``
    also CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii.gz. ``require_labels=False`` allows cases without seg
    (e.g. a validation set without ground truth; their ``label`` is None)."""

    title = "BraTS"
    synthetic_hint = "data=brats_synthetic"

    def __init__(self, root, label_scheme: str = "brats2021", target: str = "regions",
                 modalities=("t1", "t1ce", "t2", "flair"), require_labels: bool = True) -> None:
        super().__init__(root)
        self._label_map = brats_label_map(label_scheme, target)  # validates scheme and target
        self.label_scheme = label_scheme
        self.target = target
        if isinstance(modalities, str) or not modalities:
            raise DataError(f"modalities: expected a non-empty list like ['t1', 't1ce', 't2', 'flair'], "
                            f"found {modalities!r}")
        self.modalities = [str(m) for m in modalities]
        self.require_labels = require_labels
        keys = ",".join(self.modalities + ["seg"])
        self.layout = f"case folders CASE/CASE_{{{keys}}}.nii.gz"
        if label_scheme == "brats2023":
            keys23 = ",".join(BRATS2023_NAMES.get(k, k) for k in self.modalities + ["seg"])
            self.layout += f" or CASE/CASE-{{{keys23}}}.nii.gz"

    def label_map(self):
        return self._label_map

    def _find(self, folder: Path, key: str) -> Path | None:
        for name in brats_file_names(folder.name, key, self.label_scheme):
            if (folder / name).is_file():
                return folder / name
        return None

    def _scan_files(self) -> Scan:
        folders = [p for p in sorted(self.root.iterdir()) if p.is_dir() and not is_hidden(p)]
        if not folders:
            raise self.not_found()
        cases, problems = [], []
        for folder in folders:
            keys = self.modalities + (["seg"] if self.require_labels else [])
            missing = [brats_file_names(folder.name, k, self.label_scheme)[0]
                       for k in keys if self._find(folder, k) is None]
            if missing:
                problems.append(f"{folder}: missing {', '.join(missing)} (expected "
                                f"{self.layout.replace('case folders ', '')})")
                continue
            images = [str(self._find(folder, m)) for m in self.modalities]
            seg = self._find(folder, "seg")
            cases.append(Case(folder.name, images, str(seg) if seg else None))
        return Scan(cases, problems, [f.name for f in folders])

    def info(self) -> DatasetInfo:
        return DatasetInfo(spatial_dims=3, in_channels=len(self.modalities), label_map=self._label_map,
                           modalities=list(self.modalities), spacing=(1.0, 1.0, 1.0))

