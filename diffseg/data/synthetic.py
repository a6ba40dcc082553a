"""Synthetic data sets written as real files, once, deterministically from a seed.

Each writer is idempotent and atomic: it generates into a temporary sibling folder and renames it into
place at the end, with a marker file recording the generator and its parameters. A finished ROOT with
the same marker is returned at once; a marker with other parameters raises DataError.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import draw

from diffseg.data.errors import DataError
from diffseg.data.formats.brats import brats_file_names
from diffseg.data.labels import brats_label_map

MARKER = ".diffseg_synthetic.json"
# bump a generator's version whenever its output changes, so that old data sets are not reused
VERSIONS = {"write_shapes2d": 1, "write_brats_synthetic": 2, "write_msd_synthetic": 1}


# ----------------------------------------------------------------------------- atomic, idempotent writes
def _is_done(root: Path, record: dict) -> bool:
    """True when ROOT holds this exact data set; False when ROOT is missing or an empty folder."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DataError(f"{root}: expected a folder for synthetic data, found a file; "
                        f"delete it or change data.root")
    marker = root / MARKER
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = {"unreadable marker": str(marker)}
        if found == record:
            return True
        if {**found, "version": record["version"]} == record:
            raise DataError(f"{root}: holds synthetic data from another version of {record['generator']} "
                            f"(expected version {record['version']}, found {found.get('version')}); "
                            f"delete {root} to regenerate it, or change data.root")
        raise DataError(f"{root}: holds synthetic data written with other parameters (expected "
                        f"{record}, found {found}); delete {root} or change data.root")
    if any(root.iterdir()):
        raise DataError(f"{root}: exists but is not synthetic data from {record['generator']} (expected "
                        f"a missing or empty folder, or one with {MARKER}); delete it or change data.root")
    return False


