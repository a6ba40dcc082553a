"""The pieces of the sweep / ablation / comparison drivers that need no training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import csv

import numpy as np
from scipy import stats

from diffseg.drivers.ablate import Ablation, load_grid
from diffseg.drivers.compare import Comparison, parse_entries
from diffseg.drivers.statistics import verdict
from diffseg.drivers.sweep import _int_list, cell_metrics, sweep_keys
from diffseg.utils.checkpoint import resolve_checkpoint
from diffseg.utils.errors import ConfigError
import diffseg.drivers.jobs as jobs_module
from diffseg.drivers.jobs import (Job, JobFailed, compose_launch_config, group_choice, launcher_overrides, run_jobs,
                                  split_launcher_overrides, split_overrides)

RESULTS = {"test/dice": 0.9, "test/iou": 0.8, "test/samples/1/dice": 0.7, "test/samples/1/iou": 0.6,
           "test/samples/2/dice": 0.9, "test/step/3/dice": 0.5}


def test_cell_metrics_reads_the_running_mean_of_k_samples():
    assert cell_metrics(RESULTS, 2, 2) == {"dice": 0.9, "iou": 0.8}
    assert cell_metrics(RESULTS, 1, 2) == {"dice": 0.7, "iou": 0.6}
    with pytest.raises(RuntimeError, match="samples/3"):
        cell_metrics(RESULTS, 3, 4)


def test_sweep_keys_and_lists():
    assert sweep_keys(OmegaConf.create({"sampling": {"steps": 5, "num_samples": 1}})) == \
        ("sampling.steps", "sampling.num_samples")
    assert sweep_keys(OmegaConf.create({"refine": {"steps": None}})) == ("refine.steps", None)
    with pytest.raises(ConfigError, match="no sampling steps to sweep"):
        sweep_keys(OmegaConf.create({"_target_": "diffseg.models.baseline.UNetSegmenter"}))
    assert _int_list(OmegaConf.create([1, 2]), "sweep.steps") == [1, 2] and _int_list(None, "x") is None
    for bad in ([0], [1.5], []):
        with pytest.raises(ConfigError, match="sweep.samples"):
            _int_list(bad, "sweep.samples")


def test_split_overrides_keeps_the_rest_verbatim():
    own, rest = split_overrides(["ablation=imgx", "seeds=[0,4]", "data=brats", "data.root=/x y", "+a.b=1"],
                                {"ablation": None, "seeds": 3})
    assert own == {"ablation": "imgx", "seeds": [0, 4]}
    assert rest == ["data=brats", "data.root=/x y", "+a.b=1"]
    assert group_choice(rest, "data") == "brats" and group_choice(rest, "scale") is None
    with pytest.raises(ConfigError, match="cannot parse"):
        split_overrides(["a=[1,"], {})


def _recording_task(order: Path):
    """A stand-in for fit.py's task, run by the joblib launcher in this process (n_jobs=1): it appends its
    run directory's name to ``order`` and finishes the run (metrics.json), or fails when seed=13."""

    def task(cfg):
        out = Path(cfg.paths.output_dir)
        with open(order, "a") as handle:
            handle.write(f"{out.name} {cfg.seed} {cfg.resume}\n")
        if cfg.seed == 13:
            raise RuntimeError("boom")
        (out / "metrics.json").write_text("{}")

    return task


