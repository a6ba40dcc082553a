"""Error paths a user meets, end to end: NaN data (check_data=full finds it, check_data=fast|off lets it
through and the first NaN loss stops training with TrainingDiverged). Each ends with one ``error:``
message naming what is wrong, status 2, no traceback. (A broken splits.json and a foreign checkpoint:
tests/unit/test_error_paths.py.)"""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from conftest import run_script

pytestmark = pytest.mark.slow

COMMON = ["experiment=unet_brats", "data=brats", "scale=tiny", "logger=none", "trainer.max_steps=2",
          "trainer.enable_progress_bar=false"]


def _user_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, proc.stderr[-3000:]
    return "\n".join(lines[starts[0]:])  # the message (a data-set check lists one problem per line)


@pytest.fixture(scope="module")
def nan_brats(tmp_path_factory):
    """6 BraTS cases whose flair volume holds one NaN voxel inside the brain."""
    from diffseg.data.synthetic import write_brats_synthetic

    root = tmp_path_factory.mktemp("nan_brats") / "brats"
    write_brats_synthetic(root, num_cases=6, shape=(32, 32, 32), seed=2)
    (root / ".diffseg_synthetic.json").unlink(missing_ok=True)
    for case in sorted(p for p in root.iterdir() if p.is_dir()):
        path = case / f"{case.name}_flair.nii.gz"
        img = nib.load(path)
        data = np.asarray(img.dataobj, dtype=np.float32).copy()
        data[16, 16, 16] = np.nan
        nib.save(nib.Nifti1Image(data, img.affine, img.header), path)
    return root


def test_check_data_full_finds_nan_voxels_fast_does_not(nan_brats, tmp_path, cache_dir):
    full = run_script("fit.py", *COMMON, f"data.root={nan_brats}", "check_data=full",
                      f"hydra.run.dir={tmp_path}/full", cache=cache_dir, check=False)
    message = _user_error(full)
    assert "_flair.nii.gz" in message and "finite" in message, message
    assert not (tmp_path / "full" / "checkpoints").exists()  # stopped before training


@pytest.mark.parametrize("check_data", ["fast", "off"])
def test_nan_loss_stops_training_with_training_diverged(check_data, nan_brats, tmp_path, cache_dir):
    proc = run_script("fit.py", *COMMON, f"data.root={nan_brats}", f"check_data={check_data}",
                      f"hydra.run.dir={tmp_path}/run", cache=cache_dir, check=False)
    message = _user_error(proc)
    assert "training loss became nan at step 0" in message and "model.optimizer.lr" in message, message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_check_data_rejects_an_unknown_mode(nan_brats, tmp_path, cache_dir):
    proc = run_script("fit.py", *COMMON, f"data.root={nan_brats}", "check_data=thorough",
                      f"hydra.run.dir={tmp_path}/run", cache=cache_dir, check=False)
    assert "check_data" in _user_error(proc)


