"""scripts/ablate.py and scripts/compare.py end to end at tiny scale. The training runs are cut short
(trainer.max_steps): these tests check the drivers (grids, seeds, resumption, one split for every model,
the leaderboard and its plot); the learning of each model is tested in its own test file."""
from __future__ import annotations

import csv
import json

import pytest
import yaml

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
    out = tmp_path / "imgx"
    proc = run_script("ablate.py", "ablation=imgx", "variants=[epsilon]", "seeds=1", "launcher=submitit_local",
                      "hydra.launcher.timeout_min=20", f"out={out}", *SHORT, cache=cache_dir)
    assert proc.stdout.count("[ok  ]") == 2
    assert list((out / ".submitit").glob("*/*_submitted.pkl")), "no submitit job"
    for variant in ("baseline", "epsilon"):
        assert read_metrics(out / variant / "seed0")["test/num_cases"] == 5
    prediction = yaml.safe_load((out / "epsilon" / "seed0" / "config.yaml").read_text())["model"]["diffusion"]["prediction"]
    assert prediction == "epsilon"
    assert "| epsilon | 1 |" in (out / "ablation.md").read_text()


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
    # reused when run again: nothing trains twice
    again = run_script("compare.py", *args, *SHORT, cache=cache_dir)
    assert again.stdout.count("[done]") == 6
