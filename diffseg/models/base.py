"""Shared LightningModule: evaluation, the predictor hook, logging, plots, saving, optimisation.

Models differ only in what differs: ``training_loss`` and ``predict_window`` (how a window is
turned into class probabilities). Everything else lives here once:
- validation/test run whole images/volumes through ``inference.window.sliding_window_predict``,
  with a generator seeded per case (diffusion models are reproducible);
- every named output of the predictor is scored (``score_case``); the ``final`` output gives the
  reported metrics, others are logged under their prefix (``step/3/dice``, ``samples/4/iou``, ...).
  Validation predicts and stitches the final output only (``curves`` is False: model selection needs
  nothing else, and a full-volume prediction then costs its sampling steps); test and evaluate sweeps
  compute the per-step / per-sample-count curves too;
- per-case records are gathered over DDP ranks and de-duplicated by case id, so a ``ddp`` run
  reports exactly what a single-process run reports.
"""
from __future__ import annotations

import math
import time
import warnings
import zlib
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import lightning as L
import numpy as np
import torch
import torch.distributed as dist

from diffseg.inference.case_writer import CaseWriter
from diffseg.inference.samples import SPREAD_MAPS
from diffseg.inference.window import sliding_window_predict
from diffseg.metrics.scoring import aggregate, score_case
from diffseg.models.lr_schedules import warmup_cosine
from diffseg.utils.errors import ConfigError, TrainingDiverged
from diffseg.utils.outputs import save_panel_grid

FINAL = "final"


def from_config(value: Any) -> Any:
    """A Hydra config (a mapping with ``_target_``: how networks, optimisers and schedules are stored in
    a model's hyper-parameters) instantiated; an object (a network built by the caller) as it is."""
    if isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate

        return instantiate(value, _convert_="all")
    return value

# metrics are gathered over ranks by hand (each case once), so Lightning's sync_dist advice does not apply
warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")


