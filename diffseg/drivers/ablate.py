"""Ablation reproduction: ``scripts/ablate.py ablation=imgx|segdiff|segrefiner [seeds=3] [scale=..] [jobs=N]
[variants=[..]] [out=DIR] [overrides]``.

A grid (``ablation_grids/<name>.yaml``) names an experiment, the metrics, a reference variant and
the variants: ``fit`` overrides (a training run per seed), or ``from: <variant>`` with ``evaluate``
overrides (the other variant's checkpoint of the same seed, tested with other sampling settings), or
``from`` with ``metric_prefix`` (another output of that run, e.g. ``samples/1/``: no run at all).
Every (variant, seed) is a run directory ``OUT/<variant>/seed<s>``; finished runs are never re-run and
an interrupted one resumes from its last checkpoint, so the command can be stopped and started again.
OUT/ablation.md holds mean ± sd over seeds per variant, the paper's claim beside it, and whether this
run agrees; OUT/ablation.csv the per-seed values.
"""
from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from diffseg.utils.errors import ConfigError
from diffseg.drivers.jobs import (REPO, Job, check_overrides_compose, group_choice, read_json, run_jobs,
                                split_overrides)
from diffseg.utils.outputs import atomic_write_text, markdown_table, write_json

GRIDS = REPO / "ablation_grids"
EXPECTATIONS = ("higher", "lower", "similar", "not_higher", "not_lower")
OWN = {"ablation": None, "seeds": 3, "out": None, "jobs": 1, "variants": None}


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


def agreement(expect: str | None, delta: float, tolerance: float) -> str:
    """Does a difference ``delta`` (variant mean - reference mean) agree with the paper's direction?"""
    if expect is None or math.isnan(delta):
        return "—"
    ok = {
        "higher": delta > tolerance, "lower": delta < -tolerance, "similar": abs(delta) <= tolerance,
        "not_higher": delta <= tolerance, "not_lower": delta >= -tolerance,
    }[expect]
    return "yes" if ok else "no"


class Ablation:
    def __init__(self, argv: Sequence[str]):
        own, self.overrides = split_overrides(argv, OWN)
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
        v = self.grid["variants"][variant]
        if v.get("metric_prefix"):
            metric = metric.replace("test/", f"test/{v['metric_prefix']}", 1)
            run = self.run_dir(self.source(variant), seed)
        else:
            run = self.run_dir(variant, seed)
        return float(read_json(run / "metrics.json").get(metric, math.nan))

    def summarise(self) -> str:
        metrics, ref, tol = self.grid["metrics"], self.grid["reference"], float(self.grid.get("tolerance", 0.0))
        per_seed = [{"variant": name, "seed": s, **{m: self.value(name, s, m) for m in metrics}}
                    for name in self.grid["variants"] for s in self.seeds]
        with open(self.out / "ablation.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["variant", "seed", *metrics])
            writer.writeheader()
            writer.writerows(per_seed)

        def stats(name, m):
            vals = [r[m] for r in per_seed if r["variant"] == name and not math.isnan(r[m])]
            if not vals:
                return math.nan, math.nan
            return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

        judged = metrics[0]
        ref_mean = stats(ref, judged)[0]
        rows = []
        for name, v in self.grid["variants"].items():
            row: dict[str, Any] = {"variant": name}
            for m in metrics:
                mean, sd = stats(name, m)
                row[m] = "n/a" if math.isnan(mean) else f"{mean:.4f} ± {sd:.4f}"
            delta = stats(name, judged)[0] - ref_mean
            row[f"Δ {judged}"] = "" if name == ref else f"{delta:+.4f}"
            row["paper"] = v.get("paper", "")
            row["expected"] = v.get("expect") or ("reference" if name == ref else "")
            row["agrees"] = "" if name == ref else agreement(v.get("expect"), delta, tol)
            rows.append(row)
        columns = ["variant", *metrics, f"Δ {judged}", "paper", "expected", "agrees"]
        judged_rows = [r for r in rows if r["agrees"] in ("yes", "no")]
        agree = sum(r["agrees"] == "yes" for r in judged_rows)
        text = (
            f"# Ablation `{self.name}`: experiment={self.grid['experiment']}\n\n"
            f"- overrides: `{' '.join(self.base[1:])}`\n- seeds: {self.seeds} (mean ± sd over seeds)\n"
            f"- judged metric: `{judged}` against the reference variant `{ref}`; \"similar\" means |Δ| ≤ {tol}\n"
            f"- agreement with the paper's direction: {agree} of {len(judged_rows)} variants\n"
            f"- runs: `{self.out}/<variant>/seed<s>/` (metrics.json, config.yaml, checkpoints)\n\n"
            + markdown_table(rows, columns)
        )
        atomic_write_text(self.out / "ablation.md", text)
        return text


def ablate(argv: Sequence[str]) -> str:
    ablation = Ablation(argv)
    ablation.out.mkdir(parents=True, exist_ok=True)
    ablation.check()
    run_jobs(ablation.jobs_to_run(), parallel=ablation.jobs)
    text = ablation.summarise()
    print(text)
    return text
