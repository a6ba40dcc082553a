"""Medical Segmentation Decathlon layout (also nnU-Net v2 dataset.json and channel files)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import nibabel as nib

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, DatasetInfo, Scan, Source, is_hidden, is_nifti, nifti_stem
from diffseg.data.labels import LabelMap

_CHANNEL_FILE = re.compile(r"^(?P<id>.+)_(?P<ch>\d{4})$")


class MSDSource(Source):
    """ROOT/dataset.json + ROOT/imagesTr/*.nii.gz (3D, or 4D multi-modality) + ROOT/labelsTr/*.nii.gz.

    dataset.json: "modality" (MSD) or "channel_names" (nnU-Net v2); "labels" as {"0": "background", ...}
    (MSD) or {"background": 0, ...} (nnU-Net v2); "training" list of {"image", "label"} when present,
    else files are matched by name (``ID.nii.gz`` or nnU-Net v2 channel files ``ID_0000.nii.gz``).
    """

    title = "MSD"
    layout = "ROOT/dataset.json, ROOT/imagesTr/*.nii.gz and ROOT/labelsTr/*.nii.gz"

    def __init__(self, root) -> None:
        super().__init__(root)
        self._meta: dict | None = None
        self._info: DatasetInfo | None = None

    @property
    def json_path(self) -> Path:
        return self.root / "dataset.json"

    def _require_root(self) -> None:
        missing = [p for p in (self.json_path, self.root / "imagesTr", self.root / "labelsTr")
                   if not p.exists()]
        if missing:
            raise self.not_found(f"missing {', '.join(map(str, missing))}; expected {self.layout}")

    def _dataset_json(self) -> dict:
        if self._meta is None:
            if not self.json_path.is_file():  # the label map needs dataset.json alone (e.g. next to imagesTs/)
                self._require_root()
            try:
                meta = json.loads(self.json_path.read_text())
            except (OSError, ValueError) as exc:
                raise DataError(f"{self.json_path}: cannot parse (expected JSON, found {exc})") from exc
            if not isinstance(meta, dict):
                raise DataError(f"{self.json_path}: expected a JSON object, found {type(meta).__name__}")
            self._meta = meta
        return self._meta

    def _modalities(self) -> list[str]:
        meta = self._dataset_json()
        mods = meta.get("modality", meta.get("channel_names"))
        if not isinstance(mods, dict) or not mods:
            raise DataError(f"{self.json_path}: expected a 'modality' or 'channel_names' dict like "
                            f"{{\"0\": \"T2\"}}, found {mods!r}")
        try:
            return [str(mods[k]) for k in sorted(mods, key=int)]
        except ValueError as exc:
            raise DataError(f"{self.json_path}: modality keys must be channel numbers, "
                            f"found {list(mods)}") from exc

    def label_map(self) -> LabelMap:
        labels = self._dataset_json().get("labels")
        if not isinstance(labels, dict) or not labels:
            raise DataError(f"{self.json_path}: expected a 'labels' dict like {{\"0\": \"background\"}} "
                            f"or {{\"background\": 0}}, found {labels!r}")
        pairs = []
        for k, v in labels.items():
            if isinstance(v, (list, dict)):
                raise DataError(f"{self.json_path}: labels[{k!r}] = {v!r}: region-based labels are "
                                f"not supported (expected one integer value per class)")
            if str(k).lstrip("-").isdigit():  # MSD style: "1": "edema"
                pairs.append((int(k), str(v)))
            elif isinstance(v, int) or str(v).lstrip("-").isdigit():  # nnU-Net v2: "edema": 1
                pairs.append((int(v), str(k)))
            else:
                raise DataError(f"{self.json_path}: labels entry {k!r}: {v!r} has no integer value")
        pairs.sort()
        return LabelMap([v for v, _ in pairs], [n for _, n in pairs])

    def _scan_files(self) -> Scan:
        meta = self._dataset_json()
        if meta.get("training"):
            return self._scan_training_list(meta["training"])
        return self._scan_by_name()

    def _scan_training_list(self, training) -> Scan:
        cases, problems, ids = [], [], []
        for i, entry in enumerate(training):
            if not isinstance(entry, dict) or "image" not in entry:
                problems.append(f"{self.json_path}: training[{i}] (expected {{'image': ..., "
                                f"'label': ...}}, found {entry!r})")
                continue
            image = Path(os.path.normpath(self.root / entry["image"]))
            label = Path(os.path.normpath(self.root / entry["label"])) if entry.get("label") else None
            cid = nifti_stem(image.name)
            ids.append(cid)
            missing = [str(p) for p in (image, label) if p is not None and not p.is_file()]
            for p in missing:
                problems.append(f"{p}: listed in {self.json_path} training[{i}] but missing "
                                f"(expected a NIfTI file, found nothing)")
            if not missing:
                cases.append(Case(cid, [str(image)], str(label) if label else None))
        return Scan(cases, problems, ids)

    def _scan_by_name(self) -> Scan:
        img_dir, lab_dir = self.root / "imagesTr", self.root / "labelsTr"
        n_mod = len(self._modalities())
        images: dict[str, dict[int, Path]] = {}
        for p in sorted(img_dir.iterdir()):
            if not p.is_file() or is_hidden(p) or not is_nifti(p):
                continue
            stem = nifti_stem(p.name)
            m = _CHANNEL_FILE.match(stem)
            cid, ch = (m["id"], int(m["ch"])) if m else (stem, -1)  # -1: one file, all channels
            images.setdefault(cid, {})[ch] = p
        labels = {nifti_stem(p.name): p for p in sorted(lab_dir.iterdir())
                  if p.is_file() and not is_hidden(p) and is_nifti(p)}
        cases, problems = [], []
        for cid, files in sorted(images.items()):
            if -1 in files:
                paths = [files[-1]]
            else:
                paths = [files.get(c) for c in range(n_mod)]
                missing = [f"{cid}_{c:04d}.nii.gz" for c, p in enumerate(paths) if p is None]
                if missing:
                    problems.append(f"{img_dir}: case {cid} lacks channel file(s) {missing} "
                                    f"(expected {n_mod} channels)")
                    continue
            if cid not in labels:
                problems.append(f"{lab_dir}: no label for case {cid} (expected {cid}.nii.gz)")
                continue
            cases.append(Case(cid, [str(p) for p in paths], str(labels[cid])))
        for cid in sorted(set(labels) - set(images)):
            problems.append(f"{labels[cid]}: label without image (expected {img_dir}/{cid}.nii.gz)")
        if not images:
            raise self.not_found(f"no NIfTI images in {img_dir}; expected {self.layout}")
        return Scan(cases, problems, sorted(set(images) | set(labels)))

    def info(self) -> DatasetInfo:
        if self._info is None:
            cases = self.scan().cases
            if not cases:
                raise self.not_found(f"no complete cases; expected {self.layout}")
            first = cases[0].images[0]
            try:
                zooms = nib.load(first).header.get_zooms()[:3]
            except Exception as exc:  # noqa: BLE001 - corrupt headers of any kind
                raise DataError(f"{first}: cannot read the NIfTI header to get the voxel spacing "
                                f"(expected a valid NIfTI file, found {exc})") from exc
            mods = self._modalities()
            self._info = DatasetInfo(spatial_dims=3, in_channels=len(mods),
                                     label_map=self.label_map(), modalities=mods,
                                     spacing=tuple(float(z) for z in zooms))
        return self._info
