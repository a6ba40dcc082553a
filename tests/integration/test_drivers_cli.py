"""scripts/ablate.py and scripts/compare.py end to end at tiny scale. The training runs are cut short
(trainer.max_steps): these tests check the drivers (grids, seeds, resumption, one split for every model,
the leaderboard and its plot); the learning of each model is tested in its own test file."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from scipy import stats

from conftest import read_metrics, run_script
from diffseg.drivers.ablate import Ablation
from diffseg.drivers.statistics import metric_columns, read_case_values

pytestmark = pytest.mark.slow

SHORT = ["scale=tiny", "trainer.max_steps=4", "logger=none", "trainer.enable_progress_bar=false"]


def test_ablate_writes_the_table_and_does_not_rerun_finished_cells(tmp_path, cache_dir):
    out = tmp_path / "ablation"
    args = ["ablation=segrefiner", "seeds=2", "variants=[coarse_input,steps_3]", "jobs=2", f"out={out}", *SHORT]
    first = run_script("ablate.py", *args, cache=cache_dir)
    assert first.stdout.count("[ok  ]") == 4  # baseline and steps_3, 2 seeds each; coarse_input reads baseline
    table = (out / "ablation.md").read_text()
    for variant in ("baseline", "coarse_input", "steps_3"):
        assert f"| {variant} | 2 |" in table
    assert "| variant | seeds | test/iou | test/mba |" in table and "paper" in table and "verdict" in table
    rows = list(csv.DictReader(open(out / "ablation_seeds.csv")))
    assert [(r["variant"], r["seed"]) for r in rows] == [(v, s) for v in ("baseline", "coarse_input", "steps_3")
                                                          for s in ("0", "1")]
    # the values are the runs' own metrics; coarse_input is the reference runs' test/coarse_iou
    assert float(rows[0]["test/iou"]) == read_metrics(out / "baseline" / "seed0")["test/iou"]
    assert float(rows[2]["test/iou"]) == read_metrics(out / "baseline" / "seed0")["test/coarse_iou"]
    summary = {r["variant"]: r for r in csv.DictReader(open(out / "ablation.csv"))}
    assert summary["steps_3"]["verdict"] in ("agrees", "disagrees", "inconclusive")
    assert float(summary["steps_3"]["test/iou_ci_low"]) <= float(summary["steps_3"]["test/iou"]) <= \
        float(summary["steps_3"]["test/iou_ci_high"])
    seeds = {yaml.safe_load((out / "steps_3" / f"seed{s}" / "config.yaml").read_text())["seed"] for s in (0, 1)}
    assert seeds == {0, 1}

    # started again: nothing re-runs; one deleted result: only that cell runs (from its last checkpoint)
    mtime = (out / "baseline" / "seed0" / "metrics.json").stat().st_mtime
    again = run_script("ablate.py", *args, cache=cache_dir)
    assert again.stdout.count("[done]") == 4 and "[run ]" not in again.stdout
    (out / "steps_3" / "seed1" / "metrics.json").unlink()
    third = run_script("ablate.py", *args, cache=cache_dir)
    assert third.stdout.count("[run ]") == 1 and "steps_3/seed1" in third.stdout and "resume=true" in third.stdout
    assert (out / "baseline" / "seed0" / "metrics.json").stat().st_mtime == mtime
    # other overrides into the same folder would mix two ablations: refused, nothing lost
    mixed = run_script("ablate.py", *args[:-4], "scale=tiny", "trainer.max_steps=5", cache=cache_dir, check=False)
    assert mixed.returncode == 2 and "other overrides" in mixed.stderr


def test_ablate_two_cell_grid_through_submitit_local(tmp_path, cache_dir):
    """The grid goes through Hydra's submitit launcher (the SLURM launcher's code path, run on this machine)."""
    out = tmp_path / "segrefiner"
    proc = run_script("ablate.py", "ablation=segrefiner", "variants=[steps_3]", "seeds=1", "launcher=submitit_local",
                      "hydra.launcher.timeout_min=20", f"out={out}", *SHORT, cache=cache_dir)
    assert proc.stdout.count("[ok  ]") == 2
    assert len(list((out / ".submitit").glob("*/*_submitted.pkl"))) == 2  # one submitit job per cell
    for variant in ("baseline", "steps_3"):
        assert "test/iou" in read_metrics(out / variant / "seed0")
    assert "+ablation=segrefiner_steps3" in (out / "steps_3" / "seed0" / ".hydra" / "overrides.yaml").read_text()
    assert "| steps_3 | 1 |" in (out / "ablation.md").read_text()


def test_ablate_grids_and_errors(tmp_path, cache_dir):
    # every shipped grid: variants compose, `from` variants wait for their source run
    for name in ("imgx", "segdiff", "segrefiner"):
        ablation = Ablation([f"ablation={name}", "seeds=2", "scale=tiny", f"out={tmp_path / name}"])
        ablation.check()
        jobs = {j.name: j for j in ablation.jobs_to_run()}
        assert "baseline/seed1" in jobs
        for job in jobs.values():
            assert set(job.after) <= set(jobs)
    segdiff = {j.name: j for j in Ablation(["ablation=segdiff", "seeds=1", f"out={tmp_path}/s"]).jobs_to_run()}
    assert segdiff["sampling_steps_10/seed0"].script == "evaluate.py"
    assert segdiff["sampling_steps_10/seed0"].after == ["baseline/seed0"]
    assert "one_sample/seed0" not in segdiff  # read from the reference run's samples/1 metrics
    proc = run_script("ablate.py", "ablation=nope", cache=cache_dir, check=False)
    assert proc.returncode == 2 and "expected one of ['imgx', 'segdiff', 'segrefiner']" in proc.stderr
    proc = run_script("ablate.py", "ablation=imgx", "model.diffusion.train_stepz=3", f"out={tmp_path}/bad",
                      cache=cache_dir, check=False)
    assert proc.returncode == 2 and "train_stepz" in proc.stderr and "do not compose" in proc.stderr


def _check_leaderboard(out, methods, seeds):
    board = (out / "leaderboard.md").read_text()
    for method in methods:
        assert f"| {method} |" in board, method
    rows = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert sorted(r["method"] for r in rows) == sorted(methods)
    for r in rows:
        assert int(float(r["parameters"])) > 0 and float(r["train_seconds"]) > 0
        assert float(r["seconds_per_case"]) > 0 and float(r["peak_memory_mb"]) > 0
        assert int(r["updates"]) == 4 and int(r["batch"]) > 0 and float(r["lr"]) > 0 and r["budget"]
    assert (out / "quality_vs_cost.png").stat().st_size > 5000
    split = json.loads((out / "splits.json").read_text())
    trained = [p for p in out.rglob("splits.json") if p.parent != out]
    assert len(trained) == len(methods) * seeds
    for path in trained:  # every model trained on the one split
        assert json.loads(path.read_text()) == split, path
    return rows


def test_compare_2d_with_sdn_and_a_cascade(tmp_path, cache_dir):
    out = tmp_path / "cmp2d"
    run_script("compare.py", "experiments=[unet_folder2d,unet_sdn_folder2d,segrefiner_folder2d@unet_folder2d]",
               "data=shapes2d", "jobs=2", "seeds=1", f"out={out}", *SHORT, cache=cache_dir)
    rows = _check_leaderboard(out, ["unet_folder2d", "unet_sdn_folder2d", "segrefiner_folder2d@unet_folder2d"], 1)
    cascade = next(r for r in rows if r["method"].startswith("segrefiner"))
    unet = next(r for r in rows if r["method"] == "unet_folder2d")
    # the cascade refines the UNet's saved test masks: its coarse input IS the UNet's prediction
    refined = read_metrics(out / "segrefiner_folder2d@unet_folder2d" / "seed0")
    assert refined["test/coarse_iou"] == pytest.approx(read_metrics(out / "unet_folder2d" / "seed0")["test/iou"], abs=1e-6)
    assert float(cascade["seconds_per_case"]) > float(unet["seconds_per_case"])  # both models' time


def test_compare_3d_over_seeds_with_scipy_statistics(tmp_path, cache_dir):
    out = tmp_path / "cmp3d"
    args = ["experiments=[unet_brats,unet_sdn_brats,imgx_brats]", "data=brats_synthetic", "seeds=2", f"out={out}"]
    run_script("compare.py", *args, *SHORT, cache=cache_dir)
    rows = {r["method"]: r for r in _check_leaderboard(out, ["unet_brats", "unet_sdn_brats", "imgx_brats"], 2)}
    assert {"dice", "hd95", "dice/wt", "dice/tc", "dice/et"} <= set(next(iter(rows.values())))
    assert {r["budget"] for r in rows.values()} == {"family_3d"}  # one budget for the 3D family
    # the CIs and p-values are scipy's on the runs' per-case values (the reference row: the first experiment)
    cases = {m: [read_case_values(out / m / f"seed{s}", "dice/wt") for s in (0, 1)] for m in rows}
    for m in ("unet_sdn_brats", "imgx_brats"):
        expected = metric_columns("dice/wt", cases[m], cases["unet_brats"])
        for key in ("dice/wt_ci_low", "dice/wt_ci_high", "dice/wt_p", "dice/wt_diff_ci_low"):
            assert float(rows[m][key]) == pytest.approx(expected[key], nan_ok=True), (m, key)
        # ... and directly scipy's on the per-case values averaged over seeds (paired with the reference row)
        ids = sorted(cases[m][0])
        mine = np.array([np.mean([seed[c] for seed in cases[m]]) for c in ids])
        ref = np.array([np.mean([seed[c] for seed in cases["unet_brats"]]) for c in ids])
        diffs = mine - ref
        if np.ptp(mine) > 0:
            ci = stats.bootstrap((mine,), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                                 rng=np.random.default_rng(0)).confidence_interval
            assert (float(rows[m]["dice/wt_ci_low"]), float(rows[m]["dice/wt_ci_high"])) == \
                pytest.approx((ci.low, ci.high)), m
        if np.any(diffs != 0):
            assert float(rows[m]["dice/wt_p"]) == pytest.approx(stats.wilcoxon(diffs).pvalue), m
    # every row's value is the mean over seeds of what each run wrote in its metrics.json
    for m, row in rows.items():
        for metric in ("dice/wt", "dice", "hd95"):
            runs = [read_metrics(out / m / f"seed{s}")[f"test/{metric}"] for s in (0, 1)]
            assert float(row[metric]) == pytest.approx(np.mean(runs), rel=1e-6), (m, metric)
    # reused when run again: nothing trains twice; metric= picks the sort, in that metric's direction
    again = run_script("compare.py", *args, "metric=hd95", *SHORT, cache=cache_dir)
    assert again.stdout.count("[done]") == 6
    by_hd95 = [float(r["hd95"]) for r in csv.DictReader(open(out / "leaderboard.csv"))]
    assert by_hd95 == sorted(by_hd95), by_hd95  # lower is better: ascending
    run_script("compare.py", *args, "metric=dice", *SHORT, cache=cache_dir)
    by_dice = [float(r["dice"]) for r in csv.DictReader(open(out / "leaderboard.csv"))]
    assert by_dice == sorted(by_dice, reverse=True), by_dice  # higher is better: descending
