"""Compare methods on one split: python scripts/compare.py experiments=[unet_brats,unet_sdn_brats,imgx_brats,segdiff_brats]
[scale=tiny] [seeds=3] [reference=NAME] [jobs=2] [launcher=joblib|submitit_local|submitit_slurm] [metric=dice]
[out=DIR] [data overrides / any fit.py override]

2D: experiments=[unet_folder2d,unet_sdn_folder2d,segdiff_folder2d,segrefiner_folder2d@unet_folder2d]
(REFINER@SOURCE: SegRefiner refining SOURCE's test predictions). Trains each model (finished runs in OUT
are reused), then writes OUT/leaderboard.md, OUT/leaderboard.csv (statistics over cases and seeds, each row's
budget; docs/methods.md §6) and OUT/quality_vs_cost.png.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import compare  # noqa: E402 - also the console command diffseg-compare

if __name__ == "__main__":
    compare()
