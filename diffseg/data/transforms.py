"""MONAI preprocessing and augmentation pipelines, one builder for 2D images and 3D volumes.

The deterministic part (load, label encoding, orientation, resampling, normalisation, padding) is
cached (in memory, or on disk under a key from ``preprocessing_fingerprint``); the random part (foreground-weighted patches, flips, intensity and colour jitter) runs
every epoch. Validation and test use the deterministic part only and keep whole images/volumes
for sliding-window inference.
"""
from __future__ import annotations

import enum
import hashlib
import json
from typing import Any, Sequence

import numpy as np
import torch
from monai import transforms as mt
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import NibabelReader, PILReader
from monai.utils.enums import TraceKeys

from diffseg.data.errors import DataError
from diffseg.data.labels import LabelMap

IMAGE_SUFFIXES_2D = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class EncodeLabelsd(mt.MapTransform):
    """Map raw label values to contiguous class indices through an explicit LabelMap.

    A value outside the map stops with a DataError naming the label file.
    """

    def __init__(self, keys: KeysCollection, label_map: LabelMap):
        super().__init__(keys)
        self.label_map = label_map

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            arr = d[key]
            source = _source_name(arr)
            values = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
            # gray masks stored as RGB(A) PNG: keep the first channel
            if values.ndim >= 3 and values.shape[0] > 1:
                values = values[:1]
            encoded = self.label_map.encode(np.rint(values).astype(np.int64), source=source)
            tensor = torch.as_tensor(encoded, dtype=torch.int64)
            d[key] = MetaTensor(tensor, meta=arr.meta) if isinstance(arr, MetaTensor) else tensor
        return d


class CheckedLoadImaged(mt.LoadImaged):
    """LoadImaged that turns an unreadable file into one DataError naming the file."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as err:  # noqa: BLE001 - re-raised with the file name
            files = {k: data.get(k) for k in self.keys if k in data}
            raise DataError(f"cannot read {files}: {type(err).__name__}: {err}") from err


class ToFloatImaged(mt.MapTransform):
    """Images as float32 (PNG loads as uint8)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = d[key].float()
        return d


# MONAI allowlists MetaTensor, MetaKeys and SpaceKeys for torch.load(weights_only=True), not TraceKeys, which the
# transform trace kept for inverting predictions holds again once MONAI re-wraps a cached item as a MetaTensor
torch.serialization.add_safe_globals([TraceKeys])


