"""Data at scale: the disk cache keeps the data layer's memory flat in the number of cases, ``data.cache``
(memory | disk | none) and ``data.cache_rate`` do what they say, and loaders get workers on GPU.

Oracles: the memory cache measured the same way (it must grow by about the cases it holds), the
in-memory pipeline's output (the disk cache must give the same tensors and affine), MONAI's own
CacheDataset bookkeeping (how many cases it holds), file modification times (a cache hit rewrites nothing).
"""
from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset

from diffseg.data.datamodule import SegDataModule
from diffseg.data.errors import DataError
from diffseg.data.formats.brats import BratsSource
from diffseg.data.synthetic import write_brats_synthetic
from diffseg.utils.benchmark import in_fresh_process, serve_data_layer

SHAPE = (64, 64, 64)
#: one preprocessed case in memory: 4 float32 modalities + an int64 label
CASE_MB = (4 * 4 + 8) * SHAPE[0] * SHAPE[1] * SHAPE[2] / 2**20


@pytest.fixture(scope="module")
def brats16(tmp_path_factory) -> Path:
    return write_brats_synthetic(tmp_path_factory.mktemp("scale") / "b16", num_cases=16, shape=SHAPE)


def _splits_file(root: Path, n: int, directory: Path) -> tuple[str, int]:
    """The first n cases: n - 4 (or n/2) train, the rest split between val and test."""
    ids = sorted(p.name for p in root.iterdir() if p.is_dir())[:n]
    n_eval = 2 if n <= 4 else 4
    splits = {"train": ids[:n - n_eval], "val": ids[n - n_eval:n - n_eval // 2], "test": ids[n - n_eval // 2:]}
    path = directory / f"splits{n}.json"
    path.write_text(json.dumps(splits))
    return str(path), len(splits["train"])


def test_data_layer_memory_does_not_grow_with_the_number_of_cases(brats16, tmp_path):
    """Peak resident memory of the data layer (fit + test datasets, one epoch over every training case, the
    validation and test volumes), each figure in a fresh process: 4 vs 16 cases of the same size. With the
    disk cache the difference stays below one case; the memory cache, measured the same way on the 16 cases,
    holds about 14 cases more than the disk cache (so the measurement sees memory that the data layer keeps)."""
    peaks = {}
    for cache, n in (("disk", 4), ("disk", 16), ("memory", 16)):
        splits, n_train = _splits_file(brats16, n, tmp_path)
        served, peak = in_fresh_process(serve_data_layer, str(brats16), splits, cache, str(tmp_path / "cache"),
                                        (32, 32, 32), n_train)
        assert served == n  # every training case once, every validation and test volume
        peaks[cache, n] = peak
    print({f"{c}/{n}": round(v, 1) for (c, n), v in peaks.items()}, f"one case {CASE_MB:.1f} MB")
    assert peaks["disk", 16] - peaks["disk", 4] < CASE_MB, peaks
    assert peaks["memory", 16] - peaks["disk", 16] > 0.75 * 14 * CASE_MB, peaks


def _datamodule(root, **kwargs) -> SegDataModule:
    kwargs.setdefault("split_fractions", (0.34, 0.33, 0.33))
    return SegDataModule(BratsSource(root), root=str(root), patch_size=(32, 32, 32), **kwargs)


@pytest.fixture(scope="module")
def brats3(tmp_path_factory) -> Path:
    return write_brats_synthetic(tmp_path_factory.mktemp("scale") / "b3", num_cases=3, shape=(32, 32, 40))


def test_cache_modes_build_what_they_say_and_serve_the_same_case(brats3, tmp_path):
    kinds = {"memory": CacheDataset, "disk": PersistentDataset, "none": Dataset}
    items = {}
    for cache, kind in kinds.items():
        dm = _datamodule(brats3, cache=cache, cache_dir=str(tmp_path / "c"))
        dm.setup("test")
        ds = dm.datasets["test"]
        assert type(ds) is kind, cache
        items[cache] = ds[0]
    ref = items["memory"]
    for cache in ("disk", "none"):
        for key in ("image", "label"):
            assert torch.equal(items[cache][key].as_tensor(), ref[key].as_tensor()), (cache, key)
            assert items[cache][key].dtype == ref[key].dtype
        # the affine (the spacing of the surface metrics, the saved predictions' geometry) survives the cache
        torch.testing.assert_close(items[cache]["image"].affine, ref["image"].affine)


def test_disk_cache_is_reused_and_keyed_by_the_preprocessing(brats3, tmp_path):
    def cached(**kwargs):
        dm = _datamodule(brats3, cache="disk", cache_dir=str(tmp_path / "c"), **kwargs)
        dm.setup("test")
        _ = dm.datasets["test"][0]
        return dm.datasets["test"].cache_dir

    first = cached()
    files = {p: p.stat().st_mtime_ns for p in first.glob("*.pt")}
    assert len(files) == 1 and first.parent == tmp_path / "c" and first.name.startswith(brats3.name)
    assert cached() == first and {p: p.stat().st_mtime_ns for p in first.glob("*.pt")} == files  # a hit
    # another preprocessing setting, another pad size: other folders
    assert cached(target_spacing=(2.0, 2.0, 2.0)) != first
    dm = SegDataModule(BratsSource(brats3), root=str(brats3), patch_size=(48, 48, 48), cache="disk",
                       cache_dir=str(tmp_path / "c"), split_fractions=(0.34, 0.33, 0.33))
    dm.setup("test")
    assert dm.datasets["test"].cache_dir != first
    # another label map (regions -> labels target) changes the encoding transform: another folder
    dm = SegDataModule(BratsSource(brats3, target="labels"), root=str(brats3), patch_size=(32, 32, 32),
                       cache="disk", cache_dir=str(tmp_path / "c"), split_fractions=(0.34, 0.33, 0.33))
    dm.setup("test")
    assert dm.datasets["test"].cache_dir != first
    # a rewritten input file is preprocessed again (the item key holds each file's size and mtime)
    case = _datamodule(brats3).case_splits()["test"][0].id
    flair = next((brats3 / case).glob("*_flair.nii.gz"))
    os.utime(flair, ns=(flair.stat().st_atime_ns, flair.stat().st_mtime_ns + 10**9))
    assert cached() == first and len(list(first.glob("*.pt"))) == 2


def test_cache_rate_holds_that_fraction_in_memory(brats3, tmp_path):
    root = write_brats_synthetic(tmp_path / "b8", num_cases=8, shape=(32, 32, 32))
    dm = _datamodule(root, cache="memory", cache_rate=0.5, split_fractions=(0.5, 0.25, 0.25))
    dm.setup("fit")
    train = dm.datasets["train"].data.dataset  # Dataset(RepeatDataset(CacheDataset)) of the 4 training cases
    assert isinstance(train, CacheDataset) and train.cache_num == 2
    assert sum(item is not None for item in train._cache) == 2
    assert train[3]["image"].shape[1:] == (32, 32, 32)  # an uncached case is preprocessed when read


@pytest.mark.parametrize("kwargs, match", [
    ({"cache": "ram"}, "data.cache: expected memory | disk | none"),
    ({"cache": "disk", "cache_rate": 0.5}, "data.cache_rate=0.5 applies to data.cache=memory"),
    ({"cache_rate": 0.0}, "data.cache_rate: expected a fraction"),
    ({"num_workers": "many"}, "data.num_workers: expected auto"),
    ({"pin_memory": "yes"}, "data.pin_memory: expected auto"),
])
def test_bad_cache_and_loader_options_name_the_key(brats3, kwargs, match):
    with pytest.raises(DataError, match=match):
        _datamodule(brats3, **kwargs)


def _fake_trainer(device: str, devices: int = 1):
    return types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device(device)),
                                 num_devices=devices, global_rank=0, world_size=devices)


