"""Test a trained checkpoint: python scripts/evaluate.py ckpt=DIR/checkpoints/best.ckpt (or ckpt=DIR: the run's best, else
last, checkpoint) [+overrides.KEY=VALUE ...] [sweep.steps=[..] sweep.samples=[..]]"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.cli import run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="../experiments", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from diffseg.drivers.run import evaluate

    run_cli(evaluate, cfg)


if __name__ == "__main__":
    main()
