"""Segment new data with any trained model (scripts/predict.py):

    python scripts/predict.py ckpt=RUN_DIR_OR_CKPT input=FOLDER out=DIR [coarse=DIR_OR_RUN] [trainer=gpu|ddp]

1. The run's config (stored in the checkpoint) gives the model, the data source (BraTS, MSD, folder2d)
   and the deterministic pipeline it was trained with (orientation, ``data.target_spacing``,
   ``data.resize``, normalisation, padding).
2. ``input`` is listed in that source's layout and every file is read before any case is predicted
   (diffseg.data.new_cases): a missing modality, an unreadable file, a folder in the wrong layout or a
   channel count that does not fit the checkpoint stops with one message naming the file.
3. Each case runs through the model's own predictor (sliding window, samples, steps) in Lightning's
   ``trainer.predict``: a progress bar over cases (``model.window_progress=true`` adds one over
   windows), and with ``trainer=ddp`` the cases are sharded over the ranks without padding, each case
   predicted and written by one rank.
4. ``PredictionWriter`` writes OUT/<case>.nii.gz (or .png) in the input's grid and label values, and
   for sampling models OUT/<case>_std / <case>_entropy (diffseg.inference.case_writer); then
   OUT/summary.csv (case, file, seconds, ...) and OUT/plots/predict.png (also to W&B with logger=wandb).

SegRefiner refines coarse masks: ``coarse=DIR`` (masks named like the images), or ``coarse=RUN_DIR_OR_CKPT``
of another 2D model, which first predicts OUT/coarse/ (a cascade).
"""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from monai import transforms as mt
from monai.data import Dataset, list_data_collate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, Source
from diffseg.data.formats.msd import MSDSource
from diffseg.data.labels import LabelMap
from diffseg.data.new_cases import check_new_cases, list_new_cases
from diffseg.data.transforms import deterministic_transforms
from diffseg.inference.case_writer import CaseWriter
from diffseg.utils.checkpoint import resolve_checkpoint
from diffseg.utils.errors import ConfigError
from diffseg.utils.outputs import save_panel_grid

log = logging.getLogger("diffseg")
SUMMARY_COLUMNS = ("case", "file", "seconds", "write_seconds", "std", "entropy")


def _required(cfg: DictConfig, key: str, what: str) -> str:
    value = cfg.get(key)
    if value in (None, "", "???") or OmegaConf.is_missing(cfg, key):
        raise ConfigError(f"{key}= is required: {what} (python scripts/predict.py ckpt=RUN input=FOLDER out=DIR)")
    return str(value)


def run_source(run_cfg: DictConfig, folder: Path) -> Source:
    """The run's data source class and options, rooted at the new folder (no files are read)."""
    src = OmegaConf.to_container(run_cfg.data.source, resolve=True)
    src["root"] = str(folder)
    if "coarse_dir" in src:
        src["coarse_dir"] = None  # SegRefiner's coarse masks come from coarse=
    return instantiate(src)


def run_label_map(run_cfg: DictConfig, source: Source, folder: Path) -> LabelMap:
    """The label values to write: BraTS/folder2d from the run's config; MSD from the dataset.json next to
    the new images, else the training data's."""
    if not isinstance(source, MSDSource):
        label_map = source.label_map()
    else:
        candidates = [folder / "dataset.json", Path(str(run_cfg.data.root)) / "dataset.json"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise DataError(f"input={folder}: MSD label values come from dataset.json (expected "
                            f"{candidates[0]} or the training data's {candidates[1]}, found neither)")
        label_map = MSDSource(found.parent).label_map()
    if label_map.num_classes != int(run_cfg.data.num_classes):
        raise DataError(f"{getattr(source, 'json_path', source.root)}: {label_map.num_classes} classes "
                        f"{label_map.names}, the checkpoint predicts {run_cfg.data.num_classes}")
    return label_map


class NewCases(L.LightningDataModule):
    """New cases through the run's deterministic pipeline, one per batch, sharded over ranks without padding."""

    def __init__(self, cases: list[Case], pipeline: mt.Compose, num_workers: int = 0):
        super().__init__()
        records = []
        for c in cases:
            rec: dict[str, Any] = {"image": c.images if len(c.images) > 1 else c.images[0], "case_id": c.id}
            if c.coarse is not None:
                rec["coarse"] = c.coarse
            records.append(rec)
        self.dataset = Dataset(records, transform=pipeline)
        self.num_workers = num_workers

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if len(self.dataset) < world:
            raise DataError(f"{len(self.dataset)} new case(s) for {world} processes: every process needs a case "
                            "(use fewer devices)")
        # rank r takes cases r, r+W, r+2W, ...: no padding, so every case is predicted and written once
        sampler = UnrepeatedDistributedSampler(self.dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=1, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=list_data_collate)


def _gather(items: list) -> list:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]
    return list(items)


