"""Timing and memory helpers shared by the subcommands of scripts/benchmark.py.

``measure(fn)`` runs a callable a few times (after warm-up, synchronising CUDA) and reports the
median wall time and the peak tensor memory above the level before the call:
``torch.cuda.max_memory_allocated`` on GPU, the profiler's allocation records on CPU (``CpuPeak``).
``model_from_config`` builds a model from the Hydra configs exactly as scripts/fit.py would.
``in_fresh_process(fn)`` runs a function in a new process (forked from a server that imported diffseg once)
and returns its result with the process's peak resident memory above its start (Linux); with
``serve_data_layer`` it measures what the data layer holds (tests/unit/test_data_scale.py).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass
class Measurement:
    seconds: float         # best of the repeats (timeit convention: interference only adds time)
    median: float
    all_seconds: list[float]
    peak_mb: float         # peak memory during the measured calls (see module docstring)


class CpuPeak:
    """Peak memory of live CPU tensors during a block (the CPU analogue of max_memory_allocated),
    from the profiler's allocation records: running sum of every op's own allocations and frees in
    time order. RSS cannot be used: the allocator keeps freed pages, so it hides reuse."""

    def __enter__(self) -> "CpuPeak":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        events = sorted(self._prof.events(), key=lambda e: e.time_range.start)
        live = self.peak = 0
        for event in events:
            live += event.self_cpu_memory_usage
            self.peak = max(self.peak, live)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on the device (as trainer.precision=bf16-mixed), or nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def measure(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1,
            bf16: bool = False, clock: str = "wall") -> Measurement:
    """Best and median wall time of ``fn()`` under no_grad (and bf16 autocast) plus its peak memory:
    on GPU over the timed calls; on CPU during the first call (profiled; a timed one when warmup=0,
    where the profiler's per-op overhead is negligible next to large convolutions).

    clock: "wall" (perf_counter) or "process" (CPU time of this process, all threads: on a CPU shared
    with other jobs it leaves out the time the process waited, so ratios stay meaningful)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {list(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    peak, times = 0.0, []
    with torch.no_grad(), autocast(device, bf16):
        for i in range(warmup + repeats):
            if i == warmup:
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
            tracker = CpuPeak() if i == 0 and device.type == "cpu" else contextlib.nullcontext()
            start = now()
            with tracker:
                fn()
            synchronize(device)
            if i >= warmup:
                times.append(now() - start)
            if isinstance(tracker, CpuPeak):
                peak = tracker.peak
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
    return Measurement(min(times), statistics.median(times), times, peak / 2**20)


def model_from_config(overrides: Sequence[str], data_info: Mapping[str, Any], config_name: str = "fit"):
    """Compose ``experiments/<config_name>.yaml`` with ``overrides``, fill the data description keys
    that scripts/fit.py reads from the files (``data_info``), instantiate ``cfg.model``. Returns (model, cfg)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import diffseg.drivers.cli  # noqa: F401 - config resolvers

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


# ------------------------------------------------------------------------------------------- resident memory
def _status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS: resident now, VmHWM: peak resident)."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field} (resident-memory figures need Linux)")
    return int(match.group(1))


def _measured(fn: Callable[..., Any], args: tuple) -> tuple[Any, float]:
    start = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    result = fn(*args)
    return result, (_status_kb("VmHWM") - start) / 1024


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` in a new process, returning (result, peak resident MB above the process's start).

    The process is forked from multiprocessing's fork server, which has imported diffseg's data layer
    once, so the figure holds what ``fn`` allocated and nothing of a previous call (an allocator keeps
    freed pages, so peaks measured one after the other in one process would hide growth)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["diffseg.utils.benchmark", "diffseg.data.datamodule"])
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(_measured, (fn, args))


def serve_data_layer(root: str, splits_file: str, cache: str, cache_dir: str, patch_size: Sequence[int],
                       samples_per_epoch: int) -> int:
    """Build a BraTS-layout SegDataModule as fit and test do and serve one training epoch of
    ``samples_per_epoch`` patches, the validation and the test volumes (in this process, no workers).
    Run it through ``in_fresh_process`` to read the peak resident memory of the data layer."""
    from diffseg.data.datamodule import SegDataModule
    from diffseg.data.formats.brats import BratsSource

    dm = SegDataModule(BratsSource(root), root=root, patch_size=patch_size, batch_size=1,
                       samples_per_epoch=samples_per_epoch, cache=cache, cache_dir=cache_dir,
                       splits_file=splits_file, num_workers=0, augment=False)
    dm.setup("fit")
    dm.setup("test")
    served = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for batch in loader:
            served += batch["image"].shape[0]
    return served
