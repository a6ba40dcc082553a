"""Ablation reproduction: ``scripts/ablate.py ablation=imgx|segdiff|segrefiner [seeds=3] [scale=..] [jobs=N]
[variants=[..]] [out=DIR] [overrides]``.

A grid (``ablation_grids/<name>.yaml``) names an experiment, the metrics, a reference variant and
the variants: ``fit`` overrides (a training run per seed), or ``from: <variant>`` with ``evaluate``
overrides (the other variant's checkpoint of the same seed, tested with other sampling settings), or
``from`` with ``metric_prefix`` (another output of that run, e.g. ``samples/1/``: no run at all).
Every (variant, seed) is a run directory ``OUT/<variant>/seed<s>``; finished runs are never re-run and
an interrupted one resumes from its last checkpoint, so the command can be stopped and started again.
OUT/ablation.md and OUT/ablation.csv hold, per variant and metric, the mean over test cases with its 95%
bootstrap CI, the sd over seeds and the paired comparison with the reference variant (diffseg.drivers.statistics),
the paper's claim beside it, and a verdict (agrees / disagrees / inconclusive) from the CI of the difference;
OUT/ablation_seeds.csv the per-seed values of metrics.json.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from diffseg.utils.errors import ConfigError
from diffseg.drivers.jobs import (REPO, Job, check_overrides_compose, group_choice, read_json, run_jobs,
                                split_launcher_overrides, split_overrides)
from diffseg.drivers.statistics import (SUFFIXES, format_cell, format_difference, has_case_values, metric_columns,
                                       pooled_columns, read_case_values, verdict)
from diffseg.utils.outputs import atomic_write_text, markdown_table, write_json

GRIDS = REPO / "ablation_grids"
EXPECTATIONS = ("higher", "lower", "similar", "not_higher", "not_lower")
OWN = {"ablation": None, "seeds": 3, "out": None, "jobs": 1, "launcher": "joblib", "variants": None, "summary_only": False}


def load_grid(name: str) -> dict[str, Any]:
    path = GRIDS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in GRIDS.glob("*.yaml"))
        raise ConfigError(f"ablation={name}: no grid {path}; expected one of {known}")
    grid = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    variants = grid.get("variants") or {}
    if grid.get("reference") not in variants:
        raise ConfigError(f"{path}: reference {grid.get('reference')!r} is not one of the variants {list(variants)}")
    for vname, v in variants.items():
        v = variants[vname] = v or {}
        if v.get("from") is not None and v["from"] not in variants:
            raise ConfigError(f"{path}: variant {vname!r} reads from unknown variant {v['from']!r}")
        if v.get("from") is not None and v.get("fit"):
            raise ConfigError(f"{path}: variant {vname!r} has both `from` (no training) and `fit` overrides")
        if v.get("expect") is not None and v["expect"] not in EXPECTATIONS:
            raise ConfigError(f"{path}: variant {vname!r}: expect must be one of {EXPECTATIONS}, got {v['expect']!r}")
    return grid


class Ablation:
    def __init__(self, argv: Sequence[str]):
        own, overrides = split_overrides(argv, OWN)
        self.launcher_extra, self.overrides = split_launcher_overrides(overrides)
        self.launcher = str(own["launcher"])
        if not own["ablation"]:
            raise ConfigError(f"ablation: which grid? ablation=NAME with NAME one of "
                              f"{sorted(p.stem for p in GRIDS.glob('*.yaml'))}")
        self.name = str(own["ablation"])
        self.grid = load_grid(self.name)
        if own["variants"] is not None:  # a subset; the reference and the runs they read from stay in
            self.select_variants([str(v) for v in own["variants"]])
        seeds = own["seeds"]
        self.seeds = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
        if not self.seeds:
            raise ConfigError(f"seeds: expected a count >= 1 or a list of seeds, got {seeds!r}")
        self.jobs = int(own["jobs"])
        self.summary_only = bool(own["summary_only"])  # tables from the finished runs, nothing is run
        scale = group_choice(self.overrides, "scale") or "paper"
        self.out = Path(own["out"] or REPO / "outputs" / "ablate" / f"{self.name}_{scale}")
        if group_choice(self.overrides, "data") is None:  # the grid's data unless data=... is given
            self.overrides = [*self.grid.get("data", []), *self.overrides]
        self.base = [f"experiment={self.grid['experiment']}", *self.overrides]

    def select_variants(self, names: list[str]) -> None:
        variants = self.grid["variants"]
        unknown = sorted(set(names) - set(variants))
        if unknown:
            raise ConfigError(f"variants: unknown {unknown}; the {self.name} grid has {list(variants)}")
        keep = {self.grid["reference"], *names}
        keep |= {self.source(n) for n in keep}
        self.grid["variants"] = {k: v for k, v in variants.items() if k in keep}

    # ---------------------------------------------------------------- runs
    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / variant / f"seed{seed}"

    def source(self, variant: str) -> str:
        """The variant whose training run a variant uses (itself when it trains)."""
        v = self.grid["variants"][variant]
        return variant if v.get("from") is None else self.source(v["from"])

    def jobs_to_run(self) -> list[Job]:
        jobs = []
        for seed in self.seeds:
            for name, v in self.grid["variants"].items():
                if v.get("from") is None:
                    args = [*self.base, *v.get("fit", []), f"seed={seed}"]
                    jobs.append(Job(f"{name}/seed{seed}", "fit.py", args, self.run_dir(name, seed)))
                elif v.get("evaluate"):
                    src = self.source(name)
                    ckpt = self.run_dir(src, seed)  # the checkpoint its fit.py tested (best, else last)
                    trainer = group_choice(self.overrides, "trainer")
                    args = [f"ckpt={ckpt}", *v["evaluate"], *([f"trainer={trainer}"] if trainer else [])]
                    jobs.append(Job(f"{name}/seed{seed}", "evaluate.py", args, self.run_dir(name, seed),
                                    after=[f"{src}/seed{seed}"]))
        return jobs

    def check(self) -> None:
        """Compose every training variant's config (seconds): a bad key stops before any run."""
        for name, v in self.grid["variants"].items():
            if v.get("from") is None:
                check_overrides_compose("fit", [*self.base, *v.get("fit", [])], f"ablation={self.name}, variant {name}")
        manifest = {"ablation": self.name, "experiment": self.grid["experiment"], "overrides": self.base}
        path = self.out / "ablate.json"
        previous = read_json(path)
        if previous and previous.get("overrides") != manifest["overrides"]:
            raise ConfigError(f"{self.out} holds the ablation run with other overrides {previous['overrides']}; "
                              "to keep both, choose another out=DIR")
        write_json(path, manifest)

    # ---------------------------------------------------------------- results
    def value(self, variant: str, seed: int, metric: str) -> float:
        """The run's own metrics.json value (ablation_seeds.csv)."""
        v = self.grid["variants"][variant]
        if v.get("metric_prefix"):
            metric = metric.replace("test/", f"test/{v['metric_prefix']}", 1)
            run = self.run_dir(self.source(variant), seed)
        else:
            run = self.run_dir(variant, seed)
        return float(read_json(run / "metrics.json").get(metric, math.nan))

    def case_source(self, variant: str, metric: str) -> tuple[list[Path], str, str]:
        """Where a variant's per-case values of ``metric`` (``test/<name>``) are: (the run directory of each
        seed, the test_cases.csv output, the column). A ``metric_prefix`` is the logging prefix of another
        output of the source run (``samples/1/`` -> output ``samples/1``, ``coarse_`` -> output ``coarse``)."""
        v = self.grid["variants"][variant]
        prefix = v.get("metric_prefix") or ""
        output = prefix[:-1] if prefix else "final"
        return [self.run_dir(self.source(variant), s) for s in self.seeds], output, metric[len("test/"):]

    def per_seed_cases(self, variant: str, metric: str) -> list[dict[str, float]]:
        """Per finished seed, {case: value} (an unfinished run is left out and the table says so)."""
        runs, output, column = self.case_source(variant, metric)
        return [read_case_values(r, column, output) for r in runs if (r / "test_cases.csv").is_file()]

    def is_pooled(self, metric: str) -> bool:
        """A metric without per-case values (ece, iou_pooled) in the reference's first finished run."""
        runs, _, column = self.case_source(self.grid["reference"], metric)
        finished = [r for r in runs if (r / "test_cases.csv").is_file()]
        return bool(finished) and not has_case_values(finished[0], column)

    def summarise(self) -> str:
        """OUT/ablation.csv (per variant and metric: mean over cases, bootstrap CI, sd over seeds, paired
        difference to the reference with its CI and Wilcoxon p; diffseg.drivers.statistics), OUT/ablation.md
        (the same, with the paper's claim and the verdict from the CI of the difference) and
        OUT/ablation_seeds.csv (each run's metrics.json values)."""
        metrics, ref, tol = self.grid["metrics"], self.grid["reference"], float(self.grid.get("tolerance", 0.0))
        per_seed = [{"variant": name, "seed": s, **{m: self.value(name, s, m) for m in metrics}}
                    for name in self.grid["variants"] for s in self.seeds]
        with open(self.out / "ablation_seeds.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["variant", "seed", *metrics])
            writer.writeheader()
            writer.writerows(per_seed)
        judged = metrics[0]
        pooled = {m for m in metrics if self.is_pooled(m)}
        reference = {m: self.per_seed_cases(ref, m) for m in metrics if m not in pooled}
        rows, table = [], []
        for name, v in self.grid["variants"].items():
            row: dict[str, Any] = {"variant": name}
            row["seeds_finished"] = sum((r / "metrics.json").is_file() for r in self.case_source(name, judged)[0])
            for m in metrics:
                if m in pooled:
                    row.update(pooled_columns(m, [self.value(name, s, m) for s in self.seeds]))
                else:
                    row.update(metric_columns(m, self.per_seed_cases(name, m), None if name == ref else reference[m]))
            row["expected"] = v.get("expect") or ("reference" if name == ref else "")
            row["verdict"] = "" if name == ref else verdict(
                v.get("expect"), row.get(f"{judged}_diff_ci_low", math.nan), row.get(f"{judged}_diff_ci_high", math.nan), tol)
            rows.append(row)
            table.append({"variant": name, "seeds": row["seeds_finished"],
                          **{m: format_cell(row, m) for m in metrics},
                          f"Δ {judged} [95% CI], Wilcoxon p": format_difference(row, judged),
                          "paper": v.get("paper", ""), "expected": row["expected"], "verdict": row["verdict"]})
        columns = ["variant", "seeds_finished", *[f"{m}{x}" for m in metrics for x in SUFFIXES], "expected", "verdict"]
        with open(self.out / "ablation.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        judged_rows = [r for r in rows if r["verdict"] in ("agrees", "disagrees", "inconclusive")]
        count = {k: sum(r["verdict"] == k for r in judged_rows) for k in ("agrees", "disagrees", "inconclusive")}
        unfinished = [r["variant"] for r in rows if r["seeds_finished"] < len(self.seeds)]
        text = (
            f"# Ablation `{self.name}`: experiment={self.grid['experiment']}\n\n"
            f"- overrides: `{' '.join(self.base[1:])}`\n- seeds: {self.seeds}\n"
            f"- cells: mean over the test cases (each case averaged over seeds) [95% bootstrap CI over cases] "
            f"± sd over seeds of the per-seed means\n"
            f"- judged metric: `{judged}`, paired with the reference variant `{ref}` over the same cases: mean "
            f"difference [95% bootstrap CI], two-sided Wilcoxon signed-rank p\n"
            f"- verdict from the CI of the difference: agrees / disagrees with the paper's direction when the CI "
            f"excludes the other side, inconclusive when it straddles it (\"similar\": CI inside ±{tol})\n"
            f"- verdicts: {count['agrees']} agree, {count['disagrees']} disagree, {count['inconclusive']} "
            f"inconclusive of {len(judged_rows)} variants\n"
            + (f"- NOT FINISHED (fewer seeds than asked): {', '.join(unfinished)}\n" if unfinished else "")
            + f"- runs: `{self.out}/<variant>/seed<s>/` (metrics.json, test_cases.csv, config.yaml, checkpoints)\n\n"
            + markdown_table(table, list(table[0]))
        )
        atomic_write_text(self.out / "ablation.md", text)
        return text


def ablate(argv: Sequence[str]) -> str:
    ablation = Ablation(argv)
    ablation.out.mkdir(parents=True, exist_ok=True)
    ablation.check()
    if not ablation.summary_only:
        run_jobs(ablation.jobs_to_run(), parallel=ablation.jobs, launcher=ablation.launcher,
                 extra=ablation.launcher_extra, sweep_dir=ablation.out)
    text = ablation.summarise()
    print(text)
    return text