def _write_once(root, generator: str, params: dict, write: Callable[[Path], None]) -> Path:
    root = Path(root).expanduser().absolute()
    record = {"generator": generator, "version": VERSIONS[generator],
              "params": json.loads(json.dumps(params))}
    if _is_done(root, record):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=1))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        try:
            os.replace(tmp, root)  # atomic; replaces a missing or empty ROOT only
        except OSError:
            if not _is_done(root, record):  # unless another process finished the same data first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# ----------------------------------------------------------------------------- helpers
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation from n_in evenly spaced samples to n_out, as an (n_out, n_in) matrix."""
    x = np.linspace(0, n_in - 1, n_out)
    i0 = np.minimum(np.floor(x).astype(int), n_in - 2)
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), i0] = 1 - (x - i0)
    w[np.arange(n_out), i0 + 1] = x - i0
    return w


def _smooth_field(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    """Zero-mean unit-variance random field varying over about ``scale`` voxels (cheap: a smoothed
    coarse grid, upsampled separably)."""
    coarse_shape = tuple(max(2, int(np.ceil(s / scale)) + 1) for s in shape)
    f = ndimage.gaussian_filter(rng.standard_normal(coarse_shape), 0.7)
    for axis, (n_out, n_in) in enumerate(zip(shape, coarse_shape)):
        f = np.moveaxis(np.moveaxis(f, axis, -1) @ _interp_matrix(n_out, n_in).T, -1, axis)
    return (f - f.mean()) / (f.std() + 1e-8)


def _random_rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diag(r))


def _check_positive(**kwargs) -> None:
    bad = {k: v for k, v in kwargs.items() if np.any(np.asarray(v) < 1)}
    if bad:
        raise DataError(f"synthetic data: expected positive values, found {bad}")


# ----------------------------------------------------------------------------- 2D shapes
def _draw_shapes(rng, size: int, num_classes: int, touch_border: bool) -> np.ndarray:
    n = int(rng.integers(1, 4)) + num_classes - 2
    classes = 1 + rng.permutation(n) % (num_classes - 1)  # every foreground class at least once
    mask = np.zeros((size, size), np.uint8)
    for i in range(n):
        r = size * rng.uniform(0.08, 0.28)
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        if touch_border and i == 0:  # centre on an edge, so the shape is cut by the border
            edge = rng.uniform(-0.2, 0.4) * r
            cy, cx = [(edge, cx), (size - 1 - edge, cx), (cy, edge), (cy, size - 1 - edge)][rng.integers(4)]
        if rng.random() < 0.5:
            rr, cc = draw.ellipse(cy, cx, r * rng.uniform(0.5, 1), r * rng.uniform(0.5, 1),
                                  shape=mask.shape, rotation=rng.uniform(0, np.pi))
        else:  # star-convex polygon
            k = int(rng.integers(3, 9))
            ang = (np.arange(k) + rng.uniform(-0.35, 0.35, k)) * 2 * np.pi / k + rng.uniform(0, 2 * np.pi)
            rad = r * rng.uniform(0.55, 1.0, k)
            rr, cc = draw.polygon(cy + rad * np.sin(ang), cx + rad * np.cos(ang), shape=mask.shape)
        mask[rr, cc] = classes[i]
    return mask


def shapes2d_sample(rng: np.random.Generator, size: int = 64, num_classes: int = 2,
                    touch_border: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One RGB uint8 image (H, W, 3) and its class-id mask (H, W) uint8, every class present."""
    min_px = max(4, size * size // 400)
    for _ in range(200):
        mask = _draw_shapes(rng, size, num_classes, touch_border)
        counts = np.bincount(mask.ravel(), minlength=num_classes)
        if counts[0] > 0 and (counts[1:] >= min_px).all():
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError("shapes2d_sample: could not draw a mask with every class")
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    bg = rng.uniform(0.3, 0.7, 3)
    img = bg + 0.10 * _smooth_field(rng, (size, size, 3), size / 6)
    for k in range(1, num_classes):  # foreground: shifted colour + oriented stripes + fine grain
        delta = rng.standard_normal(3)
        delta *= rng.uniform(0.12, 0.22) / np.linalg.norm(delta)
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 7)
        stripes = 0.07 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
        grain = 0.06 * ndimage.gaussian_filter(rng.standard_normal((size, size, 3)), (1, 1, 0)) * 2
        img = np.where((mask == k)[..., None], bg + delta + stripes[..., None] + grain, img)
    img = ndimage.gaussian_filter(img, (0.6, 0.6, 0)) + rng.normal(0, 0.05, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def write_shapes2d(root, num_cases: int = 48, size: int = 64, seed: int = 0,
                   num_classes: int = 2) -> Path:
    """ROOT/images/case_XXX.png (RGB) + ROOT/masks/case_XXX.png (0/255 binary, class ids if > 2)."""
    _check_positive(num_cases=num_cases, size=size - 7, num_classes=num_classes - 1)

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i in range(num_cases):
            rng = np.random.default_rng([seed, i])
            image, mask = shapes2d_sample(rng, size, num_classes, touch_border=i % 3 == 0)
            if num_classes == 2:
                mask = mask * np.uint8(255)
            Image.fromarray(image, "RGB").save(tmp / "images" / f"case_{i:03d}.png")
            Image.fromarray(mask, "L").save(tmp / "masks" / f"case_{i:03d}.png")

    params = dict(num_cases=num_cases, size=size, seed=seed, num_classes=num_classes)
    return _write_once(root, "write_shapes2d", params, write)


# ----------------------------------------------------------------------------- 3D volumes
def _ellipsoid_distance(shape, centre, radii, rot) -> np.ndarray:
    """sqrt(sum_i ((R (x - c))_i / r_i)^2): < 1 inside a rotated ellipsoid (broadcast, no full grid)."""
    axes = [(np.arange(n) - c).reshape([-1 if a == i else 1 for a in range(3)])
            for i, (n, c) in enumerate(zip(shape, centre))]
    return np.sqrt(sum(((rot[i, 0] * axes[0] + rot[i, 1] * axes[1] + rot[i, 2] * axes[2]) / radii[i]) ** 2
                       for i in range(3)))


def _head(rng, shape):
    shape_a = np.asarray(shape, float)
    centre = shape_a / 2 - 0.5 + rng.uniform(-1, 1, 3) * shape_a * 0.03
    axes = shape_a / 2 * rng.uniform(0.78, 0.9, 3)
    d = _ellipsoid_distance(shape, centre, axes, np.eye(3))
    return d * (1 + 0.03 * _smooth_field(rng, shape, min(shape) / 3)) < 1, centre, axes


def _nifti(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> nib.Nifti1Image:
    affine = np.diag([*map(float, spacing), 1.0])
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


# class means per modality for [brain, ncr, ed, et]: flair bright on WT, t2 bright on ED and NCR,
# t1ce bright on ET only, t1 dark on the core
_BRATS_MEANS = {"t1": [0.60, 0.22, 0.48, 0.32], "t1ce": [0.55, 0.28, 0.52, 1.00],
                "t2": [0.42, 0.95, 0.88, 0.62], "flair": [0.45, 0.72, 0.90, 0.80]}
_BRAIN_TEXTURE = {"t1": 0.10, "t1ce": 0.08, "t2": -0.12, "flair": -0.06}


def brats_sample(rng: np.random.Generator, shape=(48, 48, 48)) -> tuple[dict, np.ndarray]:
    """Modalities {t1, t1ce, t2, flair} (float32) and class indices (0 bg, 1 ncr, 2 ed, 3 et)."""
    head, h_centre, h_axes = _head(rng, shape)
    f_wt, f_core = (_smooth_field(rng, shape, min(shape) / 5) for _ in range(2))
    need = max(4, int(np.prod(shape)) // 20000)
    for attempt in range(100):  # irregular whole tumour = ED ⊃ core = ET rim around NCR centre
        radii = min(shape) * rng.uniform(0.16, 0.25, 3) * (1 + attempt / 50)
        centre = h_centre + rng.uniform(-1, 1, 3) * np.clip(h_axes - radii, 0, None) * 0.6
        d = _ellipsoid_distance(shape, centre, radii, _random_rotation(rng, 3))
        wt = head & (d * (1 + 0.22 * f_wt) < 1)
        d_core = d * (1 + 0.15 * f_core)
        core = ndimage.binary_erosion(wt, iterations=2) & (d_core < rng.uniform(0.6, 0.75))  # ED rim
        ncr = ndimage.binary_erosion(core) & (d_core < rng.uniform(0.4, 0.5))  # ET rim around it
        lab = np.where(ncr, 1, np.where(core, 3, np.where(wt, 2, 0))).astype(np.uint8)
        if (np.bincount(lab.ravel(), minlength=4)[1:] >= need).all():
            break
    else:  # pragma: no cover
        raise RuntimeError(f"brats_sample: shape {shape} too small for a nested tumour")
    brain_tex = _smooth_field(rng, shape, 3.0)
    tumour_tex = _smooth_field(rng, shape, 2.0)
    bias = np.exp(0.12 * _smooth_field(rng, shape, min(shape) / 1.5))
    images = {}
    for mod, means in _BRATS_MEANS.items():
        img = np.asarray(means)[lab] * np.where(lab == 0, 1 + _BRAIN_TEXTURE[mod] * brain_tex,
                                                1 + 0.06 * tumour_tex)
        img = ndimage.gaussian_filter(img * head, 0.6) * bias + rng.normal(0, 0.03, shape)
        images[mod] = (np.clip(img, 0, None) * rng.uniform(400, 1200) * head).astype(np.float32)
    return images, lab


def write_brats_synthetic(root, num_cases: int = 24, shape=(48, 48, 48), seed: int = 0,
                          label_scheme: str = "brats2021") -> Path:
    """BraTS layout CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz (brats2021: ids BraTS2021_XXXXX, ET = 4)
    or CASE/CASE-{t1n,t1c,t2w,t2f,seg}.nii.gz (brats2023: ids BraTS-GLI-XXXXX-000, ET = 3)."""
    raw_values = np.asarray(brats_label_map(label_scheme).values, np.uint8)  # validates the scheme
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise DataError(f"shape: expected 3 sizes >= 16, found {shape}")
    _check_positive(num_cases=num_cases)

    def write(tmp: Path) -> None:
        for i in range(num_cases):
            cid = f"BraTS2021_{i:05d}" if label_scheme == "brats2021" else f"BraTS-GLI-{i:05d}-000"
            (tmp / cid).mkdir()
            images, lab = brats_sample(np.random.default_rng([seed, i]), shape)
            for key, arr in [*images.items(), ("seg", raw_values[lab])]:
                nib.save(_nifti(arr), tmp / cid / brats_file_names(cid, key, label_scheme)[0])

    params = dict(num_cases=num_cases, shape=list(shape), seed=seed, label_scheme=label_scheme)
    return _write_once(root, "write_brats_synthetic", params, write)


_MSD_MODALITIES = ["T2", "ADC", "FLAIR", "T1", "T1c"]


def write_msd_synthetic(root, num_cases: int = 12, shape=(32, 32, 32), seed: int = 0,
                        num_modalities: int = 2, num_classes: int = 3,
                        spacing=(1.0, 1.0, 1.0)) -> Path:
    """MSD layout: dataset.json + imagesTr/synth_XXX.nii.gz (4D when num_modalities > 1) + labelsTr/.
    Nested blobs: class k (1..num_classes-1) inside class k-1, each with its own contrast."""
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 12:
        raise DataError(f"shape: expected 3 sizes >= 12, found {shape}")
    _check_positive(num_cases=num_cases, num_modalities=num_modalities, num_classes=num_classes - 1)
    mods = [_MSD_MODALITIES[m] if m < len(_MSD_MODALITIES) else f"MOD{m}" for m in range(num_modalities)]
    means = np.random.default_rng([seed, 10**6]).uniform(0.15, 1.0, (num_classes + 1, num_modalities))

    def write(tmp: Path) -> None:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for i in range(num_cases):
            rng = np.random.default_rng([seed, i])
            body, centre, axes = _head(rng, shape)
            for _ in range(100):
                d = _ellipsoid_distance(shape, centre + rng.uniform(-1, 1, 3) * axes * 0.2,
                                        axes * rng.uniform(0.45, 0.6, 3), _random_rotation(rng, 3))
                d = d * (1 + 0.15 * _smooth_field(rng, shape, min(shape) / 4))
                lab = np.zeros(shape, np.uint8)
                for k in range(1, num_classes):
                    lab[body & (d < 0.6 ** (k - 1))] = k
                if (np.bincount(lab.ravel(), minlength=num_classes) >= 4).all():
                    break
            chans = [(means[np.where(body, lab + 1, 0), m]
                      + 0.04 * rng.standard_normal(shape)).astype(np.float32)
                     for m in range(num_modalities)]
            img = np.stack(chans, -1) if num_modalities > 1 else chans[0]
            nib.save(_nifti(img, spacing), tmp / "imagesTr" / f"synth_{i:03d}.nii.gz")
            nib.save(_nifti(lab, spacing), tmp / "labelsTr" / f"synth_{i:03d}.nii.gz")
        meta = {"name": "SyntheticMSD", "description": "diffseg synthetic MSD-layout data",
                "tensorImageSize": "4D" if num_modalities > 1 else "3D",
                "modality": {str(m): name for m, name in enumerate(mods)},
                "labels": {"0": "background", **{str(k): f"structure{k}" for k in range(1, num_classes)}},
                "numTraining": num_cases, "numTest": 0, "test": [],
                "training": [{"image": f"./imagesTr/synth_{i:03d}.nii.gz",
                              "label": f"./labelsTr/synth_{i:03d}.nii.gz"} for i in range(num_cases)]}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))

    params = dict(num_cases=num_cases, shape=list(shape), seed=seed, num_modalities=num_modalities,
                  num_classes=num_classes, spacing=[float(s) for s in spacing])
    return _write_once(root, "write_msd_synthetic", params, write)
