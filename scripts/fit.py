"""Train and test one model: python scripts/fit.py experiment=NAME [key=value ...]"""
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.cli import run_cli  # noqa: E402


@hydra.main(version_base="1.3", config_path="../experiments", config_name="fit")
def main(cfg: DictConfig) -> float:
    from diffseg.drivers.run import fit

    metrics = run_cli(fit, cfg)
    return metrics[cfg.optimized_metric]  # a validation metric, for Hydra sweepers (never a test one)


if __name__ == "__main__":
    main()
