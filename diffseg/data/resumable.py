"""Training randomness that a resumed run reproduces exactly.

A run killed in the middle of an epoch and resumed from its last checkpoint must draw the patches the
uninterrupted run draws, and continue the diffusion noise where it stopped. Three pieces:

- ``EpochSampler``: the order of an epoch is a permutation seeded by (run seed, epoch), the same on every
  rank; rank r of W takes positions r, r + W, ... Each item is yielded as ``(epoch, index)``.
- ``SeededTransformDataset``: the random transforms of item ``(epoch, index)`` are seeded by (run seed,
  epoch, index) just before they run, so a sample does not depend on which worker loads it, on the
  samples before it, or on persistent workers.
- ``RNGStateInCheckpoint``: the global RNG states (torch CPU/CUDA, numpy, random: the diffusion noise and
  timesteps) go into every checkpoint and are restored on resume.

The datamodule stores (epoch, batches done) in the checkpoint (``LightningDataModule.state_dict``) and
calls ``EpochSampler.resume_from`` on resume: the first epoch after the restart skips the batches the
killed run already trained on, by index, without loading them.
"""
from __future__ import annotations

import random
from typing import Any, Iterator

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from monai.transforms import apply_transform

MAX_SEED = 2**32 - 1


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for the random transforms of training item ``index`` in ``epoch``."""
    return int(np.random.SeedSequence([seed % 2**63, epoch, index]).generate_state(1)[0])


class EpochSampler(torch.utils.data.Sampler):
    """Shuffled training items of one rank, a pure function of (seed, epoch, rank, world).

    With ``drop_last`` (or when ``length`` is a multiple of ``world``) every rank gets ``length // world``
    items; otherwise the permutation is padded by its own start so that every rank gets the same number
    (as torch's DistributedSampler does)."""

    def __init__(self, length: int, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False):
        if length < 1:
            raise ValueError(f"EpochSampler: expected at least one item, got {length}")
        self.length, self.seed, self.rank, self.world = int(length), int(seed), int(rank), int(world)
        self.per_rank = self.length // self.world if drop_last else -(-self.length // self.world)
        self.epoch, self._skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = int(epoch)

    def resume_from(self, epoch: int, consumed: int) -> None:
        """The next iteration is ``epoch`` without its first ``consumed`` items (already trained on)."""
        self.epoch, self._skip = int(epoch), int(consumed)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = np.random.default_rng([self.seed % 2**63, self.epoch]).permutation(self.length)
        total = self.per_rank * self.world
        if total > self.length:
            order = np.concatenate([order, order[: total - self.length]])
        mine = order[:total][self.rank::self.world]
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        for index in mine[skip:]:
            yield epoch, int(index)


class SeededTransformDataset(torch.utils.data.Dataset):
    """``transform(data[index])`` with the transform's random state seeded by (seed, epoch, index).

    Keys are ``(epoch, index)`` from ``EpochSampler``; a plain integer index means epoch 0."""

    def __init__(self, data, transform, seed: int):
        if not hasattr(transform, "set_random_state"):
            raise TypeError(f"SeededTransformDataset: the transform must be a MONAI Randomizable/Compose, got "
                            f"{type(transform).__name__}")
        self.data, self.transform, self.seed = data, transform, int(seed)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, int(key))
        self.transform.set_random_state(seed=item_seed(self.seed, epoch, index))
        return apply_transform(self.transform, self.data[index])


class RNGStateInCheckpoint(Callback):
    """Every checkpoint carries the global RNG states of the rank that writes it (rank 0); resuming
    restores them, so the diffusion noise and timesteps continue as in the uninterrupted run.

    Stored as tensors and plain Python values only (numpy's key array as an int64 tensor), so that checkpoints
    still load with ``torch.load(weights_only=True)`` (what Lightning's own collector would break)."""

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "python": random.getstate(),
                 "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        torch.set_rng_state(state_dict["torch"])
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
