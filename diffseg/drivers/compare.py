"""Side-by-side comparison: ``scripts/compare.py experiments=[unet_brats,imgx_brats,segdiff_brats] [overrides]``.

Every experiment is trained (or reused: a finished run in OUT/<name>/ is not re-run) on the SAME
split: the split of the data is written once to OUT/splits.json and every run reads it
(``data.splits_file``). ``REFINER@SOURCE`` entries (e.g. ``segrefiner_folder2d@unet_folder2d``) train
the refiner on its own coarse masks and then refine SOURCE's saved test predictions
(``save_predictions=true``; evaluate.py with ``data.source.coarse_dir``): the cascade's cost is the
sum of both models' prediction time. Writes OUT/leaderboard.md, OUT/leaderboard.csv and
OUT/quality_vs_cost.png (the chosen metric against inference seconds per case).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from diffseg.drivers.sweep import reported_metrics
from diffseg.utils.errors import ConfigError
from diffseg.drivers.jobs import (REPO, Job, check_overrides_compose, group_choice, read_json, run_jobs,
                                split_overrides)
from diffseg.utils.outputs import atomic_write_text, markdown_table

OWN = {"experiments": None, "out": None, "jobs": 1, "metric": None}
#: quality columns, in this order, where every compared run has them
QUALITY = ("dice", "iou", "hd95", "nsd", "mba", "fbound", "wcov", "ece")


def parse_entries(value) -> list[tuple[str, str | None]]:
    """``[a, b@c]`` -> [(a, None), (b, c)]: an experiment, or a refiner applied to a source's predictions."""
    if not value:
        raise ConfigError("experiments: which experiments? e.g. experiments=[unet_brats,imgx_brats,segdiff_brats] "
                          "or experiments=[unet_folder2d,segdiff_folder2d,segrefiner_folder2d@unet_folder2d]")
    entries = []
    for item in (value if isinstance(value, (list, tuple)) else [value]):
        name, _, source = str(item).partition("@")
        entries.append((name, source or None))
    known = {p.stem for p in (REPO / "experiments" / "experiment").glob("*.yaml")}
    unknown = sorted({n for e in entries for n in e if n is not None} - known)
    if unknown:
        raise ConfigError(f"experiments: unknown {unknown}; known: {sorted(known)}")
    return entries


#: leaderboard cost column -> run_info.json key
COST_KEYS = {"parameters": "parameters", "train_seconds": "train_seconds",
             "seconds_per_case": "test_seconds_per_case", "peak_memory_mb": "peak_memory_mb"}


def run_cost(info: dict[str, Any]) -> dict[str, float]:
    """A run's cost columns from its run_info.json (0 where a figure is missing)."""
    return {column: info.get(key) or 0 for column, key in COST_KEYS.items()}


