"""How long a run is and what it keeps: learning-rate schedules over the real number of steps, validation
cadence, the best checkpoint's direction, and the metric handed to Hydra sweepers."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset

from diffseg.drivers.cli import metric_mode
from diffseg.drivers.run import build_callbacks, check_optimized_metric
from diffseg.models.baseline import UNetSegmenter
from diffseg.models.lr_schedules import constant, step_decay, warmup_cosine
from diffseg.nets.unet import TimeUNet
from diffseg.utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def compose_fit(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
        given = any(o.startswith("paths.output_dir=") for o in overrides)
        return compose("fit", overrides=[*overrides, *([] if given else ["paths.output_dir=/tmp/unused"])])


def test_step_decay_halves_at_the_reference_milestones():
    f = partial(step_decay, total_steps=120_000)  # SegRefiner: halved at 80k and 100k of 120k
    assert [f(s) for s in (0, 79_999, 80_000, 99_999, 100_000, 119_999)] == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert step_decay(266, total_steps=400) == 1 and step_decay(267, total_steps=400) == 0.5  # tiny: 2/3 of 400
    with pytest.raises(ConfigError, match="milestones"):
        step_decay(0, total_steps=10, milestones=[80_000, 100_000])


def test_constant_and_warmup():
    assert [constant(s, total_steps=10, warmup_steps=4) for s in range(6)] == [0.25, 0.5, 0.75, 1, 1, 1]
    assert warmup_cosine(3, total_steps=10, warmup_steps=4) == 1.0


class _LrRecorder(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _tiny_segmenter(schedule) -> UNetSegmenter:
    net = TimeUNet(2, 1, 2, channels=[4, 8], time_embedding=None)
    return UNetSegmenter(net, num_classes=2, spatial_dims=2, regions={"fg": [1]}, roi_size=(8, 8),
                         optimizer=partial(torch.optim.SGD, lr=1.0), lr_schedule=schedule)


def test_schedule_spans_max_epochs_when_max_steps_is_unset(tmp_path):
    """trainer.max_epochs=3 with max_steps=-1 and 5 batches per epoch: the cosine spans 15 steps (before,
    total_steps was max_steps = -1 and the learning rate was 0 right after warm-up)."""
    batches = [{"image": torch.randn(1, 1, 8, 8), "label": torch.randint(0, 2, (1, 1, 8, 8))} for _ in range(5)]
    model = _tiny_segmenter(partial(warmup_cosine, warmup_steps=1))
    recorder = _LrRecorder()
    trainer = L.Trainer(max_epochs=3, max_steps=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[recorder], default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    expected = [warmup_cosine(s, total_steps=15, warmup_steps=1) for s in range(15)]
    assert recorder.lrs == pytest.approx(expected)
    assert recorder.lrs[7] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(6 / 14 * torch.pi)).item()))


class _ScoredModel(BoringModel):
    """Logs a chosen val/<metric> sequence, one value per validation."""

    def __init__(self, metric: str, values):
        super().__init__()
        self.metric, self.values, self.calls = metric, list(values), 0

    def validation_step(self, batch, batch_idx):
        return None

    def on_validation_epoch_end(self):
        self.log(f"val/{self.metric}", self.values[self.calls])
        self.calls += 1


@pytest.mark.parametrize("monitor, values, best", [("hd95", [5.0, 2.0, 7.0], 2.0), ("ece", [0.3, 0.1, 0.2], 0.1),
                                                   ("dice", [0.5, 0.9, 0.7], 0.9)])
def test_best_checkpoint_keeps_the_lowest_distance_and_the_highest_overlap(tmp_path, monitor, values, best):
    """model.monitor=hd95 must keep the LOWEST HD95 (the checkpoint callback was built with mode=max)."""
    cfg = compose_fit("experiment=unet_folder2d", "data=shapes2d", f"model.monitor={monitor}", "logger=none",
                      f"paths.output_dir={tmp_path}")
    callbacks = build_callbacks(cfg, tmp_path, loggers=[])
    model = _ScoredModel(monitor, values)
    trainer = L.Trainer(max_steps=6, val_check_interval=2, check_val_every_n_epoch=None, accelerator="cpu",
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, num_sanity_val_steps=0, callbacks=callbacks,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(RandomDataset(32, 64), batch_size=2))
    chosen = next(c for c in callbacks if getattr(c, "monitor", None))
    assert chosen.best_model_score.item() == pytest.approx(best)
    ckpt = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 * (values.index(best) + 1)


def test_metric_mode_of_each_reported_metric():
    assert [metric_mode(m) for m in ("hd95", "hd95/wt", "samples/3/ece", "loss", "train/bce_loss")] == ["min"] * 5
    assert [metric_mode(m) for m in ("dice", "dice/et", "iou", "nsd", "mba", "step/2/dice")] == ["max"] * 6


def test_validation_cadence_is_in_optimiser_steps():
    for path in sorted((REPO / "experiments" / "experiment").glob("*.yaml")):  # every experiment, paper scale
        paper = compose_fit(f"experiment={path.stem}")
        assert paper.trainer.val_check_interval == 1000, path.stem
        assert paper.trainer.check_val_every_n_epoch is None, path.stem
    tiny = compose_fit("experiment=imgx_brats", "data=brats_synthetic", "scale=tiny")
    assert tiny.trainer.val_check_interval == 16 and tiny.trainer.check_val_every_n_epoch is None


def test_sweepers_get_a_validation_metric_never_a_test_one():
    assert compose_fit("experiment=unet_folder2d", "data=shapes2d").optimized_metric == "val/dice"
    check_optimized_metric("val/dice/wt")
    with pytest.raises(ConfigError, match="optimized_metric=test/dice"):
        check_optimized_metric("test/dice")
