"""Refine any model's masks with a SegRefiner checkpoint (scripts/refine.py).

    python scripts/refine.py ckpt=RUN/checkpoints/best.ckpt images=DIR coarse=DIR out=DIR \
        [masks=DIR] [steps=K] [local=false] [match=coarse] [coarse_threshold=128]

Images and coarse masks (and ground-truth masks) are paired by file stem; every missing partner is
listed in one error. Each image is normalised as in training and refined by the model's own
predictor (K-step refinement; global-then-local for images larger than the training size unless
local=false, with the number of local patches per image reported). Writes DIR_OUT/<stem>.png (0/255) and, with masks=, prints coarse vs refined IoU
(pooled and mean), mBA and FBound, and writes DIR_OUT/refine_metrics.json.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai import transforms as mt
from monai.data.image_reader import PILReader
from omegaconf import DictConfig, OmegaConf

from diffseg.data.errors import DataError
from diffseg.data.formats.folder2d import _list_by_stem, image_channels
from diffseg.data.labels import binary_label_map
from diffseg.data.transforms import CheckedLoadImaged, deterministic_transforms
from diffseg.metrics.scoring import aggregate, score_case
from diffseg.models.base import FINAL
from diffseg.utils.errors import ConfigError
from diffseg.utils.outputs import save_prediction_file, write_json

log = logging.getLogger("diffseg")

#: table columns: (metric key, header)
COLUMNS = (("iou_pooled", "IoU (pooled)"), ("iou", "IoU (mean)"), ("mba", "mBA"), ("fbound", "FBound"))
MATCH = ("both", "coarse")


def _folder(value: Any, key: str) -> Path:
    if value in (None, "", "???"):
        raise ConfigError(f"{key}= is required: a folder of images/masks (see scripts/refine.py)")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{key}={path}: no such folder")
    return path


def pair_files(images: Path, coarse: Path, masks: Path | None = None, match: str = "both") -> list[dict]:
    """Cases {case_id, image, coarse[, label]} matched by stem. ``match``: ``both`` (every image needs
    a coarse mask and every coarse mask an image) or ``coarse`` (the coarse masks choose the cases,
    e.g. one model's test-split predictions next to the whole image folder)."""
    if match not in MATCH:
        raise ConfigError(f"match: expected one of {list(MATCH)}, got {match!r}")
    problems: list[str] = []
    imgs = _list_by_stem(images, "image", problems)
    crs = _list_by_stem(coarse, "coarse", problems)
    gts = _list_by_stem(masks, "mask", problems) if masks is not None else {}
    stems = sorted(crs) if match == "coarse" else sorted(set(imgs) | set(crs))
    no_image = [s for s in stems if s not in imgs]
    no_coarse = [s for s in stems if s not in crs]
    no_mask = [s for s in stems if masks is not None and s not in gts]
    for missing, folder, what in ((no_image, images, "image"), (no_coarse, coarse, "coarse mask"),
                                  (no_mask, masks, "ground-truth mask")):
        if missing:
            problems.append(f"{folder}: no {what} for {len(missing)} stem(s): {missing[:20]}"
                            f"{' ...' if len(missing) > 20 else ''}")
    if not stems and not problems:
        problems.append(f"{coarse}: no coarse masks (expected png/tif/jpg/bmp files named like the images)")
    if problems:
        hint = "" if match == "coarse" else " (match=coarse refines only the images that have a coarse mask)"
        raise DataError("cannot pair images and masks by file stem" + hint + ":\n  " + "\n  ".join(problems))
    cases = []
    for s in stems:
        case = {"case_id": s, "image": str(imgs[s]), "coarse": str(crs[s])}
        if masks is not None:
            case["label"] = str(gts[s])
        cases.append(case)
    return cases


def binarise_coarse(arr: np.ndarray, source: str, threshold: float | None) -> torch.Tensor:
    """(C, H, W) file values -> (1, 1, H, W) {0, 1}: any value > 0 is foreground (binary masks, 0/1 or
    0/255), or value >= ``threshold`` (soft maps); a soft map without a threshold is an error."""
    a = np.asarray(arr)[0]
    if threshold is None:
        levels = np.unique(a)
        if len(levels) > 2:
            raise DataError(f"{source}: {len(levels)} gray levels, expected a binary mask (two values); "
                            "for a soft map give coarse_threshold=VALUE (e.g. 128 for 8-bit)")
        fg = a > 0
    else:
        fg = a >= float(threshold)
    return torch.as_tensor(fg, dtype=torch.float32)[None, None]


def _check_files(cases: list[dict], channels: int) -> None:
    from PIL import Image

    problems = []
    for c in cases:
        try:
            n = image_channels(c["image"])
        except DataError as err:
            problems.append(str(err))
            continue
        if n != channels:
            problems.append(f"{c['image']}: {n} channel(s), the model was trained on {channels}")
        sizes = {}
        for key in ("image", "coarse", "label"):
            if key in c:
                with Image.open(c[key]) as im:
                    sizes[key] = im.size
        if len(set(sizes.values())) > 1:
            problems.append(f"{c['case_id']}: sizes differ (expected the same W x H, found "
                            + ", ".join(f"{k} {w}x{h}" for k, (w, h) in sizes.items()) + ")")
    DataError.raise_if(problems, "images and masks do not fit the model or each other")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device: expected auto | cpu | cuda | cuda:N, got {name!r}") from err


def format_comparison(results: dict[str, dict[str, float]], num_cases: int) -> str:
    """Table of coarse vs refined (x100, as the paper reports) and a verdict line per metric."""
    rows = [r for r in ("coarse", "global", "refined") if r in results]
    header = f"{'':<10}" + "".join(f"{h:>14}" for _, h in COLUMNS)
    lines = [f"coarse vs refined masks ({num_cases} images)", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r:<10}" + "".join(f"{100 * results[r][k]:>14.2f}" for k, _ in COLUMNS))
    delta = {k: results["refined"][k] - results["coarse"][k] for k, _ in COLUMNS}
    lines.append(f"{'change':<10}" + "".join(f"{100 * delta[k]:>+14.2f}" for k, _ in COLUMNS))
    verdict = [f"{h} {'improved' if delta[k] > 0 else 'not improved'} ({100 * delta[k]:+.2f})"
               for k, h in COLUMNS if k in ("iou_pooled", "mba")]
    lines.append("refined vs coarse: " + "; ".join(verdict))
    return "\n".join(lines)


def refine(cfg: DictConfig) -> dict[str, Any]:
    """Refine every paired image; returns {"num_cases", "out", and with masks: "coarse"/"refined" metrics}."""
    from diffseg.models.segrefiner import SegRefiner
    from diffseg.drivers.run import load_model

    images, coarse_dir = _folder(cfg.images, "images"), _folder(cfg.coarse, "coarse")
    masks = _folder(cfg.masks, "masks") if cfg.get("masks") is not None else None
    if cfg.get("out") in (None, "", "???"):
        raise ConfigError("out= is required: the folder for the refined masks")
    out = Path(str(cfg.out)).expanduser()
    cases = pair_files(images, coarse_dir, masks, str(cfg.get("match", "both")))

    refine_over = {k: cfg[k] for k in ("steps", "local") if cfg.get(k) is not None}
    overrides = OmegaConf.to_container(cfg.overrides, resolve=True) if cfg.get("overrides") else {}
    overrides = OmegaConf.merge({"model": {"refine": refine_over, "save_predictions": False,
                                           "output_dir": str(out)}}, overrides)
    model, run_cfg = load_model(cfg.ckpt, overrides)
    if not isinstance(model, SegRefiner):
        raise ConfigError(f"ckpt={cfg.ckpt}: a {type(model).__name__} checkpoint; refine.py needs a SegRefiner one "
                          "(experiment=segrefiner_*)")
    _check_files(cases, model.image_channels)
    device = _device(str(cfg.get("device", "auto")))
    model = model.to(device).eval()

    pipeline = mt.Compose(deterministic_transforms(
        spatial_dims=2, label_map=binary_label_map(), patch_size=(1, 1), has_label=masks is not None))
    load_coarse = CheckedLoadImaged(keys="coarse", reader=PILReader(reverse_indexing=False), image_only=True,
                                    ensure_channel_first=True)
    threshold = cfg.get("coarse_threshold")
    records: dict[str, list[dict]] = {}
    patches: list[int] = []  # local patches per image (global-then-local images only)
    regions = {"foreground": [1]}
    for i, case in enumerate(cases):
        data = pipeline({k: v for k, v in case.items() if k != "coarse"})
        coarse = binarise_coarse(load_coarse({"coarse": case["coarse"]})["coarse"], case["coarse"], threshold)
        image = data["image"].as_tensor()[None].to(device)
        outputs = model.predict_case(image, case["case_id"], {"coarse": coarse.to(device)})
        if model.last_local_patches is not None:
            patches.append(model.last_local_patches)
        pred = outputs[FINAL][0].argmax(0).cpu().numpy().astype(np.uint8)
        save_prediction_file(out, case["case_id"], pred, 2)
        if masks is not None:
            label = data["label"].as_tensor()[0].long()
            for name in ("coarse", "global", FINAL):
                if name in outputs:
                    rec = score_case(outputs[name][0].float().cpu(), label, regions, (1.0, 1.0), surface=False)
                    records.setdefault("refined" if name == FINAL else name, []).append(rec)
        if (i + 1) % -(-len(cases) // 10) == 0 or i + 1 == len(cases):
            log.info("refined %d/%d images", i + 1, len(cases))
    result: dict[str, Any] = {"num_cases": len(cases), "out": str(out), "ckpt": str(cfg.ckpt),
                              "refine": model.refine_settings.as_dict()}
    if patches:
        result["local_patches"] = {"per_image": patches, "mean": float(np.mean(patches))}
    print(f"wrote {len(cases)} refined masks to {out}/ (steps={model.refine_settings.steps or model.diffusion.num_steps}, "
          f"local={model.refine_settings.local})")
    if patches:
        print(f"global-then-local on {len(patches)} image(s): {np.mean(patches):.1f} local patches per image "
              f"(min {min(patches)}, max {max(patches)})")
    if masks is not None:
        metrics = {name: aggregate(recs) for name, recs in records.items()}
        result.update(metrics)
        result["change"] = {k: metrics["refined"][k] - metrics["coarse"][k] for k, _ in COLUMNS}
        result["improved"] = {k: bool(result["change"][k] > 0) for k, _ in COLUMNS}
        write_json(out / "refine_metrics.json", result)
        print(format_comparison(metrics, len(cases)))
    return result