class PredictionWriter(BasePredictionWriter):
    """Writes each predicted case on the rank that predicted it; at the end rank 0 writes summary.csv and
    the panels (image, prediction, uncertainty maps) of the first ``num_plot_cases`` cases."""

    def __init__(self, writer: CaseWriter, out_dir: Path, num_plot_cases: int = 4):
        super().__init__(write_interval="batch")
        self.writer, self.out_dir, self.num_plot_cases = writer, Path(out_dir), int(num_plot_cases)
        self.rows: list[dict] = []
        self.panels: list[tuple] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        start = time.perf_counter()
        case_id, outputs = prediction["case_id"], prediction["outputs"]
        written = self.writer.write(case_id, outputs, batch["image"])
        row = {"case": case_id, "file": str(written["file"]), "seconds": round(prediction["seconds"], 4),
               "write_seconds": round(time.perf_counter() - start, 4)}
        row.update({k: str(v) for k, v in written.items() if k != "file"})
        self.rows.append(row)
        global_index = batch_idx * trainer.world_size + trainer.global_rank
        if global_index < self.num_plot_cases:
            self.panels.append((global_index, case_id, *pl_module.panel(batch["image"], None, outputs)))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows, panels = _gather(self.rows), _gather(self.panels)
        self.rows, self.panels = sorted(rows, key=lambda r: r["case"]), sorted(panels, key=lambda p: p[0])
        if not trainer.is_global_zero:
            return
        with open(self.out_dir / "summary.csv", "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=list(SUMMARY_COLUMNS), restval="")
            out.writeheader()
            out.writerows(self.rows)
        if self.panels:
            path = save_panel_grid(self.out_dir / "plots" / "predict.png", self.panels)
            pl_module._log_image("predict/panels", path)


def _cascade(cfg: DictConfig, out: Path) -> str | None:
    """``coarse=``: a folder of masks as it is; a checkpoint or run directory predicts OUT/coarse/ first."""
    coarse = cfg.get("coarse")
    if coarse in (None, ""):
        return None
    path = Path(str(coarse)).expanduser()
    ckpt = resolve_checkpoint(path)
    if not ckpt.is_file():
        return str(path)
    stage = OmegaConf.merge(cfg, {"ckpt": str(ckpt), "coarse": None, "out": str(out / "coarse"), "overrides": {}})
    log.info("cascade: predicting the coarse masks with %s into %s", ckpt, out / "coarse")
    predict(stage)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank's coarse masks are on disk before the refiner lists them
    return str(out / "coarse")


def predict(cfg: DictConfig) -> list[dict]:
    """Predict every case of ``cfg.input`` with ``cfg.ckpt`` into ``cfg.out``; returns the summary rows."""
    from diffseg.drivers.run import build_loggers, load_model
    from diffseg.models.segrefiner import SegRefiner

    ckpt = _required(cfg, "ckpt", "a run directory or checkpoint of scripts/fit.py")
    folder = Path(_required(cfg, "input", "a folder of new cases in the layout of the run's data")).expanduser()
    out = Path(_required(cfg, "out", "the folder for the predicted masks")).expanduser()
    overrides = OmegaConf.to_container(cfg.overrides, resolve=True) if cfg.get("overrides") else {}
    overrides = OmegaConf.merge({"model": {"save_predictions": False, "output_dir": str(out)}}, overrides)
    model, run_cfg = load_model(ckpt, overrides)
    if isinstance(model, SegRefiner) != (cfg.get("coarse") not in (None, "")):
        raise ConfigError(f"coarse={cfg.get('coarse')}: SegRefiner checkpoints refine coarse masks (coarse=DIR of "
                          f"masks, or coarse=RUN of another model); other models take no coarse= "
                          f"(ckpt={ckpt} is a {type(model).__name__})")
    source = run_source(run_cfg, folder)
    label_map = run_label_map(run_cfg, source, folder)
    data = run_cfg.data
    in_channels, spatial_dims = int(data.in_channels), int(data.spatial_dims)
    if isinstance(model, SegRefiner):  # check the images before the cascade's first stage runs
        check_new_cases(list_new_cases(source, folder, in_channels=in_channels), spatial_dims=spatial_dims,
                        in_channels=in_channels, ckpt=ckpt)
    coarse = _cascade(cfg, out)
    cases = list_new_cases(source, folder, in_channels=in_channels, coarse=coarse)
    check_new_cases(cases, spatial_dims=spatial_dims, in_channels=in_channels, ckpt=ckpt)
    out.mkdir(parents=True, exist_ok=True)

    pipeline = mt.Compose(deterministic_transforms(
        spatial_dims=spatial_dims, label_map=label_map, patch_size=data.patch_size, has_label=False,
        extra_label_keys=["coarse"] if coarse is not None else [], target_spacing=data.get("target_spacing"),
        resize=data.get("resize")))
    writer = PredictionWriter(CaseWriter(out, label_map, data.get("regions"), spatial_dims, pipeline), out,
                              int(cfg.get("num_plot_cases", 4)))
    loggers = build_loggers(cfg, out)
    trainer = instantiate(cfg.trainer, callbacks=[writer], logger=loggers if loggers else False,
                          default_root_dir=str(out), _convert_="all")
    torch.set_float32_matmul_precision("high")
    log.info("predicting %d case(s) of %s with %s", len(cases), folder, resolve_checkpoint(ckpt))
    trainer.predict(model, datamodule=NewCases(cases, pipeline, int(data.get("num_workers", 0))),
                    return_predictions=False)
    if trainer.is_global_zero:
        print(f"wrote {len(writer.rows)} case(s) to {out}/ (summary.csv)")
    for logger in loggers:
        if hasattr(logger, "finalize"):
            logger.finalize("success")
    return writer.rows

