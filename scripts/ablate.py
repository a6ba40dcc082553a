"""Reproduce a paper's ablation grid: python scripts/ablate.py ablation=imgx|segdiff|segrefiner [seeds=3]
[scale=tiny] [jobs=2] [out=DIR] [data overrides / any fit.py override]

Runs scripts/fit.py per (variant, seed) into OUT/<variant>/seed<s> (default OUT: outputs/ablate/<name>_<scale>),
skips finished runs, resumes interrupted ones, and writes OUT/ablation.md and OUT/ablation.csv.
Grids: ablation_grids/<name>.yaml.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import ablate  # noqa: E402 - also the console command diffseg-ablate

if __name__ == "__main__":
    ablate()
