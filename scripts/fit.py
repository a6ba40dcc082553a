"""Train and test one model: python scripts/fit.py experiment=NAME [key=value ...]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import fit  # noqa: E402 - also the console command diffseg-fit

if __name__ == "__main__":
    fit()
