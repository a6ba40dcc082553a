"""Side-by-side comparison: ``scripts/compare.py experiments=[unet_brats,imgx_brats,segdiff_brats] [seeds=3]
[reference=NAME] [overrides]``.

Every experiment is trained with ``seeds`` seeds (or reused: a finished run in OUT/<name>/seed<s>/ is not
re-run) on the SAME split: the split of the data is written once to OUT/splits.json and every run reads it
(``data.splits_file``). Each quality column is the mean over test cases with its 95% bootstrap CI, the sd over
seeds and a paired comparison with the reference row (the first experiment unless ``reference=NAME``) over the
same cases (diffseg.drivers.statistics); each row shows its training budget (updates, batch, lr, budget
group, train seconds). ``REFINER@SOURCE`` entries (e.g. ``segrefiner_folder2d@unet_folder2d``) train
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

from diffseg.drivers.statistics import (SUFFIXES, format_cell, format_difference, has_case_values, metric_columns, pooled_columns,
                                       read_case_values)
from diffseg.drivers.cli import metric_mode
from diffseg.utils.errors import ConfigError
from diffseg.drivers.jobs import (REPO, Job, check_overrides_compose, group_choice, read_json, run_jobs,
                                split_launcher_overrides, split_overrides)
from diffseg.utils.outputs import atomic_write_text, markdown_table

OWN = {"experiments": None, "out": None, "jobs": 1, "launcher": "joblib", "metric": None, "seeds": 3, "reference": None}
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
        own, overrides = split_overrides(argv, OWN)
        self.launcher_extra, self.overrides = split_launcher_overrides(overrides)
        self.launcher = str(own["launcher"])
        self.entries = parse_entries(own["experiments"])
        scale = group_choice(self.overrides, "scale") or "paper"
        names = "+".join(self.label(n, s) for n, s in self.entries)
        self.out = Path(own["out"] or REPO / "outputs" / "compare" / scale / names)
        self.jobs = int(own["jobs"])
        self.metric = own["metric"]
        seeds = own["seeds"]
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else [int(x) for x in seeds]
        if not self.seeds:
            raise ConfigError(f"seeds: expected a count >= 1 or a list of seeds, got {seeds!r}")
        self.sources = {s for _, s in self.entries if s is not None}
        for source in self.sources:
            if (source, None) not in self.entries:
                self.entries.insert(0, (source, None))  # a cascade needs its source's run
        labels = [self.label(n, s) for n, s in self.entries]
        self.reference = str(own["reference"] or labels[0])
        if self.reference not in labels:
            raise ConfigError(f"reference={self.reference}: not one of the compared entries {labels}")

    @staticmethod
    def label(name: str, source: str | None) -> str:
        return name if source is None else f"{name}@{source}"

    def run_dir(self, name: str, source: str | None = None, seed: int = 0) -> Path:
        return self.out / self.label(name, source) / f"seed{seed}"

    def fit_args(self, name: str, seed: int = 0) -> list[str]:
        args = [f"experiment={name}", *self.overrides, f"data.splits_file={self.out / 'splits.json'}", f"seed={seed}"]
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
        for seed in self.seeds:
            for name, source in self.entries:
                fit_job = Job(f"{name}/seed{seed}", "fit.py", self.fit_args(name, seed), self.run_dir(name, seed=seed))
                if source is None:
                    jobs.append(fit_job)
                    continue
                # the refiner trains on its own (online) coarse masks, then refines SOURCE's test predictions
                run = self.run_dir(name, source, seed)
                train = Job(f"{name}:train/seed{seed}", "fit.py", self.fit_args(name, seed), run / "train")
                predictions = self.run_dir(source, seed=seed) / "predictions"
                args = [f"ckpt={train.run_dir}",  # the checkpoint its fit.py tested (best, else last)
                        f"+overrides.data.source.coarse_dir={predictions}"]
                trainer = group_choice(self.overrides, "trainer")
                args += [f"trainer={trainer}"] if trainer else []
                jobs += [train, Job(f"{self.label(name, source)}/seed{seed}", "evaluate.py", args, run,
                                    after=[train.name, f"{source}/seed{seed}"])]
        return list({j.name: j for j in jobs}.values())

    # ---------------------------------------------------------------- leaderboard
    def cost(self, name: str, source: str | None, seed: int) -> dict[str, float]:
        run = self.run_dir(name, source, seed)
        cost = run_cost(read_json(run / "run_info.json"))
        if source is None:
            return cost
        # a cascade costs the refiner (trained in run/train) plus its source model
        trained, src = run_cost(read_json(run / "train" / "run_info.json")), self.cost(source, None, seed)
        return dict(parameters=trained["parameters"] + src["parameters"],
                    train_seconds=trained["train_seconds"] + src["train_seconds"],
                    seconds_per_case=cost["seconds_per_case"] + src["seconds_per_case"],
                    peak_memory_mb=max(cost["peak_memory_mb"], trained["peak_memory_mb"], src["peak_memory_mb"]))

    def budget(self, name: str, source: str | None) -> dict[str, Any]:
        """The training budget of a row, from its first seed's resolved config.yaml (a cascade: the refiner's)."""
        from omegaconf import OmegaConf

        run = self.run_dir(name, source, self.seeds[0])
        path = run / "train" / "config.yaml" if source is not None else run / "config.yaml"
        cfg = OmegaConf.load(path)
        return {"budget": OmegaConf.select(cfg, "budget_name", default="none"),
                "updates": OmegaConf.select(cfg, "trainer.max_steps"),
                "batch": OmegaConf.select(cfg, "data.batch_size"),
                "lr": OmegaConf.select(cfg, "model.optimizer.lr")}

    def case_values(self, name: str, source: str | None, metric: str) -> list[dict[str, float]]:
        return [read_case_values(self.run_dir(name, source, s), metric) for s in self.seeds]

    def leaderboard(self) -> str:
        first = {n: read_json(self.run_dir(n, s, self.seeds[0]) / "metrics.json") for n, s in self.entries}
        common = set.intersection(*({k[len("test/"):] for k in m if k.startswith("test/")} for m in first.values()))
        quality = [m for m in QUALITY if m in common]
        per_class = sorted(k for k in common if k.startswith("dice/"))
        metric = self.metric or ("dice" if "dice" in common else quality[0])
        if metric not in common:
            raise ConfigError(f"metric={metric}: not reported by every run; common metrics: {sorted(common)}")
        metrics = [*quality, *per_class]
        ref_entry = next((n, s) for n, s in self.entries if self.label(n, s) == self.reference)
        pooled = {m for m in metrics if not has_case_values(self.run_dir(*ref_entry, self.seeds[0]), m)}
        reference = {m: self.case_values(*ref_entry, m) for m in metrics if m not in pooled}
        rows = []
        for name, source in self.entries:
            label = self.label(name, source)
            row: dict[str, Any] = {"method": label}
            for m in metrics:
                if m in pooled:  # no per-case values: mean and sd over seeds of metrics.json
                    row.update(pooled_columns(m, [read_json(self.run_dir(name, source, s) / "metrics.json").get(
                        f"test/{m}", math.nan) for s in self.seeds]))
                else:
                    row.update(metric_columns(m, self.case_values(name, source, m),
                                              None if label == self.reference else reference[m]))
            costs = [self.cost(name, source, s) for s in self.seeds]
            row.update({k: sum(c[k] for c in costs) / len(costs) for k in COST_KEYS})
            row.update(self.budget(name, source))
            rows.append(row)
        rows.sort(key=lambda r: -r[metric] if metric_mode(metric) == "max" else r[metric])
        cost = ["parameters", "train_seconds", "seconds_per_case", "peak_memory_mb"]
        budget = ["budget", "updates", "batch", "lr"]
        columns = ["method", *[f"{m}{x}" for m in metrics for x in SUFFIXES], *budget, *cost]
        with open(self.out / "leaderboard.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
        table = [{"method": r["method"], **{m: format_cell(r, m) for m in metrics},
                  f"Δ {metric} vs {self.reference} [95% CI], Wilcoxon p": format_difference(r, metric),
                  **{k: r[k] for k in budget + cost}} for r in rows]
        text = (f"# Comparison on one split (`{' '.join(self.overrides)}`)\n\n"
                f"- sorted by test `{metric}`; split: `{self.out / 'splits.json'}`; seeds: {self.seeds}\n"
                "- quality cells: mean over test cases (each averaged over seeds) [95% bootstrap CI over cases] ± sd "
                f"over seeds; Δ: paired mean difference to `{self.reference}` over the same cases [95% bootstrap CI] "
                "and the two-sided Wilcoxon signed-rank p (leaderboard.csv: every metric)\n"
                "- budget: the training budget group (budget/<name>.yaml, shared within a family), optimiser updates, "
                "batch, peak lr\n"
                "- seconds_per_case: mean prediction time per test case (sliding window, every sampling step and "
                "sample; cascades add their source model's time); train_seconds: wall time of training (mean over "
                "seeds)\n"
                "- peak_memory_mb: CUDA allocator peak on a GPU, peak process RSS (training + test) on CPU\n\n"
                + markdown_table(table, list(table[0])))
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
    run_jobs(comparison.jobs_to_run(), parallel=comparison.jobs, launcher=comparison.launcher,
             extra=comparison.launcher_extra, sweep_dir=comparison.out)
    text = comparison.leaderboard()
    print(text)
    return text