def test_auto_loader_workers_and_pinned_memory_on_gpu_only(brats3, monkeypatch):
    dm = _datamodule(brats3, cache="none", num_workers="auto", pin_memory="auto")
    dm.setup("fit")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    dm.trainer = _fake_trainer("cuda", devices=2)  # 16 CPUs, 2 ranks on this node: 7 workers each
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (7, True, True)
    dm.trainer.world_size = 1  # (the fixture's split has one val case: one rank evaluates it)
    val = dm.val_dataloader()
    assert (val.num_workers, val.pin_memory) == (7, True)
    dm.trainer = _fake_trainer("cpu")
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (0, False, False)
    dm.num_workers, dm.pin_memory = 3, False  # explicit values win
    dm.trainer = _fake_trainer("cuda")
    assert dm.loader_settings() == dict(num_workers=3, pin_memory=False, persistent_workers=True)


def test_3d_data_configs_default_to_the_disk_cache():
    from hydra import compose, initialize_config_dir

    from diffseg.utils.benchmark import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        for data in ("brats", "msd", "brats_synthetic", "shapes2d"):
            cfg = compose("fit", [f"data={data}", "data.root=/r", "paths.cache_dir=/c", "paths.output_dir=/o"])
            assert cfg.data.cache == ("memory" if data == "shapes2d" else "disk"), data
            assert cfg.data.cache_dir == "/c/preprocessed" and cfg.data.num_workers == "auto"
