"""Verify a data set the way nnU-Net's integrity check does, and report every problem with its file.

    python scripts/check_data.py data=brats data.root=/data/BraTS2021 [check_data=full]

Exit status 0 when the data set is clean, 2 when a problem was found (all of them are listed).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import check_data  # noqa: E402 - also the console command diffseg-check-data

if __name__ == "__main__":
    check_data()