class Comparison:
    def __init__(self, argv: Sequence[str]):
        own, self.overrides = split_overrides(argv, OWN)
        self.entries = parse_entries(own["experiments"])
        scale = group_choice(self.overrides, "scale") or "paper"
        names = "+".join(self.label(n, s) for n, s in self.entries)
        self.out = Path(own["out"] or REPO / "outputs" / "compare" / scale / names)
        self.jobs = int(own["jobs"])
        self.metric = own["metric"]
        self.sources = {s for _, s in self.entries if s is not None}
        for source in self.sources:
            if (source, None) not in self.entries:
                self.entries.insert(0, (source, None))  # a cascade needs its source's run

    @staticmethod
    def label(name: str, source: str | None) -> str:
        return name if source is None else f"{name}@{source}"

    def run_dir(self, name: str, source: str | None = None) -> Path:
        return self.out / self.label(name, source)

    def fit_args(self, name: str) -> list[str]:
        args = [f"experiment={name}", *self.overrides, f"data.splits_file={self.out / 'splits.json'}"]
        if name in self.sources:
            args.append("save_predictions=true")
        return args

    # ---------------------------------------------------------------- split
    def write_split(self) -> None:
        """OUT/splits.json from the first experiment's data config (kept when it exists)."""
        path = self.out / "splits.json"
        if path.is_file():
            return
        from hydra import compose, initialize_config_dir

        from diffseg.drivers.run import build_datamodule

        first = self.entries[0][0]
        with initialize_config_dir(config_dir=str(REPO / "experiments"), version_base="1.3"):
            cfg = compose("fit", overrides=[f"experiment={first}", *self.overrides,
                                            f"paths.output_dir={self.out}"])
        dm = build_datamodule(cfg)
        dm.write_splits(self.out)

    def jobs_to_run(self) -> list[Job]:
        jobs = []
        for name, source in self.entries:
            fit_job = Job(name, "fit.py", self.fit_args(name), self.run_dir(name))
            if source is None:
                jobs.append(fit_job)
                continue
            # the refiner trains on its own (online) coarse masks, then refines SOURCE's test predictions
            train = Job(f"{name}:train", "fit.py", self.fit_args(name), self.run_dir(name, source) / "train")
            predictions = self.run_dir(source) / "predictions"
            args = [f"ckpt={train.run_dir}",  # the checkpoint its fit.py tested (best, else last)
                    f"+overrides.data.source.coarse_dir={predictions}"]
            trainer = group_choice(self.overrides, "trainer")
            args += [f"trainer={trainer}"] if trainer else []
            jobs += [train, Job(self.label(name, source), "evaluate.py", args, self.run_dir(name, source),
                                after=[train.name, source])]
        return list({j.name: j for j in jobs}.values())

    # ---------------------------------------------------------------- leaderboard
    def row(self, name: str, source: str | None) -> dict[str, Any]:
        run = self.run_dir(name, source)
        row: dict[str, Any] = {"method": self.label(name, source), **reported_metrics(read_json(run / "metrics.json"))}
        cost = run_cost(read_json(run / "run_info.json"))
        if source is not None:  # a cascade costs the refiner (trained in run/train) plus its source model
            trained, src = run_cost(read_json(run / "train" / "run_info.json")), run_cost(
                read_json(self.run_dir(source) / "run_info.json"))
            cost = dict(parameters=trained["parameters"] + src["parameters"],
                        train_seconds=trained["train_seconds"] + src["train_seconds"],
                        seconds_per_case=cost["seconds_per_case"] + src["seconds_per_case"],
                        peak_memory_mb=max(cost["peak_memory_mb"], trained["peak_memory_mb"], src["peak_memory_mb"]))
        row.update(cost)
        return row

    def leaderboard(self) -> str:
        rows = [self.row(n, s) for n, s in self.entries]
        common = set.intersection(*(set(r) for r in rows))
        quality = [m for m in QUALITY if m in common]
        per_class = sorted(k for k in common if k.startswith("dice/"))
        cost = ["parameters", "train_seconds", "seconds_per_case", "peak_memory_mb"]
        metric = self.metric or ("dice" if "dice" in common else quality[0])
        if metric not in common:
            raise ConfigError(f"metric={metric}: not reported by every run; common metrics: {sorted(common)}")
        rows.sort(key=lambda r: -r[metric] if isinstance(r[metric], (int, float)) else math.inf)
        columns = ["method", *quality, *per_class, *cost]
        with open(self.out / "leaderboard.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        text = (f"# Comparison on one split (`{' '.join(self.overrides)}`)\n\n"
                f"- sorted by test `{metric}`; split: `{self.out / 'splits.json'}`\n"
                "- seconds_per_case: mean prediction time per test case (sliding window, every sampling step and "
                "sample; cascades add their source model's time); train_seconds: wall time of training\n"
                "- peak_memory_mb: CUDA allocator peak on a GPU, peak process RSS (training + test) on CPU\n\n"
                + markdown_table(rows, columns))
        atomic_write_text(self.out / "leaderboard.md", text)
        self.plot(rows, metric)
        return text

    def plot(self, rows: list[dict[str, Any]], metric: str) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4.2))
        for r in rows:
            x, y = r["seconds_per_case"], r[metric]
            size = 30 + 170 * math.sqrt((r["parameters"] or 0) / max(q["parameters"] or 1 for q in rows))
            ax.scatter([x], [y], s=size, alpha=0.7)
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("inference seconds per case (log)")
        ax.set_ylabel(f"test {metric}")
        ax.set_title("quality vs inference cost (marker area ~ parameters)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        path = self.out / "quality_vs_cost.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def compare(argv: Sequence[str]) -> str:
    comparison = Comparison(argv)
    comparison.out.mkdir(parents=True, exist_ok=True)
    for name, _ in comparison.entries:
        check_overrides_compose("fit", comparison.fit_args(name), f"experiment {name}")
    comparison.write_split()
    run_jobs(comparison.jobs_to_run(), parallel=comparison.jobs)
    text = comparison.leaderboard()
    print(text)
    return text
