"""Timing and memory helpers shared by the subcommands of scripts/benchmark.py.

``measure(fn)`` runs a callable a few times (after warm-up, synchronising CUDA) and reports the
median wall time and the peak memory of the measured calls: ``torch.cuda.max_memory_allocated`` on
GPU, the peak resident set size sampled from /proc on CPU (above the level before the call).
``model_from_config`` builds a model from the Hydra configs exactly as scripts/fit.py would.
"""
from __future__ import annotations

import contextlib
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"


@dataclass
class Measurement:
    seconds: float         # median over repeats
    all_seconds: list[float]
    peak_mb: float         # peak memory during the measured calls (see module docstring)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096


class PeakRSS:
    """Peak resident set size above the starting level, sampled every ``interval`` seconds in a thread
    (CPU tensors do not go through tracemalloc; ru_maxrss cannot be reset between measurements)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() - self.start)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.start = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() - self.start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device (as trainer.precision=bf16-mixed), or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1,
            bf16: bool = False) -> Measurement:
    """Median wall time of ``fn()`` under no_grad (and bf16 autocast) plus its peak memory."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    with torch.no_grad(), autocast(device, bf16):
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            tracker = contextlib.nullcontext()
        else:
            tracker = PeakRSS()
        with tracker:
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                synchronize(device)
                times.append(time.perf_counter() - start)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = tracker.peak
    return Measurement(statistics.median(times), times, peak / 2**20)


def model_from_config(overrides: Sequence[str], data_info: Mapping[str, Any], config_name: str = "fit"):
    """Compose ``experiments/<config_name>.yaml`` with ``overrides``, fill the data description keys
    that scripts/fit.py reads from the files (``data_info``), instantiate ``cfg.model``. Returns (model, cfg)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import diffseg.cli  # noqa: F401 - config resolvers

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name, [*overrides, "paths.output_dir=benchmark"])
    for key, value in data_info.items():
        cfg.data[key] = value
    return instantiate(cfg.model, _convert_="all"), cfg


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Plain-text table; floats with 4 significant digits."""
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
