"""Test a trained checkpoint: python scripts/evaluate.py ckpt=DIR/checkpoints/best.ckpt (or ckpt=DIR: the run's best, else
last, checkpoint) [+overrides.KEY=VALUE ...] [sweep.steps=[..] sweep.samples=[..]]"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import evaluate  # noqa: E402 - also the console command diffseg-evaluate

if __name__ == "__main__":
    evaluate()
