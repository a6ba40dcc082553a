"""Framework pieces: LR schedule, atomic checkpoints, splits, DDP sharding, data config checks, aggregation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffseg.data.datamodule import SegDataModule, load_or_make_splits
from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case
from diffseg.data.formats.brats import BratsSource
from diffseg.data.formats.folder2d import Folder2DSource
from diffseg.data.synthetic import write_brats_synthetic, write_shapes2d
from diffseg.metrics.scoring import aggregate, score_case
from diffseg.models.lr_schedules import warmup_cosine
from diffseg.utils.checkpoint import AtomicCheckpointIO


def test_warmup_cosine_closed_form():
    assert warmup_cosine(0, warmup_steps=10, total_steps=110) == pytest.approx(0.1)
    assert warmup_cosine(9, warmup_steps=10, total_steps=110) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup_steps=10, total_steps=110) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup_steps=10, total_steps=110) == pytest.approx(0.5)  # half-way through the cosine
    assert warmup_cosine(110, warmup_steps=10, total_steps=110) == pytest.approx(0.0)
    assert warmup_cosine(110, warmup_steps=10, total_steps=110, min_ratio=0.1) == pytest.approx(0.1)


def test_atomic_checkpoint_keeps_the_old_file_when_a_save_dies(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=False)["step"] == 1

    def dying_save(obj, handle):
        handle.write(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=False)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary left behind


def _cases(n):
    return [Case(f"c{i:02d}", [f"c{i}.nii.gz"], f"s{i}.nii.gz") for i in range(n)]


def test_splits_seeded_disjoint_and_from_file(tmp_path):
    a = load_or_make_splits(_cases(20), tmp_path, (0.7, 0.1, 0.2), seed=3)
    b = load_or_make_splits(_cases(20), tmp_path, (0.7, 0.1, 0.2), seed=3)
    assert a == b and [len(a[k]) for k in ("train", "val", "test")] == [14, 2, 4]
    assert not (set(a["train"]) & set(a["test"])) and sum(map(len, a.values())) == 20
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["c00"], "val": ["c01"], "test": ["c02"]}))
    assert load_or_make_splits(_cases(20), tmp_path, (0.7, 0.1, 0.2), 0)["test"] == ["c02"]
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["c00"], "val": ["c00"], "test": ["c02"]}))
    with pytest.raises(DataError, match="c00.*both"):
        load_or_make_splits(_cases(20), tmp_path, (0.7, 0.1, 0.2), 0)
    (tmp_path / "splits.json").write_text(json.dumps({"train": ["zz"], "val": [], "test": []}))
    with pytest.raises(DataError, match="zz"):
        load_or_make_splits(_cases(20), tmp_path, (0.7, 0.1, 0.2), 0)


@pytest.mark.parametrize("n,world", [(5, 2), (7, 3), (4, 4), (3, 1)])
def test_eval_loaders_score_each_case_exactly_once(n, world, tmp_path):
    """The validation/test loaders of the W ranks together visit every case exactly once: no padding
    (which would score a case twice), nothing dropped; fewer cases than ranks is a clear error."""
    from types import SimpleNamespace

    root = write_shapes2d(tmp_path / "s", num_cases=4, size=16)
    dm = SegDataModule(Folder2DSource(root), root=str(root), patch_size=(16, 16))
    dm.datasets = {"val": list(range(n)), "test": list(range(world - 1))}
    visited = []
    for rank in range(world):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, num_devices=world,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
        visited += list(dm.val_dataloader().sampler)
    assert sorted(visited) == list(range(n))
    if world > 1:
        with pytest.raises(DataError, match=f"test split has {world - 1} case.*fewer than the {world} processes"):
            dm.test_dataloader()


def test_datamodule_checks_config_against_files(tmp_path):
    root = write_brats_synthetic(tmp_path / "b", num_cases=5, shape=(32, 32, 32))
    src = BratsSource(root)
    dm = SegDataModule(src, root=str(root), patch_size=(32, 32, 32))
    assert (dm.spatial_dims, dm.in_channels, dm.num_classes) == (3, 4, 4)
    assert dm.class_names == ["wt", "tc", "et"] and dm.regions["tc"] == [1, 3]
    with pytest.raises(DataError, match="in_channels=3"):
        _ = SegDataModule(src, root=str(root), patch_size=(32, 32, 32), in_channels=3).info
    with pytest.raises(DataError, match="patch_size"):
        _ = SegDataModule(src, root=str(root), patch_size=(32, 32)).info
    with pytest.raises(DataError, match="regions"):
        _ = SegDataModule(src, root=str(root), patch_size=(32, 32, 32), regions={"x": [9]}).regions


def _seeded_shapes_datamodule(root, seed: int) -> SegDataModule:
    """seed_everything(seed), then a small shapes2d datamodule set up for fit (32-px patches, batches of 4)."""
    import lightning as L

    L.seed_everything(seed)
    dm = SegDataModule(Folder2DSource(root), root=str(root), patch_size=(32, 32), batch_size=4,
                       samples_per_epoch=8, cache="none", split_fractions=(0.5, 0.25, 0.25))
    dm.setup("fit")
    return dm


def test_training_patches_follow_the_seed(tmp_path):
    """The random crops/flips are drawn from the run's seed: the same seed gives the same patches (a run
    is reproducible), another seed other patches."""
    root = write_shapes2d(tmp_path / "s", num_cases=12, size=48)

    def first_batches(seed):
        dm = _seeded_shapes_datamodule(root, seed)
        return [b["label"].as_tensor().clone() for b in dm.train_dataloader()]

    a, b, c = first_batches(3), first_batches(3), first_batches(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_building_loaders_leaves_the_global_rng_alone(tmp_path):
    """Lightning builds the val loader at the first validation, mid-training: that must not restart torch's
    global stream (the diffusion noise and timesteps). MONAI's DataLoader re-seeds the generator it draws
    from when num_workers=0, so the loaders must not draw from the global one."""
    dm = _seeded_shapes_datamodule(write_shapes2d(tmp_path / "s", num_cases=12, size=48), 5)
    torch.rand(3)  # the run has drawn from the global stream (model init, training noise)
    state = torch.get_rng_state()
    loaders = [dm.train_dataloader(), dm.val_dataloader()]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(list(loaders[1])) == 3


def test_bad_label_value_in_pipeline_names_the_file(tmp_path):
    import nibabel as nib

    root = write_brats_synthetic(tmp_path / "b", num_cases=3, shape=(32, 32, 32))
    seg = sorted(root.glob("*/*_seg.nii.gz"))[0]
    img = nib.load(seg)
    data = np.asarray(img.dataobj).copy()
    data[1, 1, 1] = 5
    nib.save(nib.Nifti1Image(data, img.affine), seg)
    dm = SegDataModule(BratsSource(root), root=str(root), patch_size=(32, 32, 32), split_fractions=(0.34, 0.33, 0.33))
    with pytest.raises(DataError, match=seg.name):
        dm.setup("fit")
        _ = [dm.datasets[k][0] for k in dm.datasets]


def test_score_and_aggregate_closed_form():
    label = torch.zeros(8, 8, dtype=torch.long)
    label[2:6, 2:6] = 1  # 16 px
    probs = torch.zeros(2, 8, 8)
    probs[0] = 1
    probs[:, 2:6, 2:4] = torch.tensor([0.2, 0.8]).view(2, 1, 1)  # predicts 8 of the 16 px
    rec = score_case(probs, label, {"fg": [1]}, (1.0, 1.0))
    assert rec["dice"] == pytest.approx(2 * 8 / (8 + 16)) and rec["iou/fg"] == pytest.approx(0.5)
    rec2 = score_case(torch.stack([1 - (label == 1).float(), (label == 1).float()]), label, {"fg": [1]}, (1, 1))
    agg = aggregate([rec, rec2])
    assert agg["dice"] == pytest.approx((2 / 3 + 1) / 2)
    assert agg["iou_pooled"] == pytest.approx((8 + 16) / (16 + 16))  # sum I / sum U
    assert agg["num_cases"] == 2 and math.isfinite(agg["ece"]) and "mba" in agg and "fbound" in agg and "wcov" in agg