def plain_tensor(x):
    """A MONAI MetaTensor as a plain tensor (no metadata copied by every op; torch.compile can trace it);
    anything else as it is."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class SegmentationModule(L.LightningModule):
    """Base class. Subclasses implement ``training_loss(batch)`` and ``predict_window(image)``.

    The init arguments are the model's hyper-parameters (``self.hparams``, saved in every checkpoint):
    ``net``, ``optimizer`` and ``lr_schedule`` are Hydra configs (``{_target_: ...}``) built here, so
    ``Model.load_from_checkpoint(path)`` rebuilds the trained model from the checkpoint alone.
    ``run_config`` is the resolved run config (data, trainer, ...) stored with them, from which
    scripts/evaluate.py rebuilds the data (``diffseg.utils.checkpoint.read_checkpoint``). Subclasses
    must not rebind their argument names before ``super().__init__`` (Lightning reads them from the
    frames), e.g. ``network = from_config(net)``.
    """

    #: prefix under which each named predictor output is logged; FINAL is the reported one
    output_prefixes: Mapping[str, str] = {FINAL: ""}
    #: whether ``predict_window`` returns the outputs besides FINAL (curves over steps / sample counts):
    #: False during validation (set by ``_evaluate``), True at test and for direct calls
    curves: bool = True
    #: whether sampling models also return the uncertainty maps over samples ("std", "entropy"): False
    #: during validation, True at test, in scripts/predict.py and for direct calls
    spread: bool = True

    def __init__(
        self,
        net: torch.nn.Module,
        num_classes: int,
        spatial_dims: int,
        regions: Mapping[str, Sequence[int]],
        optimizer: Callable[..., torch.optim.Optimizer],
        roi_size: Sequence[int],
        lr_schedule: Callable[..., float] | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        window_progress: bool = False,
        surface_metrics: str = "final",
        nsd_tolerance: float = 1.0,
        num_plot_cases: int = 4,
        save_predictions: bool = False,
        output_dir: str | None = None,
        seed: int = 0,
        compile: bool = False,
        monitor: str = "dice",
        run_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        # hparams = the init arguments of this class and its subclass (the model config); not sent to the
        # loggers, which receive the whole run config from diffseg.drivers.run.fit
        self.save_hyperparameters(logger=False)
        net, optimizer, lr_schedule = from_config(net), from_config(optimizer), from_config(lr_schedule)
        if surface_metrics not in ("final", "all", "none"):
            raise ValueError(f"model.surface_metrics: expected final | all | none, got {surface_metrics!r}")
        self.net = torch.compile(net) if compile else net
        self.num_classes = int(num_classes)
        self.spatial_dims = int(spatial_dims)
        self.regions = {str(k): [int(i) for i in v] for k, v in dict(regions).items()}
        self.optimizer_factory = optimizer
        self.roi_size = tuple(int(r) for r in roi_size)
        # step -> learning-rate factor, given total_steps (diffseg.models.lr_schedules; config group model/lr_schedule)
        self.lr_schedule = lr_schedule if lr_schedule is not None else partial(warmup_cosine, warmup_steps=100)
        self.overlap, self.sw_batch_size, self.window_progress = overlap, int(sw_batch_size), window_progress
        self.surface_metrics, self.nsd_tolerance = surface_metrics, float(nsd_tolerance)
        self.num_plot_cases = int(num_plot_cases)
        self.save_predictions = bool(save_predictions)
        self.output_dir = output_dir
        self.seed = int(seed)
        self.monitor = monitor
        self._records: dict[str, list[dict]] = {"val": [], "test": []}
        self._panels: dict[str, list[tuple]] = {"val": [], "test": []}
        self._seconds: dict[str, list[tuple[str, float]]] = {"val": [], "test": []}
        self.test_seconds_per_case: float | None = None
        self._case_generator: torch.Generator | None = None
        self._case_seed, self._sample_generators = self.seed, []
        self.test_results: dict[str, float] = {}
        self.test_records: list[dict] = []

    # ------------------------------------------------------------------ subclass API
    def training_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def predict_window(self, image: torch.Tensor, batch: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Class probabilities (B, C, *S) for a window, as ``{FINAL: probs, other outputs...}``."""
        raise NotImplementedError

    @property
    def evaluated_outputs(self) -> Mapping[str, str]:
        """The outputs ``predict_window`` returns now: all of ``output_prefixes``, or FINAL alone (validation)."""
        return self.output_prefixes if self.curves else {FINAL: ""}

    def case_generator(self) -> torch.Generator:
        """The generator of the case being predicted (seeded from the case id)."""
        if self._case_generator is None:
            self._case_generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._case_generator

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx):
        # plain tensors: training needs no metadata, every op on a MONAI MetaTensor copies it, and
        # torch.compile (model.compile=true) cannot trace MetaTensor's dispatch
        batch = {k: plain_tensor(v) for k, v in batch.items()}
        loss, logs = self.training_loss(batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"the training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch}). "
                "Lower model.optimizer.lr, check the data intensities (scripts/check_data.py), or use "
                "trainer.precision=32; the last good checkpoint is checkpoints/last.ckpt."
            )
        bs = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, batch_size=bs)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        # the optimiser steps this fit will run: max_steps, or max_epochs x batches per epoch / accumulation
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ConfigError("the learning-rate schedule needs the length of the run: set trainer.max_steps "
                              "or trainer.max_epochs")
        schedule = partial(self.lr_schedule, total_steps=int(total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ prediction
    def seed_case(self, case_id: str, device) -> torch.Generator:
        """Seed ``case_generator()`` from the case id (a model overriding predict_case calls this first)."""
        seed = (self.seed * 1_000_003 + zlib.crc32(case_id.encode())) % (2**63)
        self._case_seed, self._sample_generators = seed, []
        self._case_generator = torch.Generator(device=device).manual_seed(seed)
        return self._case_generator

    def sample_generators(self, num_samples: int, device) -> list[torch.Generator]:
        """One generator per sample of the current case, seeded from (case seed, sample index) and
        kept across the case's windows: sample s is the same whatever ``num_samples`` is, so the
        running mean of the first k of N samples equals a k-sample run."""
        gens = self._sample_generators
        while len(gens) < num_samples:
            seed = (self._case_seed * 1_000_033 + 7919 * (len(gens) + 1)) % (2**63)
            gens.append(torch.Generator(device=device).manual_seed(seed))
        return gens[:num_samples]

    @torch.no_grad()
    def predict_case(self, image: torch.Tensor, case_id: str, batch: Mapping[str, Any] | None = None):
        """Whole image/volume -> dict of stitched outputs (1, C, *S). Noise seeded per case."""
        self.seed_case(case_id, image.device)
        fn = partial(self.predict_window, batch=batch)
        image = plain_tensor(image)  # no metadata copy in every op
        return sliding_window_predict(fn, image, self.roi_size, overlap=self.overlap,
                                      sw_batch_size=self.sw_batch_size, progress=self.window_progress)

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, batch_idx, "test")

    def _spacing(self, image) -> tuple[float, ...]:
        affine = getattr(image, "affine", None)
        if affine is None:
            return (1.0,) * self.spatial_dims
        affine = torch.as_tensor(affine).reshape(-1, *affine.shape[-2:])[0].double()
        d = self.spatial_dims
        return tuple(float(v) for v in affine[:d, :d].norm(dim=0))

    def timed_predict_case(self, batch, *, curves: bool, spread: bool):
        """(case id, outputs of ``predict_case``, the names evaluated, seconds) for a batch of one whole
        image/volume, with ``curves`` and ``spread`` set for this case."""
        image = batch["image"]
        if image.shape[0] != 1:
            raise ValueError("evaluation runs one whole image/volume per batch (batch_size=1)")
        case_id = str(batch["case_id"][0])
        start = time.perf_counter()
        saved = self.curves, self.spread
        self.curves, self.spread = curves, spread
        try:
            outputs = self.predict_case(image, case_id, batch)
            evaluated = dict(self.evaluated_outputs)
        finally:
            self.curves, self.spread = saved
        if image.device.type == "cuda":
            torch.cuda.synchronize(image.device)  # once per case, for the timing (not in the sampling loop)
        return case_id, outputs, evaluated, time.perf_counter() - start

    def predict_step(self, batch, batch_idx):
        """scripts/predict.py: a new case without label, the prediction and the uncertainty maps only; the
        files are written by its PredictionWriter (diffseg.drivers.predict)."""
        case_id, outputs, _, seconds = self.timed_predict_case(batch, curves=False, spread=True)
        return {"case_id": case_id, "outputs": outputs, "seconds": seconds}

    def _evaluate(self, batch, batch_idx: int, stage: str) -> None:
        image, label = batch["image"], batch["label"]
        test = stage == "test"
        case_id, outputs, evaluated, seconds = self.timed_predict_case(batch, curves=test, spread=test)
        self._seconds[stage].append((case_id, seconds))
        spacing = self._spacing(image)
        target = label[0, 0].long()
        for name in evaluated:
            if name not in outputs:
                continue
            surface = self.surface_metrics == "all" or (self.surface_metrics == "final" and name == FINAL)
            rec = score_case(outputs[name][0].float(), target, self.regions, spacing, surface=surface,
                             nsd_tolerance=self.nsd_tolerance)
            rec.update(case_id=case_id, _output=name)
            self._records[stage].append(rec)
        global_index = batch_idx * self.trainer.world_size + self.trainer.global_rank
        if global_index < self.num_plot_cases:
            self._panels[stage].append((global_index, case_id, *self.panel(image, target, outputs)))
        if stage == "test" and self.save_predictions and self.output_dir:
            self.save_case_outputs(case_id, outputs, image)

    def panel(self, image, target, outputs) -> tuple:
        """Image channel 0, ground truth (None for new data), prediction and the uncertainty maps of sampling
        models ({"std": ..., "entropy": ...}) as (rows, columns) to draw. 2D: as loaded, which is the file's
        orientation (PNG rows are the first axis). 3D: the axial slice (along the last axis) with the most
        foreground (of the ground truth, else of the prediction), drawn with the second axis down the rows."""
        img = image[0, 0].float().cpu().numpy()
        pred = outputs[FINAL][0].argmax(0).cpu().numpy().astype(np.uint8)
        gt = None if target is None else target.cpu().numpy().astype(np.uint8)
        maps = {k: outputs[k][0, 0].float().cpu().numpy() for k in SPREAD_MAPS if k in outputs}
        if self.spatial_dims == 3:
            ref = gt if gt is not None and gt.any() else pred
            z = int(np.argmax((ref > 0).sum(axis=(0, 1)))) if ref.any() else ref.shape[-1] // 2
            img, pred = img[..., z].T, pred[..., z].T
            gt = None if gt is None else gt[..., z].T
            maps = {k: v[..., z].T for k, v in maps.items()}
        return img, gt, pred, maps

    def case_writer(self, directory: str | Path) -> CaseWriter:
        """The writer of predicted cases in the input's grid and label values: the inverse of the test
        pipeline and the label map come from the trainer's datamodule (without one, the outputs are
        written in the grid they come in, with class indices as values)."""
        from diffseg.data.labels import LabelMap, binary_label_map

        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        info = getattr(dm, "info", None)
        if info is None:
            label_map = binary_label_map() if self.num_classes == 2 else \
                LabelMap(list(range(self.num_classes)), [f"class{i}" for i in range(self.num_classes)])
            return CaseWriter(directory, label_map, self.regions, self.spatial_dims, None)
        pipeline = getattr(dm.datasets.get("test"), "transform", None)
        return CaseWriter(directory, info.label_map, self.regions, self.spatial_dims, pipeline)

    def save_case_outputs(self, case_id: str, outputs: Mapping[str, torch.Tensor], image) -> None:
        """The predicted mask (and the uncertainty maps of sampling models) in DIR/predictions/, in the
        input's grid and label values (diffseg.inference.case_writer, as scripts/predict.py writes them).

        Each case is written by the one rank that scored it (no two ranks write one file)."""
        self.case_writer(Path(self.output_dir) / "predictions").write(case_id, outputs, image)

    def _gather(self, items: list) -> list:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, items)
            return [x for part in gathered for x in part]
        return list(items)

    def _finish(self, stage: str) -> dict[str, float]:
        records = self._gather(self._records[stage])
        panels = self._gather(self._panels[stage])
        seconds = dict(self._gather(self._seconds[stage]))  # case id -> prediction seconds
        self._records[stage], self._panels[stage], self._seconds[stage] = [], [], []
        # one record per (case, output): de-duplicate in case a sampler repeated a case
        records = list({(r["case_id"], r["_output"]): r for r in records}.values())
        results: dict[str, float] = {}
        for name, prefix in self.output_prefixes.items():
            agg = aggregate(r for r in records if r["_output"] == name)
            results.update({f"{prefix}{k}": v for k, v in agg.items()})
        if results:
            logged = {f"{stage}/{k}": v for k, v in results.items()}
            self.log_dict(logged, sync_dist=False, rank_zero_only=False)
        if self.trainer.is_global_zero and panels and self.output_dir:
            panels.sort(key=lambda p: p[0])
            path = Path(self.output_dir) / "plots" / f"{stage}.png"  # latest validation / the test panels
            save_panel_grid(path, panels)
            self._log_image(f"{stage}/panels", path)
        if stage == "test":
            self.test_results = {f"test/{k}": v for k, v in results.items()}
            self.test_records = records
            self.test_seconds_per_case = float(np.mean(list(seconds.values()))) if seconds else None
        return results

    def _log_image(self, key: str, path: Path) -> None:
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                try:
                    logger.log_image(key=key, images=[str(path)], step=self.global_step)
                except Exception:  # noqa: BLE001 - a logger without image support must not stop a run
                    pass

    def on_validation_epoch_end(self):
        self._finish("val")

    def on_test_epoch_end(self):
        self._finish("test")
