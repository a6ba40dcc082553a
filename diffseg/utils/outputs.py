"""Files a run writes: panels of image / ground truth / prediction, predicted masks, atomic files."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
import math
from typing import Any, Sequence

import numpy as np


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write via a temporary file in the same folder and ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_panel_grid(path: str | os.PathLike, panels: Sequence[tuple]) -> Path:
    """One row per case ``(index, case_id, image, ground truth or None, prediction[, maps])``: image,
    ground truth (left out for new data), prediction and each uncertainty map (``maps``: name -> 2D array,
    e.g. std and entropy over samples), each drawn as given (row 0 at the top), so a 2D panel looks like its
    file (diffseg.models.base.SegmentationModule.panel orients 3D slices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for _, case_id, img, gt, pred, *rest in panels:
        maps = rest[0] if rest else {}
        columns = [("image", img)] + ([("ground truth", gt)] if gt is not None else []) + [("prediction", pred)]
        rows.append((case_id, columns + [(name, value) for name, value in maps.items()]))
    width = max(len(columns) for _, columns in rows)
    vmax = max(int(arr.max()) for _, columns in rows for title, arr in columns
               if title in ("ground truth", "prediction")) or 1
    fig, axes = plt.subplots(len(rows), width, figsize=(2.5 * width, 2.5 * len(rows)), squeeze=False)
    for row, (case_id, columns) in zip(axes, rows):
        for ax in row:
            ax.axis("off")
        for ax, (title, arr) in zip(row, columns):
            if title == "image":
                ax.imshow(arr, cmap="gray")
            elif title in ("ground truth", "prediction"):
                ax.imshow(arr, cmap="viridis", vmin=0, vmax=vmax)
            else:  # an uncertainty map: its own colour scale, with a bar
                fig.colorbar(ax.imshow(arr, cmap="magma", vmin=0), ax=ax, fraction=0.046)
            ax.set_title(f"{case_id}: {title}" if title == "image" else title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_prediction_file(directory: str | os.PathLike, case_id: str, pred: np.ndarray, num_classes: int,
                         affine: np.ndarray | None = None) -> Path:
    """A predicted class map: PNG for 2D (binary as 0/255, else class ids), NIfTI for 3D."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pred.ndim == 2:
        from PIL import Image

        arr = (pred > 0).astype(np.uint8) * 255 if num_classes == 2 else pred.astype(np.uint8)
        path = directory / f"{case_id}.png"
        tmp = directory / f".{case_id}.png.tmp"
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
        return path
    import nibabel as nib

    path = directory / f"{case_id}.nii.gz"
    tmp = directory / f".{case_id}.tmp.nii.gz"
    nib.save(nib.Nifti1Image(pred.astype(np.uint8), affine if affine is not None else np.eye(4)), tmp)
    os.replace(tmp, path)
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"