class PlainMetad(mt.MapTransform):
    """Image metadata and the transform trace (``applied_operations``, which predictions are inverted with:
    diffseg.inference.case_writer) reduced to tensors and plain values.

    A disk-cached case is then read back with ``torch.load(weights_only=True)``: NIfTI headers carry NumPy
    values, which the safe loader refuses (MONAI would silently recompute every cached case). The affine,
    the spacing source, is kept as a tensor."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            arr = d[key]
            if isinstance(arr, MetaTensor):
                arr.meta = {k: _plain(v) for k, v in arr.meta.items()}
                arr.applied_operations = [_plain(op) for op in arr.applied_operations]
        return d


def _plain(value):
    if isinstance(value, np.ndarray):
        return torch.as_tensor(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):  # enum keys too (MONAI's TraceKeys are str enums: lookups still match)
        return {(k.value if isinstance(k, enum.Enum) else k): _plain(v) for k, v in value.items()}
    return value


def _describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's settings: class name and public attributes, recursively."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, enum.Enum):
        return str(obj.value)
    if isinstance(obj, (np.ndarray, np.generic, torch.Tensor)):
        return np.asarray(obj).tolist()
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [_describe(v, depth + 1) for v in obj]
        return sorted(items, key=repr) if isinstance(obj, (set, frozenset)) else items
    if isinstance(obj, dict):
        return {str(k): _describe(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (torch.dtype, np.dtype, type)):
        return str(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth > 6 or not hasattr(obj, "__dict__"):
        return name
    return {"class": name, **{k: _describe(v, depth + 1) for k, v in sorted(vars(obj).items())
                              if not k.startswith("_") and not callable(v) or isinstance(v, mt.Transform)}}


def preprocessing_fingerprint(transforms: Sequence, **context: Any) -> str:
    """Hex digest of the deterministic pipeline: every transform's class and settings (a changed
    normalisation, spacing, label map or pad size gives another key) plus ``context`` (e.g. the data root)."""
    description = {"transforms": [_describe(t) for t in transforms], **{k: _describe(v) for k, v in context.items()}}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _source_name(arr) -> str:
    meta = getattr(arr, "meta", None) or {}
    name = meta.get("filename_or_obj", "<label>")
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def _reader(spatial_dims: int):
    # PNG/TIF/JPG through PIL without MONAI's default axis reversal, so that saved predictions
    # line up with the original files; NIfTI through nibabel.
    return PILReader(reverse_indexing=False) if spatial_dims == 2 else NibabelReader()


def deterministic_transforms(
    *,
    spatial_dims: int,
    label_map: LabelMap,
    patch_size: Sequence[int],
    has_label: bool = True,
    extra_label_keys: Sequence[str] = (),
    target_spacing: Sequence[float] | None = None,
    orientation: str | None = "RAS",
    resize: Sequence[int] | None = None,
) -> list:
    """Load + encode + orient + resample + normalise + pad: the cached part of every pipeline."""
    label_keys = (["label"] if has_label else []) + list(extra_label_keys)
    keys = ["image", *label_keys]
    ts: list = [
        CheckedLoadImaged(keys=keys, reader=_reader(spatial_dims), image_only=True, ensure_channel_first=True),
        ToFloatImaged(keys="image"),
    ]
    if label_keys:
        ts.append(EncodeLabelsd(keys=label_keys, label_map=label_map))
    if spatial_dims == 3 and orientation:
        ts.append(mt.Orientationd(keys=keys, axcodes=orientation))
    if target_spacing is not None:
        modes = ["bilinear"] + ["nearest"] * len(label_keys)
        ts.append(mt.Spacingd(keys=keys, pixdim=tuple(target_spacing), mode=modes))
    if resize is not None:
        modes = ["area"] + ["nearest"] * len(label_keys)
        ts.append(mt.Resized(keys=keys, spatial_size=tuple(resize), mode=modes))
    # per-channel z-score; 3D MR uses brain voxels only (zeros are outside the head)
    ts.append(mt.NormalizeIntensityd(keys="image", nonzero=spatial_dims == 3, channel_wise=True))
    ts.append(mt.SpatialPadd(keys=keys, spatial_size=tuple(patch_size)))
    ts.append(mt.EnsureTyped(keys=keys, track_meta=True))
    ts.append(PlainMetad(keys=keys))
    return ts


def random_transforms(
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    has_label: bool = True,
    extra_label_keys: Sequence[str] = (),
    foreground_ratio: float = 0.5,
    augment: bool = True,
    rotate_degrees: float = 0.0,
    scale_range: float = 0.0,
    color_jitter: float = 0.0,
) -> list:
    """Random patch + augmentation, applied after the cache every epoch.

    ``foreground_ratio`` of the patches are centred on a foreground voxel (MONAI's
    RandCropByPosNegLabeld), the rest anywhere. Rotations and scaling are affine (nnU-Net/SegDiff
    style); ``color_jitter`` scales/shifts each channel's intensity and contrast.
    """
    label_keys = (["label"] if has_label else []) + list(extra_label_keys)
    keys = ["image", *label_keys]
    ts: list = []
    if has_label and foreground_ratio > 0:
        ts.append(
            mt.RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=tuple(patch_size),
                pos=foreground_ratio, neg=1.0 - foreground_ratio, num_samples=1,
                image_key="image", image_threshold=-np.inf, allow_smaller=False,
            )
        )
    else:
        ts.append(mt.RandSpatialCropd(keys=keys, roi_size=tuple(patch_size), random_size=False))
    if not augment:
        return ts
    for axis in range(spatial_dims):
        ts.append(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
    if spatial_dims == 2:
        ts.append(mt.RandRotate90d(keys=keys, prob=0.5, max_k=3))
    if rotate_degrees > 0 or scale_range > 0:
        angle = float(np.deg2rad(rotate_degrees))
        ts.append(
            mt.RandAffined(
                keys=keys, prob=0.3,
                rotate_range=[angle] * (1 if spatial_dims == 2 else 3),
                scale_range=[scale_range] * spatial_dims,
                mode=["bilinear"] + ["nearest"] * len(label_keys), padding_mode="zeros",
            )
        )
    if color_jitter > 0:
        ts.append(mt.RandScaleIntensityd(keys="image", factors=color_jitter, prob=0.5, channel_wise=True))
        ts.append(mt.RandShiftIntensityd(keys="image", offsets=color_jitter, prob=0.5, channel_wise=True))
        ts.append(mt.RandAdjustContrastd(keys="image", gamma=(1 - color_jitter, 1 + color_jitter), prob=0.3))
    return ts
