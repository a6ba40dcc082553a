"""Verify a data set the way nnU-Net's integrity check does, and report every problem with its file.

    python scripts/check_data.py data=brats data.root=/data/BraTS2021 [check_data=full]

Exit status 0 when the data set is clean, 2 when a problem was found (all of them are listed).
"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.cli import run_cli  # noqa: E402


def check(cfg: DictConfig) -> None:
    from diffseg.drivers.run import build_datamodule

    dm = build_datamodule(cfg)
    mode = "fast" if cfg.check_data == "fast" else "full"
    dm.check(fast=mode == "fast")
    sizes = {k: len(v) for k, v in dm.splits.items()}
    print(f"ok: {dm.root} ({mode} check) - {sum(sizes.values())} cases {sizes}, {dm.spatial_dims}D, "
          f"{dm.in_channels} channels, classes {dm.class_names}")


@hydra.main(version_base="1.3", config_path="../experiments", config_name="fit")
def main(cfg: DictConfig) -> None:
    run_cli(check, cfg)


if __name__ == "__main__":
    # the check writes nothing: keep Hydra's run folder out of the way unless the user sets one
    if not any(a.startswith("hydra.run.dir") for a in sys.argv[1:]):
        sys.argv += ["hydra.run.dir=${oc.env:TMPDIR,/tmp}/diffseg_check_data", "hydra.output_subdir=null",
                     "hydra/job_logging=none", "hydra/hydra_logging=none"]
    if not any(a.startswith("check_data=") for a in sys.argv[1:]):
        sys.argv.append("check_data=full")
    main()
