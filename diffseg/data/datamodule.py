"""One LightningDataModule for 2D images and 3D volumes.

A ``Source`` (formats/) lists the cases on disk and the label map; this module splits them,
builds the MONAI pipelines, caches the deterministic part and serves:
- training: random (foreground-weighted) patches, a fixed number of samples per epoch;
- validation / test: whole images/volumes one at a time, sharded over DDP ranks WITHOUT padding,
  so that every case is scored exactly once.

Memory (``data.cache``): ``memory`` keeps the first ``cache_rate`` of each split's preprocessed cases in
every process (MONAI CacheDataset: grows with the data set, fine for small 2D sets); ``disk`` writes each
preprocessed case once under ``cache_dir``, in a folder keyed by the preprocessing (a changed transform
or setting gets a new folder), and reads it back per item (MONAI PersistentDataset: a process holds only
the items in flight, whatever the number of cases); ``none`` preprocesses every item. Loader workers:
``num_workers: auto`` and ``pin_memory: auto`` give workers and pinned memory on GPU, none on CPU.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import numpy as np
import torch
from monai import transforms as mt
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset, list_data_collate
from monai.data.utils import pickle_hashing
from torch.utils.data import DataLoader as TorchDataLoader

from diffseg.data.errors import DataError
from diffseg.data.formats.base import Case, Source
from diffseg.data.integrity import assert_dataset_ok
from diffseg.data.resumable import EpochSampler, SeededTransformDataset
from diffseg.data.transforms import deterministic_transforms, preprocessing_fingerprint, random_transforms

SPLITS = ("train", "val", "test")
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
CACHES = ("memory", "disk", "none")
MAX_AUTO_WORKERS = 8


def record_hash(record: dict) -> bytes:
    """Disk-cache key of one case: its record (files, case id) and each file's size and modification time,
    so a rewritten file is preprocessed again."""
    files = [v for k, v in sorted(record.items()) if k != "case_id"]
    files = [f for v in files for f in (v if isinstance(v, (list, tuple)) else [v])]
    stats = []
    for f in files:
        try:
            st = os.stat(f)
            stats.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:  # unreadable: the loader names the file
            stats.append((str(f), None, None))
    return pickle_hashing({"record": record, "stats": stats})


def load_or_make_splits(
    cases: Sequence[Case], root: Path, fractions: Sequence[float], seed: int, splits_file: str | None = None
) -> dict[str, list[str]]:
    """``splits_file`` (data.splits_file) or else ``ROOT/splits.json`` when present (validated), else a
    seeded split by fractions."""
    ids = [c.id for c in cases]
    path = Path(splits_file) if splits_file else Path(root) / "splits.json"
    if splits_file and not path.is_file():
        raise DataError(f"data.splits_file={splits_file}: no such file (expected JSON with train/val/test case ids)")
    if path.is_file():
        try:
            splits = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        missing_keys = [k for k in SPLITS if k not in splits]
        if missing_keys:
            raise DataError(f"{path}: expected keys {list(SPLITS)}, missing {missing_keys}")
        unknown = sorted(set().union(*(splits[k] for k in SPLITS)) - set(ids))
        if unknown:
            raise DataError(f"{path}: cases not found in the data set: {unknown[:10]}")
        seen: dict[str, str] = {}
        for k in SPLITS:
            for cid in splits[k]:
                if cid in seen:
                    raise DataError(f"{path}: case {cid!r} is in both {seen[cid]!r} and {k!r}")
                seen[cid] = k
        return {k: list(splits[k]) for k in SPLITS}
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
        raise DataError(f"data.split_fractions: expected 3 non-negative numbers summing to 1, got {list(fractions)}")
    if len(ids) < 3:
        raise DataError(f"{root}: need at least 3 cases to split into train/val/test, found {len(ids)}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, int(round(fractions[1] * len(ids))))
    n_test = max(1, int(round(fractions[2] * len(ids))))
    n_train = len(ids) - n_val - n_test
    if n_train < 1:
        raise DataError(f"{root}: {len(ids)} cases are too few for split fractions {list(fractions)}")
    shuffled = [ids[i] for i in order]
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train:n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val:]),
    }


class RepeatDataset(torch.utils.data.Dataset):
    """Presents ``length`` items cycling over a (cached) dataset: a fixed-size training epoch."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class SegDataModule(L.LightningDataModule):
    """Data for any model: exposes ``spatial_dims``, ``in_channels``, ``num_classes``, ``class_names``,
    ``regions`` (evaluation groups) and ``spacing``.

    ``spatial_dims`` / ``in_channels`` / ``num_classes`` may be given by the config; they are then
    checked against the data set (a wrong value stops with a message), otherwise they are read
    from it (``scripts/fit.py`` fills them before the model is built).
    """

    def __init__(
        self,
        source: Source,
        root: str,
        patch_size: Sequence[int],
        batch_size: int = 2,
        samples_per_epoch: int = 64,
        num_workers: int | str = 0,
        pin_memory: bool | str = "auto",
        cache: str = "memory",
        cache_rate: float = 1.0,
        cache_dir: str | None = None,
        split_fractions: Sequence[float] = (0.7, 0.1, 0.2),
        split_seed: int = 0,
        splits_file: str | None = None,
        foreground_ratio: float = 0.5,
        augment: bool = True,
        rotate_degrees: float = 0.0,
        scale_range: float = 0.0,
        color_jitter: float = 0.0,
        target_spacing: Sequence[float] | None = None,
        resize: Sequence[int] | None = None,
        synthetic: Callable[[], Any] | None = None,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        regions: dict[str, Sequence[int]] | None = None,
        train_transforms: Sequence[Callable] = (),
        eval_transforms: Sequence[Callable] = (),
    ):
        super().__init__()
        if cache not in CACHES:
            raise DataError(f"data.cache: expected {' | '.join(CACHES)}, got {cache!r}")
        if isinstance(cache_rate, bool) or not isinstance(cache_rate, (int, float)) or not 0 < cache_rate <= 1:
            raise DataError(f"data.cache_rate: expected a fraction in (0, 1], got {cache_rate!r}")
        if cache_rate != 1 and cache != "memory":
            raise DataError(f"data.cache_rate={cache_rate} applies to data.cache=memory only (got data.cache={cache})")
        if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                      or num_workers < 0):
            raise DataError(f"data.num_workers: expected auto or an integer >= 0, got {num_workers!r}")
        if pin_memory != "auto" and not isinstance(pin_memory, bool):
            raise DataError(f"data.pin_memory: expected auto, true or false, got {pin_memory!r}")
        if Path(str(source.root)) != Path(str(root)):
            raise DataError(f"data.source.root={source.root} differs from data.root={root}")
        self.root = Path(str(root))
        self.source = source
        self.synthetic = synthetic
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = int(batch_size)
        self.samples_per_epoch = int(samples_per_epoch)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.cache, self.cache_rate = cache, float(cache_rate)
        self.cache_dir = cache_dir
        self.split_fractions = tuple(split_fractions)
        self.split_seed = int(split_seed)
        self.splits_file = None if splits_file is None else str(splits_file)
        self.foreground_ratio = float(foreground_ratio)
        self.augment_kwargs = dict(
            augment=augment, rotate_degrees=rotate_degrees, scale_range=scale_range, color_jitter=color_jitter
        )
        self.target_spacing = tuple(target_spacing) if target_spacing is not None else None
        self.resize = tuple(resize) if resize is not None else None
        self._regions = {str(k): [int(i) for i in v] for k, v in regions.items()} if regions else None
        # model-specific additions, e.g. SegRefiner's coarse masks: random ones after the training
        # crop, deterministic (cached) ones for validation/test
        self.extra_train_transforms = list(train_transforms)
        self.extra_eval_transforms = list(eval_transforms)
        self._expected = dict(spatial_dims=spatial_dims, in_channels=in_channels, num_classes=num_classes)
        self._expected_names = list(class_names) if class_names is not None else None
        self._info = None
        self.splits: dict[str, list[str]] | None = None
        self.datasets: dict[str, Any] = {}
        self._resume_position: tuple[int, int] | None = None  # (epoch, batches done) of a resumed run

    # ---------------------------------------------------------------- description
    def ensure_files(self) -> None:
        """Write the synthetic data set once (locked: safe when several DDP ranks start together)."""
        if self.synthetic is None:
            return
        root = Path(self.source.root)
        with _file_lock(root.parent / f".{root.name}.lock"):
            self.synthetic()

    @property
    def info(self):
        if self._info is None:
            self.ensure_files()
            info = self.source.info()
            self._check_expected(info)
            self._info = info
        return self._info

    def _check_expected(self, info) -> None:
        actual = dict(spatial_dims=info.spatial_dims, in_channels=info.in_channels,
                      num_classes=info.label_map.num_classes)
        wrong = [f"data.{k}={v} but the data set at {self.source.root} has {actual[k]}"
                 for k, v in self._expected.items() if v is not None and int(v) != actual[k]]
        if self._expected_names is not None and list(self._expected_names) != list(self.class_names_of(info)):
            wrong.append(f"data.class_names={self._expected_names} but the data set has {self.class_names_of(info)}")
        if len(self.patch_size) != info.spatial_dims:
            wrong.append(f"data.patch_size={list(self.patch_size)} has {len(self.patch_size)} dims, "
                         f"the data set is {info.spatial_dims}D")
        if wrong:
            raise DataError("data config does not match the files:\n  " + "\n  ".join(wrong))

    def class_names_of(self, info) -> list[str]:
        return list(self.regions_of(info).keys())

    def regions_of(self, info) -> dict[str, list[int]]:
        """Evaluation groups: the label map's (e.g. WT/TC/ET) unless ``data.regions`` overrides them."""
        if self._regions is None:
            return {k: list(v) for k, v in info.label_map.regions.items()}
        n = info.label_map.num_classes
        bad = {k: v for k, v in self._regions.items() if not v or any(i < 1 or i >= n for i in v)}
        if bad:
            raise DataError(f"data.regions: class indices must be in 1..{n - 1} (0 is background), got {bad}")
        return self._regions

    spatial_dims = property(lambda self: self.info.spatial_dims)
    in_channels = property(lambda self: self.info.in_channels)
    num_classes = property(lambda self: self.info.label_map.num_classes)
    class_names = property(lambda self: self.class_names_of(self.info))
    regions = property(lambda self: self.regions_of(self.info))
    spacing = property(lambda self: self.info.spacing)

    # ---------------------------------------------------------------- integrity
    def case_splits(self) -> dict[str, list[Case]]:
        cases = {c.id: c for c in self.source.cases()}
        if self.splits is None:
            self.splits = load_or_make_splits(list(cases.values()), Path(self.source.root),
                                              self.split_fractions, self.split_seed, self.splits_file)
        return {k: [cases[i] for i in ids] for k, ids in self.splits.items()}

    def check(self, fast: bool = True) -> None:
        """nnU-Net-style integrity check of the whole data set (raises one DataError)."""
        _ = self.info
        self.case_splits()
        assert_dataset_ok(self.source, splits=self.splits, fast=fast)

    def write_splits(self, directory: str | os.PathLike) -> Path:
        self.case_splits()
        path = Path(directory) / "splits.json"
        path.write_text(json.dumps(self.splits, indent=1))
        return path

    # ---------------------------------------------------------------- pipelines
    def prepare_data(self) -> None:
        self.ensure_files()

    def _records(self, cases: Sequence[Case], with_coarse: bool) -> list[dict]:
        records = []
        for c in cases:
            rec = {"image": c.images if len(c.images) > 1 else c.images[0], "case_id": c.id}
            if c.label is not None:
                rec["label"] = c.label
            if with_coarse and c.coarse is not None:
                rec["coarse"] = c.coarse
            records.append(rec)
        return records

    def disk_cache_dir(self, transform: mt.Compose) -> Path:
        """``cache_dir`` (default ROOT/.cache) / <data folder>_<fingerprint of root and preprocessing>."""
        root = Path(self.source.root).expanduser().absolute()
        key = preprocessing_fingerprint(transform.transforms, root=str(root))
        return Path(self.cache_dir or root / ".cache").expanduser() / f"{root.name}_{key[:16]}"

    def _cached(self, records: list[dict], transform: mt.Compose):
        if self.cache == "memory":
            # one caching thread: MONAI image readers are shared by the transform and not thread-safe
            try:
                return CacheDataset(records, transform=transform, cache_rate=self.cache_rate, progress=False,
                                    num_workers=1)
            except RuntimeError as err:  # MONAI wraps transform errors: surface the DataError itself
                cause = err
                while cause is not None and not isinstance(cause, DataError):
                    cause = cause.__cause__
                if cause is not None:
                    raise cause from None
                raise
        if self.cache == "disk":
            # metadata kept (the affine gives the spacing) and loaded back with weights_only=True
            # (transforms.PlainMetad); a file that cannot be loaded is recomputed by MONAI
            return PersistentDataset(records, transform=transform, cache_dir=self.disk_cache_dir(transform),
                                     hash_func=record_hash, track_meta=True, weights_only=True)
        return Dataset(records, transform=transform)

    def setup(self, stage: str | None = None) -> None:
        info = self.info
        splits = self.case_splits()
        coarse_dir = getattr(self.source, "coarse_dir", None)
        with_coarse = coarse_dir is not None or any(c.coarse is not None for c in self.source.cases())
        extra = ["coarse"] if with_coarse else []
        common = dict(spatial_dims=info.spatial_dims, label_map=info.label_map, patch_size=self.patch_size,
                      extra_label_keys=extra, target_spacing=self.target_spacing, resize=self.resize)
        for name in STAGE_SPLITS.get(stage, SPLITS):
            if name in self.datasets or not splits[name]:
                continue
            no_coarse = [c.id for c in splits[name] if with_coarse and c.coarse is None]
            if no_coarse:  # coarse masks (e.g. another model's test predictions) must cover the split used
                raise DataError(f"{coarse_dir}: no coarse mask for {len(no_coarse)} case(s) of the {name} split "
                                f"(expected one per image stem, missing {no_coarse[:10]})")
            det = deterministic_transforms(**common)
            if name != "train":
                det = det + self.extra_eval_transforms
            ds = self._cached(self._records(splits[name], with_coarse), mt.Compose(det))
            if name == "train":
                rnd = random_transforms(spatial_dims=info.spatial_dims, patch_size=self.patch_size,
                                        extra_label_keys=extra, foreground_ratio=self.foreground_ratio,
                                        **self.augment_kwargs)
                rnd = rnd + self.extra_train_transforms
                # random transforms seeded per (run seed, epoch, item): a resumed run draws the same patches
                ds = SeededTransformDataset(RepeatDataset(ds, self.samples_per_epoch), mt.Compose(rnd),
                                            seed=torch.initial_seed())
            self.datasets[name] = ds

    # ---------------------------------------------------------------- loaders
    def _dist(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def loader_settings(self) -> dict[str, Any]:
        """num_workers, pin_memory, persistent_workers of every loader. ``auto``: on GPU, workers = the
        CPUs per local rank minus one (at most MAX_AUTO_WORKERS) and pinned memory; on CPU, none (the
        model uses the cores)."""
        trainer = getattr(self, "trainer", None)
        strategy = getattr(trainer, "strategy", None)  # None: no trainer (a loader built by hand)
        on_gpu = strategy is not None and strategy.root_device.type == "cuda"
        workers = self.num_workers
        if workers == "auto":
            workers = 0
            if on_gpu:
                cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
                per_rank = cpus // max(1, int(getattr(trainer, "num_devices", 1)))
                workers = max(1, min(MAX_AUTO_WORKERS, per_rank - 1))
        pin = on_gpu if self.pin_memory == "auto" else bool(self.pin_memory)
        return dict(num_workers=int(workers), pin_memory=pin, persistent_workers=int(workers) > 0)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._dist()
        ds = self.datasets["train"]
        drop_last = len(ds) >= world * self.batch_size
        # the epoch's order: a permutation seeded by (run seed, epoch), rank r taking every W-th item; after a
        # restart mid-epoch, the batches already trained on are skipped (state_dict / load_state_dict)
        sampler = EpochSampler(len(ds), ds.seed, rank, world, drop_last=drop_last)
        if self._resume_position is not None:
            epoch, batches = self._resume_position
            sampler.resume_from(epoch, batches * self.batch_size)
            self._resume_position = None
        # MONAI's DataLoader with its own generator (run seed + rank): it never re-seeds torch's global stream
        # (the diffusion noise); the random transforms are seeded per item by the dataset
        generator = torch.Generator().manual_seed((ds.seed + rank) % 2**63)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, collate_fn=list_data_collate,
                          drop_last=drop_last, generator=generator, **self.loader_settings())

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the epoch (saved in every checkpoint): (epoch, batches trained on)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"train_epoch": int(trainer.current_epoch), "train_batches_done": int(progress.processed)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" in state_dict:
            self._resume_position = (int(state_dict["train_epoch"]), int(state_dict["train_batches_done"]))

    def _eval_loader(self, name: str) -> TorchDataLoader:
        if name not in self.datasets:
            raise DataError(f"the {name} split is empty: add cases or change data.split_fractions / splits.json")
        rank, world = self._dist()
        ds = self.datasets[name]
        if len(ds) < world:
            raise DataError(f"the {name} split has {len(ds)} case(s), fewer than the {world} processes: every "
                            "process needs a case; add cases or change data.split_fractions / splits.json")
        # Lightning's unpadded sampler: rank r takes cases r, r+W, r+2W, ... (no padding, no duplicate),
        # so every case is scored exactly once (trainer.use_distributed_sampler=false keeps it)
        sampler = UnrepeatedDistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        # eval transforms are deterministic (coarse masks are seeded per case): torch's loader, which leaves
        # the global RNG alone when Lightning builds it mid-training (MONAI's would re-seed it)
        return TorchDataLoader(ds, batch_size=1, sampler=sampler, collate_fn=list_data_collate,
                               **self.loader_settings())

    def val_dataloader(self) -> TorchDataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> TorchDataLoader:
        return self._eval_loader("test")
