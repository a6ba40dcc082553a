"""Predicted cases as files in the INPUT's space: the mask, and the uncertainty maps of sampling models.

One writer for ``scripts/predict.py`` and for ``save_predictions`` at test time (docs/methods.md §7):

1. the class probabilities (and the ``std`` / ``entropy`` maps) leave the model in the pipeline's grid
   (RAS orientation, ``data.target_spacing``, ``data.resize``, padding to the patch size);
2. MONAI's ``Invertd`` undoes those transforms with the operations recorded on the image
   (``applied_operations``): crop the padding, resample back to the original spacing and shape, restore
   the original orientation, so that the result has the input file's shape and affine. Probabilities are
   interpolated (linear) and decoded afterwards, which keeps boundaries smooth; an ``area`` resize of
   the image (anti-aliased downsampling) is undone with bilinear interpolation;
3. the probabilities are decoded into the data set's ORIGINAL label values (``decode_probabilities``:
   BraTS 0/1/2/4 or 0/1/2/3, MSD dataset.json values, 0/255 for binary 2D masks).

3D cases are written as ``<case>.nii.gz`` (uint8/int16 labels; the maps as float32) with the input's
affine; 2D cases as ``<case>.png`` at the input's size (maps as uint8 = round(scale · value), see
``PNG_SCALE``).
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor, decollate_batch
from monai.utils import TraceKeys

from diffseg.data.labels import LabelMap
from diffseg.inference.samples import SPREAD_MAPS
from diffseg.utils.outputs import save_prediction_file

FINAL = "final"
#: 2D maps are PNG: uint8 = round(scale · value); the std of values in [0, 1] is at most 0.5, the
#: normalised entropy at most 1, so 255 is the largest possible value of each
PNG_SCALE = {"std": 510.0, "entropy": 255.0}


def nested_region_chain(regions: Mapping[str, Sequence[int]], num_classes: int) -> list[tuple[list[int], int]] | None:
    """[(region's classes, the class it adds)] from the largest region to the smallest when the regions
    are nested and each adds exactly one class (BraTS: WT {1,2,3} ⊃ TC {1,3} ⊃ ET {3} adds ED 2, NCR 1,
    ET 3) and the largest holds every foreground class; else None (classes decoded by argmax)."""
    chain = sorted((sorted(set(int(i) for i in v)) for v in regions.values()), key=len, reverse=True)
    if not chain or chain[0] != list(range(1, num_classes)):
        return None
    steps = []
    for big, small in zip(chain, chain[1:] + [[]]):
        added = set(big) - set(small)
        if not set(small) < set(big) or len(added) != 1:
            return None
        steps.append((big, added.pop()))
    return steps


def decode_probabilities(probs: torch.Tensor, label_map: LabelMap,
                         regions: Mapping[str, Sequence[int]] | None = None) -> np.ndarray:
    """Class probabilities (C, *S) -> the data set's raw label values (*S).

    Nested evaluation regions (BraTS WT ⊃ TC ⊃ ET) are decoded the BraTS way: a region is present where
    the sum of its classes' probabilities exceeds 0.5, and a voxel takes the label that its smallest
    present region adds (ET -> 4, TC without ET -> NCR 1, WT without TC -> ED 2, else 0). Other label
    maps take the most probable class. Class indices are mapped to values by ``label_map.decode``."""
    probs = torch.as_tensor(probs).float()
    chain = nested_region_chain(regions if regions is not None else label_map.regions, probs.shape[0])
    if chain is None:
        classes = probs.argmax(0)
    else:
        classes = torch.zeros(probs.shape[1:], dtype=torch.long)
        for members, added in chain:  # largest region first: smaller regions paint over it
            classes[probs[members].sum(0) > 0.5] = added
    return label_map.decode(classes.cpu().numpy())


def _label_dtype(values: Sequence[int]):
    return np.uint8 if max(values) < 256 else np.int16 if max(values) < 2**15 else np.int32


def _bilinear_for_area(operations: list) -> list:
    """A copy of the recorded operations in which an ``area`` resize is undone bilinearly (area
    interpolation only averages: upsampling with it would repeat pixels)."""
    ops = copy.deepcopy(operations)
    for op in ops:
        extra = op.get(TraceKeys.EXTRA_INFO) if isinstance(op, dict) else None
        if isinstance(extra, dict) and extra.get("mode") == "area":
            extra["mode"] = "bilinear" if len(op.get(TraceKeys.ORIG_SIZE, ())) == 2 else "trilinear"
    return ops


class CaseWriter:
    """Writes one predicted case into ``directory`` in the input's grid and label values.

    Args:
        directory: output folder (``<case>.nii.gz`` / ``<case>.png``, ``<case>_std``, ``<case>_entropy``).
        label_map: the data set's label values (``LabelMap.decode``).
        regions: the run's evaluation regions (nested ones are decoded the BraTS way).
        spatial_dims: 2 (PNG) or 3 (NIfTI).
        pipeline: the deterministic MONAI pipeline the image went through; None writes the outputs in
            the grid they come in (e.g. a bare tensor without recorded transforms).
    """

    def __init__(self, directory: str | os.PathLike, label_map: LabelMap, regions: Mapping[str, Sequence[int]] | None,
                 spatial_dims: int, pipeline: mt.Compose | None = None):
        self.directory = Path(directory)
        self.label_map, self.regions = label_map, regions
        self.spatial_dims = int(spatial_dims)
        self.pipeline = pipeline

    def to_input_space(self, outputs: Mapping[str, torch.Tensor], image) -> tuple[dict[str, torch.Tensor], np.ndarray | None]:
        """({name: (C, *S_input) tensor}, affine of the input or None) for FINAL and the maps."""
        names = [FINAL] + [k for k in SPREAD_MAPS if k in outputs]
        data = {name: outputs[name][0].detach().float().cpu() for name in names}
        item = image
        if isinstance(image, MetaTensor) and image.ndim == self.spatial_dims + 2:
            item = decollate_batch({"image": image.detach().cpu()[:1]})[0]["image"]  # one case, its own meta
        if self.pipeline is None or not isinstance(item, MetaTensor) or not item.applied_operations:
            affine = getattr(item, "affine", None)
            return data, None if affine is None else np.asarray(torch.as_tensor(affine).reshape(-1, 4, 4)[0]) \
                if self.spatial_dims == 3 else None
        reference = MetaTensor(torch.zeros(1), meta=copy.deepcopy(item.meta),
                               applied_operations=_bilinear_for_area(item.applied_operations))
        inverted = mt.Invertd(keys=names, transform=self.pipeline, orig_keys=["image"] * len(names),
                              nearest_interp=False)({"image": reference, **data})
        result = {name: torch.as_tensor(inverted[name]).float() for name in names}
        affine = np.asarray(inverted[FINAL].affine, dtype=np.float64) if self.spatial_dims == 3 else None
        return result, affine

    def write(self, case_id: str, outputs: Mapping[str, torch.Tensor], image) -> dict[str, Path]:
        """Write the mask (and maps); returns {"file": mask path, "std": ..., "entropy": ...}."""
        data, affine = self.to_input_space(outputs, image)
        labels = decode_probabilities(data.pop(FINAL), self.label_map, self.regions)
        written = {"file": self._save(case_id, labels, affine, label=True)}
        for name, values in data.items():
            written[name] = self._save(f"{case_id}_{name}", values[0].numpy(), affine, label=False, scale=PNG_SCALE[name])
        return written

    def _save(self, name: str, array: np.ndarray, affine, *, label: bool, scale: float = 1.0) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.spatial_dims == 2:
            if label:  # binary masks as 0/255, class values as they are
                return save_prediction_file(self.directory, name, array, self.label_map.num_classes)
            quantised = np.clip(np.rint(array * scale), 0, 255).astype(np.uint8)
            return save_prediction_file(self.directory, name, quantised, 256)
        import nibabel as nib

        dtype = _label_dtype(self.label_map.values) if label else np.float32
        path = self.directory / f"{name}.nii.gz"
        tmp = self.directory / f".{name}.tmp.nii.gz"
        image = nib.Nifti1Image(np.asarray(array).astype(dtype), affine if affine is not None else np.eye(4))
        image.header.set_xyzt_units("mm")
        nib.save(image, tmp)
        os.replace(tmp, path)  # never a half-written file under the final name
        return path
