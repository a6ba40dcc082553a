"""The pieces of the sweep / ablation / comparison drivers that need no training."""
from __future__ import annotations

import json
import sys

import pytest
from omegaconf import OmegaConf

from diffseg.drivers.ablate import Ablation, load_grid
from diffseg.drivers.compare import parse_entries
from diffseg.drivers.sweep import _int_list, cell_metrics, sweep_keys
from diffseg.utils.checkpoint import resolve_checkpoint
from diffseg.utils.errors import ConfigError
from diffseg.drivers.jobs import Job, JobFailed, group_choice, run_jobs, split_overrides

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


def _job(tmp_path, name, code, after=()):
    """A job whose 'script' is python -c CODE (Job.command is patched to run it)."""
    job = Job(name, "fit.py", [], tmp_path / name, after=list(after))
    job.command = lambda: [sys.executable, "-c", code]
    return job


def test_run_jobs_orders_dependencies_skips_finished_and_stops_on_failure(tmp_path):
    order = tmp_path / "order.txt"

    def writer(name):
        return (f"import json, pathlib; open({str(order)!r}, 'a').write({name!r} + '\\n'); "
                f"pathlib.Path({str(tmp_path / name)!r}, 'metrics.json').write_text('{{}}')")

    jobs = [_job(tmp_path, "b", writer("b"), after=["a"]), _job(tmp_path, "a", writer("a"))]
    run_jobs(jobs, parallel=2)
    assert order.read_text().split() == ["a", "b"]
    run_jobs(jobs, parallel=1)  # finished: not run again
    assert order.read_text().split() == ["a", "b"]
    failing = [_job(tmp_path, "c", "import sys; print('boom'); sys.exit(3)"),
               _job(tmp_path, "d", writer("d"), after=["c"])]
    with pytest.raises(JobFailed, match=r"(?s)c failed \(exit 3\).*boom"):
        run_jobs(failing, parallel=1)
    assert not (tmp_path / "d" / "metrics.json").exists()  # its dependency failed: never started
    with pytest.raises(ConfigError, match="not scheduled"):
        run_jobs([_job(tmp_path, "e", "pass", after=["nope"])])


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


def test_ablation_summary_judges_the_paper_direction(tmp_path):
    ablation = Ablation(["ablation=segrefiner", "seeds=2", "variants=[coarse_input,coarse_hard]", f"out={tmp_path}"])
    values = {("baseline", 0): 0.80, ("baseline", 1): 0.82, ("coarse_hard", 0): 0.70, ("coarse_hard", 1): 0.74}
    for (variant, seed), iou in values.items():
        run = tmp_path / variant / f"seed{seed}"
        run.mkdir(parents=True)
        metrics = {"test/iou": iou, "test/mba": 0.5, "test/coarse_iou": 0.6, "test/coarse_mba": 0.4}
        (run / "metrics.json").write_text(json.dumps(metrics))
    text = ablation.summarise()
    assert "| baseline | 0.8100 ± 0.0141 |" in text
    assert "| coarse_hard | 0.7200 ± 0.0283 |" in text and "| -0.0900 |" in text
    assert "| coarse_input | 0.6000 ± 0.0000 | 0.4000 ± 0.0000 | -0.2100 |" in text
    assert text.count("| yes |") == 2 and "2 of 2 variants" in text


def test_compare_entries():
    assert parse_entries(["unet_folder2d", "segrefiner_folder2d@unet_folder2d"]) == \
        [("unet_folder2d", None), ("segrefiner_folder2d", "unet_folder2d")]
    with pytest.raises(ConfigError, match="unknown"):
        parse_entries(["nope"])
    with pytest.raises(ConfigError, match="which experiments"):
        parse_entries(None)