def test_run_jobs_launches_through_hydra_orders_dependencies_skips_finished_and_stops_on_failure(tmp_path,
                                                                                               monkeypatch):
    order = tmp_path / "order.txt"
    monkeypatch.setitem(jobs_module.TASKS, "fit", _recording_task(order))
    jobs = [Job("b", "fit.py", ["seed=2"], tmp_path / "b", after=["a"]), Job("a", "fit.py", ["seed=1"], tmp_path / "a")]
    run_jobs(jobs, parallel=1)
    assert order.read_text().split("\n")[:2] == ["a 1 False", "b 2 False"]  # b waited for a; each its own seed
    assert "seed=1" in (tmp_path / "a" / ".hydra" / "overrides.yaml").read_text()  # Hydra ran the job there
    run_jobs(jobs, parallel=1)  # finished: not run again
    assert len(order.read_text().split("\n")) == 3
    # an interrupted run (last.ckpt, no metrics.json) continues with resume=true
    (tmp_path / "c" / "checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "last.ckpt").write_bytes(b"")
    run_jobs([Job("c", "fit.py", ["seed=3"], tmp_path / "c")])
    assert order.read_text().split("\n")[2] == "c 3 True"
    failing = [Job("d", "fit.py", ["seed=13"], tmp_path / "d"), Job("e", "fit.py", ["seed=4"], tmp_path / "e", after=["d"])]
    with pytest.raises(JobFailed, match=r"d failed: RuntimeError\('boom'\)"):
        run_jobs(failing, parallel=1)
    assert not (tmp_path / "e").exists()  # its dependency failed: never started
    with pytest.raises(ConfigError, match="not scheduled"):
        run_jobs([Job("f", "fit.py", [], tmp_path / "f", after=["nope"])])
    with pytest.raises(ConfigError, match="launcher: expected one of joblib"):
        run_jobs(jobs, launcher="ray")


def test_launcher_overrides_compose_for_slurm(tmp_path):
    """The SLURM launcher composes with a grid's job and the user's hydra.launcher.* keys."""
    extra, rest = split_launcher_overrides(["hydra.launcher.partition=gpu", "scale=tiny", "hydra.launcher.gpus_per_node=1"])
    assert extra == ["hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1"] and rest == ["scale=tiny"]
    from hydra.core.global_hydra import GlobalHydra

    for launcher, target in [("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher"),
                             ("joblib", "JoblibLauncher")]:
        _, cfg = compose_launch_config("fit", launcher_overrides(launcher, 2, extra if "slurm" in launcher else []),
                                       tmp_path)
        GlobalHydra.instance().clear()
        assert cfg.hydra.launcher._target_.endswith(target)
        if launcher == "submitit_slurm":
            assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1
            assert str(tmp_path) in cfg.hydra.launcher.submitit_folder
        if launcher == "joblib":
            assert cfg.hydra.launcher.n_jobs == 2


def test_resolve_checkpoint_accepts_a_run_directory(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert resolve_checkpoint(tmp_path) == tmp_path  # nothing there: left for the caller's message
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best.ckpt"


def test_grids_are_valid_and_subsets_keep_their_sources(tmp_path):
    for name in ("imgx", "segdiff", "segrefiner"):
        grid = load_grid(name)
        assert grid["reference"] in grid["variants"] and grid["metrics"][0].startswith("test/")
        assert all(v.get("paper") for v in grid["variants"].values()), name
    ablation = Ablation(["ablation=segdiff", "variants=[one_sample]", f"out={tmp_path}"])
    assert list(ablation.grid["variants"]) == ["baseline", "one_sample"]
    assert ablation.base == ["experiment=segdiff_folder2d", "data=shapes2d"]  # the grid's data by default
    mine = Ablation(["ablation=segdiff", "data=folder2d", "data.root=/d", f"out={tmp_path}"])
    assert mine.base == ["experiment=segdiff_folder2d", "data=folder2d", "data.root=/d"]
    with pytest.raises(ConfigError, match="unknown"):
        Ablation(["ablation=segdiff", "variants=[nope]"])


def _write_cases(run: Path, values: dict[str, dict[str, float]], **outputs: dict[str, dict[str, float]]) -> None:
    """A run's test_cases.csv: {column: {case: value}} of the final output, and of other outputs by name."""
    run.mkdir(parents=True, exist_ok=True)
    columns = list(values)
    lines = ["case_id,output," + ",".join(columns)]
    for output, vals in {"final": values, **outputs}.items():
        lines += [f"{c},{output}," + ",".join(repr(vals[k][c]) for k in columns) for c in vals[columns[0]]]
    (run / "test_cases.csv").write_text("\n".join(lines) + "\n")


def _scipy_row(per_seed, reference=None):
    """The oracle: scipy.stats on the per-case values, written out here (seed means per case, then cases)."""
    cases = sorted(per_seed[0])
    x = np.array([[s[c] for c in cases] for s in per_seed]).mean(0)
    ci = stats.bootstrap((x,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                         rng=np.random.default_rng(0)).confidence_interval
    out = {"": x.mean(), "_ci_low": ci.low, "_ci_high": ci.high,
           "_sd_seeds": np.std([np.mean([s[c] for c in cases]) for s in per_seed], ddof=1)}
    if reference is not None:
        d = x - np.array([[s[c] for c in cases] for s in reference]).mean(0)
        ci = stats.bootstrap((d,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        out.update({"_diff": d.mean(), "_diff_ci_low": ci.low, "_diff_ci_high": ci.high,
                    "_p": stats.wilcoxon(d).pvalue})
    return out


RNG = np.random.default_rng(5)
CASES = [f"case{i}" for i in range(8)]


def _cases(center, spread=0.05):
    return {c: float(v) for c, v in zip(CASES, center + spread * RNG.standard_normal(len(CASES)))}


def test_ablation_table_is_scipy_on_the_per_case_values_and_judges_by_the_ci(tmp_path):
    ablation = Ablation(["ablation=segrefiner", "seeds=2", "variants=[coarse_input,coarse_hard,steps_3]",
                         f"out={tmp_path}"])
    iou = {(v, s): _cases(c) for (v, c) in [("baseline", 0.8), ("coarse_hard", 0.6), ("steps_3", 0.8)]
           for s in (0, 1)}
    for (variant, seed), values in iou.items():
        run = tmp_path / variant / f"seed{seed}"
        _write_cases(run, {"iou": values, "mba": _cases(0.5)}, coarse={"iou": _cases(0.6), "mba": _cases(0.4)})
        (run / "metrics.json").write_text(json.dumps({"test/iou": float(np.mean(list(values.values())))}))
    text = ablation.summarise()
    rows = {r["variant"]: r for r in csv.DictReader(open(tmp_path / "ablation.csv"))}
    ref = [iou["baseline", s] for s in (0, 1)]
    for variant in ("baseline", "coarse_hard", "steps_3"):
        expected = _scipy_row([iou[variant, s] for s in (0, 1)], None if variant == "baseline" else ref)
        for suffix, value in expected.items():
            assert float(rows[variant][f"test/iou{suffix}"]) == pytest.approx(value, rel=1e-12), (variant, suffix)
    # coarse_input (metric_prefix coarse_) reads the reference runs' rows of the output "coarse"
    coarse = [{r["case_id"]: float(r["iou"]) for r in csv.DictReader(open(tmp_path / "baseline" / f"seed{s}" /
                                                                          "test_cases.csv")) if r["output"] == "coarse"}
              for s in (0, 1)]
    assert float(rows["coarse_input"]["test/iou"]) == pytest.approx(_scipy_row(coarse)[""])
    # verdicts from the CI of the difference: 0.2 lower (CI excludes 0) agrees with "lower"; steps_3 is the
    # reference up to noise, judged by where scipy's CI of its difference lies
    assert rows["coarse_hard"]["verdict"] == "agrees" and rows["coarse_input"]["verdict"] == "agrees"
    steps = _scipy_row([iou["steps_3", s] for s in (0, 1)], ref)
    assert rows["steps_3"]["verdict"] == verdict("not_higher", steps["_diff_ci_low"], steps["_diff_ci_high"], 0.01)
    assert "| coarse_hard | 2 |" in text and "Wilcoxon" in text and (tmp_path / "ablation_seeds.csv").is_file()


def test_verdict_from_the_confidence_interval():
    assert verdict("lower", -0.05, -0.01, 0.02) == "agrees" and verdict("lower", 0.01, 0.05, 0.02) == "disagrees"
    assert verdict("lower", -0.05, 0.01, 0.02) == "inconclusive"
    assert verdict("higher", 0.01, 0.05, 0.02) == "agrees" and verdict("higher", -0.01, 0.05, 0.02) == "inconclusive"
    assert verdict("similar", -0.01, 0.015, 0.02) == "agrees" and verdict("similar", 0.03, 0.05, 0.02) == "disagrees"
    assert verdict("similar", -0.01, 0.05, 0.02) == "inconclusive"
    assert verdict("not_higher", -0.2, 0.01, 0.02) == "agrees" and verdict("not_higher", 0.03, 0.1, 0.02) == "disagrees"
    assert verdict("not_lower", -0.01, 0.2, 0.02) == "agrees" and verdict("not_lower", -0.1, -0.03, 0.02) == "disagrees"
    assert verdict(None, 0.0, 0.1, 0.02) == "—"


def test_leaderboard_csv_cis_and_p_values_are_scipys_on_the_runs_cases(tmp_path):
    """Must-show: the CIs and p-values in leaderboard.csv equal scipy's on the per-case values of the runs."""
    comparison = Comparison(["experiments=[unet_brats,imgx_brats]", "seeds=3", f"out={tmp_path}"])
    dice = {(n, s): _cases(c) for n, c in [("unet_brats", 0.7), ("imgx_brats", 0.75)] for s in range(3)}
    for (name, seed), values in dice.items():
        run = tmp_path / name / f"seed{seed}"
        _write_cases(run, {"dice": values, "dice/wt": _cases(0.8), "hd95": _cases(5.0, 1.0)})
        (run / "metrics.json").write_text(json.dumps({"test/dice": 0.0, "test/dice/wt": 0.0, "test/hd95": 0.0,
                                                      "test/ece": 0.1 * (seed + 1)}))  # ece: pooled, no per-case value
        (run / "run_info.json").write_text(json.dumps({"parameters": 10, "train_seconds": 2.0 + seed,
                                                       "test_seconds_per_case": 0.5, "peak_memory_mb": 100}))
        (run / "config.yaml").write_text("budget_name: family_3d\ntrainer: {max_steps: 96}\ndata: {batch_size: 2}\n"
                                         "model: {optimizer: {lr: 0.003}}\n")
    comparison.leaderboard()
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "leaderboard.csv"))}
    ref = [dice["unet_brats", s] for s in range(3)]
    for name in ("unet_brats", "imgx_brats"):
        expected = _scipy_row([dice[name, s] for s in range(3)], None if name == "unet_brats" else ref)
        for suffix, value in expected.items():
            assert float(rows[name][f"dice{suffix}"]) == pytest.approx(value, rel=1e-12), (name, suffix)
        assert rows[name]["budget"] == "family_3d" and rows[name]["updates"] == "96" and rows[name]["batch"] == "2"
        assert float(rows[name]["lr"]) == 0.003 and float(rows[name]["train_seconds"]) == 3.0  # mean over seeds
    assert rows["unet_brats"]["dice_p"] == ""  # the reference row has no paired columns
    # a pooled metric: mean and sd over seeds of metrics.json, no CI over cases
    assert float(rows["imgx_brats"]["ece"]) == pytest.approx(0.2) and float(rows["imgx_brats"]["ece_sd_seeds"]) == \
        pytest.approx(0.1) and rows["imgx_brats"]["ece_ci_low"] in ("", "nan")
    assert list(rows) == ["imgx_brats", "unet_brats"]  # sorted by dice


def test_compare_entries():
    assert parse_entries(["unet_folder2d", "segrefiner_folder2d@unet_folder2d"]) == \
        [("unet_folder2d", None), ("segrefiner_folder2d", "unet_folder2d")]
    with pytest.raises(ConfigError, match="unknown"):
        parse_entries(["nope"])
    with pytest.raises(ConfigError, match="which experiments"):
        parse_entries(None)
