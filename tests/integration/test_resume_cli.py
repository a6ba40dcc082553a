"""A killed run resumes to the uninterrupted run's result (docs/methods.md §6, "Resuming").

One SegDiff run (it has an EMA of the weights) is trained three ways from the same seed: uninterrupted;
SIGKILLed after its first periodic checkpoint, resumed, stopped by SIGTERM (a cluster's pre-emption) in the
middle of an epoch, resumed again to the end. The final weights (the EMA copy included), the optimiser state
and the test metrics must equal the uninterrupted run's.

Tolerance: the same code on the same machine and thread count is deterministic on CPU, so the runs agree to
float32 rounding (1e-6); a resume that retrains from scratch would also match, which is why the test also
checks that each resumed process restored its checkpoint and trained only the remaining steps.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_metrics, run_script

pytestmark = pytest.mark.slow

STEPS = 30
ARGS = ["experiment=segdiff_folder2d", "data=shapes2d", "scale=tiny", f"trainer.max_steps={STEPS}",
        "trainer.val_check_interval=15", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=2",
        "checkpoint_every=10", "trainer.log_every_n_steps=1", "model.sampling.steps=2",
        "model.sampling.num_samples=1", "logger=csv", "trainer.enable_progress_bar=false"]


def _step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - not written yet (the save is atomic, so never half a file)
        return -1


def _start(out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, DIFFSEG_CACHE=str(cache), WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(REPO / "scripts/fit.py"), *ARGS, *extra, f"hydra.run.dir={out}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, ckpt: Path, at_least: int, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        step = _step(ckpt) if ckpt.is_file() else -1
        if step >= at_least:
            return step
        assert proc.poll() is None, f"the run ended before step {at_least}:\n{proc.stdout.read()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint at step >= {at_least} within {timeout} s")


def _trained_steps(log: str) -> list[int]:
    """Steps at which this process logged a training loss (log_every_n_steps=1)."""
    import re

    return [int(m) for m in re.findall(r"^train_step (\d+)$", log, flags=re.M)]


def test_resume_after_sigkill_and_sigterm_equals_the_uninterrupted_run(tmp_path, cache_dir):
    reference = tmp_path / "reference"
    run_script("fit.py", *ARGS, f"hydra.run.dir={reference}", cache=cache_dir)

    out = tmp_path / "interrupted"
    last = out / "checkpoints" / "last.ckpt"
    # 1. SIGKILL (the node died): nothing is saved at the kill, the run restarts from the step-10 checkpoint
    first = _start(out, cache_dir)
    _wait_for_step(first, last, 10)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = _step(last)
    assert 10 <= killed_at < STEPS and not (out / "metrics.json").exists()
    wandb_id = (out / ".wandb_id").read_text() if (out / ".wandb_id").exists() else None
    # a new run (resume=false) never starts in, or silently continues, a folder that holds a run
    fresh = run_script("fit.py", *ARGS, f"hydra.run.dir={out}", cache=cache_dir, check=False)
    assert fresh.returncode == 2 and "resume=true" in fresh.stderr and "Traceback" not in fresh.stderr, fresh.stderr
    assert _step(last) == killed_at

    # 2. resumed, then SIGTERM (pre-emption) mid-epoch: last.ckpt holds the step it reached
    second = _start(out, cache_dir, "resume=true")
    _wait_for_step(second, last, killed_at + 10)  # the next periodic checkpoint: training went on
    time.sleep(1.0)
    second.send_signal(signal.SIGTERM)
    log2, _ = second.communicate(timeout=300)
    assert second.returncode == 143 and "resume=true" in log2, log2[-3000:]
    assert f"Restoring states from the checkpoint path at {last}" in log2, log2[-3000:]
    stopped_at = _step(last)
    assert killed_at + 10 <= stopped_at < STEPS, stopped_at

    # 3. resumed to the end
    third = run_script("fit.py", *ARGS, "resume=true", f"hydra.run.dir={out}", cache=cache_dir)
    assert f"Restoring states from the checkpoint path at {last}" in third.stdout + third.stderr

    ref = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    got = torch.load(last, map_location="cpu", weights_only=False)
    assert ref["global_step"] == got["global_step"] == STEPS
    assert ref["state_dict"].keys() == got["state_dict"].keys()
    assert any(k.startswith("ema.") for k in got["state_dict"]), "the EMA copy is part of the comparison"
    for key, value in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for a, b in zip(ref["optimizer_states"][0]["state"].values(), got["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(b["exp_avg"], a["exp_avg"], rtol=0, atol=1e-6)
    m_ref, m_got = read_metrics(reference), read_metrics(out)
    assert m_ref.keys() == m_got.keys()
    assert all(abs(m_ref[k] - m_got[k]) < 1e-6 for k in m_ref), {k: (m_ref[k], m_got[k]) for k in m_ref}
    if wandb_id is not None:
        assert (out / ".wandb_id").read_text() == wandb_id  # the same W&B run continued
