"""Segment new data with a trained model (console entry point: diffseg-predict):

    python scripts/predict.py ckpt=RUN_DIR_OR_CKPT input=FOLDER out=DIR [coarse=DIR_OR_RUN] [trainer=gpu|ddp]

Writes OUT/<case>.nii.gz (2D: .png) in the input's grid and label values, uncertainty maps of sampling models,
OUT/summary.csv and OUT/plots/predict.png. Options: experiments/predict.yaml; details: diffseg/drivers/predict.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import predict  # noqa: E402 - also the console command diffseg-predict

if __name__ == "__main__":
    predict()
