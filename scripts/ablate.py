"""Reproduce a paper's ablation grid: python scripts/ablate.py ablation=imgx|segdiff|segrefiner [seeds=3]
[scale=tiny] [jobs=2] [launcher=joblib|submitit_local|submitit_slurm] [hydra.launcher.KEY=VALUE ...] [out=DIR]
[summary_only=true] [data overrides / any fit.py override]

Hands scripts/fit.py runs per (variant, seed) to a Hydra launcher, into OUT/<variant>/seed<s> (default OUT:
outputs/ablate/<name>_<scale>), skips finished runs, resumes interrupted ones, and writes OUT/ablation.md and
OUT/ablation.csv (mean over cases with 95% bootstrap CI, sd over seeds, paired difference to the reference
with its CI and Wilcoxon p, verdict from the CI; docs/methods.md §6).
Grids: ablation_grids/<name>.yaml.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import ablate  # noqa: E402 - also the console command diffseg-ablate

if __name__ == "__main__":
    ablate()
