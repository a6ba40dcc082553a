"""ImgX-DiffSeg end to end: the flagship command at tiny scale, re-sampling a checkpoint with other
steps/samples, the same experiment on MSD-layout data, and the message without a data root."""
from __future__ import annotations

import csv
import time

import pytest
import yaml

from conftest import read_metrics, run_script

pytestmark = pytest.mark.slow

TINY = ["experiment=imgx_brats", "data=brats_synthetic", "scale=tiny", "logger=csv"]
REGIONS = ("wt", "tc", "et")


@pytest.fixture(scope="module")
def imgx_run(tmp_path_factory, cache_dir):
    """python scripts/fit.py experiment=imgx_brats data=brats_synthetic scale=tiny (trained once)."""
    out = tmp_path_factory.mktemp("imgx_brats")
    start = time.perf_counter()
    proc = run_script("fit.py", *TINY, f"hydra.run.dir={out}", cache=cache_dir)
    print(f"imgx_brats tiny: {time.perf_counter() - start:.0f} s")
    return out, proc


def test_imgx_brats_tiny_learns_and_scores_every_step(imgx_run):
    out, proc = imgx_run
    m = read_metrics(out)
    assert m["test/dice/wt"] >= 0.7, m  # chance is ~0.1 on the 32^3 synthetic volumes
    steps = 5  # model.sampling.steps = model.diffusion.train_steps
    for k in range(1, steps + 1):
        for region in REGIONS:
            assert f"test/step/{k}/dice/{region}" in m, (k, region)
    assert m[f"test/step/{steps}/dice"] == m["test/dice"]  # the last step is the reported prediction
    assert "test/step/6/dice" not in m and not any(k.startswith("test/samples/") for k in m)  # 1 sample
    for key in ("test/hd95/wt", "test/nsd/wt", "test/dice/tc", "test/dice/et"):
        assert key in m, key
    with open(out / "csv" / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    # validation scores the final output only (it selects checkpoints); the per-step curve is a test output
    assert "val/step/1/dice" not in columns and "val/dice/wt" in columns
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"]["net"]["in_channels"] == 4 + 4 and cfg["model"]["net"]["channels"] == [8, 16, 32]
    assert "test/step/5/dice/wt" in proc.stdout


def test_checkpoint_sampled_with_other_steps_and_samples(imgx_run, tmp_path, cache_dir):
    out, _ = imgx_run
    ckpt = out / "checkpoints" / "best.ckpt"
    again = tmp_path / "same"
    run_script("evaluate.py", f"ckpt={ckpt}", f"hydra.run.dir={again}", cache=cache_dir)
    a, b = read_metrics(out), read_metrics(again)
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-6 for k in a)  # noise seeded per case
    other = tmp_path / "other"
    run_script("evaluate.py", f"ckpt={ckpt}", f"hydra.run.dir={other}", "+overrides.model.sampling.steps=10",
               "+overrides.model.sampling.num_samples=2", "+overrides.model.sampling.sampler=ddim",
               cache=cache_dir)
    m = read_metrics(other)
    assert {f"test/step/{k}/dice" for k in range(1, 11)} <= m.keys()
    assert {"test/samples/1/dice", "test/samples/2/dice"} <= m.keys() and "test/samples/3/dice" not in m
    assert m["test/step/10/dice"] == m["test/samples/2/dice"] == m["test/dice"]
    assert m["test/dice/wt"] >= 0.7, m  # trained with 5 steps, sampled with 10: no retraining needed


def test_missing_data_root_is_one_message(cache_dir, tmp_path):
    proc = run_script("fit.py", "experiment=imgx_brats", f"hydra.run.dir={tmp_path}", check=False, cache=cache_dir)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data.root is not set"), proc.stderr
    assert "BraTS" in lines[0] and "CASE/CASE_{t1,t1ce,t2,flair,seg}.nii.gz" in lines[0]
    assert "data=brats_synthetic" in lines[0] and "Traceback" not in proc.stderr


def test_multirun_over_sampling_steps_writes_one_metrics_per_job(tmp_path, cache_dir):
    """python scripts/fit.py -m ... model.sampling.steps=1,5: one job per value, each with its own
    metrics.json and the step count it was given (short training: this checks the sweep mechanics)."""
    run_script("fit.py", "-m", *TINY, "model.sampling.steps=1,5", "trainer.max_steps=4", "logger=none",
               f"hydra.sweep.dir={tmp_path}", cache=cache_dir)
    jobs = sorted(p.parent for p in tmp_path.glob("*/metrics.json"))
    assert [p.name for p in jobs] == ["0", "1"]
    for job, steps in zip(jobs, (1, 5)):
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["model"]["sampling"]["steps"] == steps
        metrics = read_metrics(job)
        assert f"test/step/{steps}/dice" in metrics and f"test/step/{steps + 1}/dice" not in metrics
