"""Refine another model's masks with a SegRefiner checkpoint:

    python scripts/refine.py ckpt=RUN/checkpoints/best.ckpt images=DIR coarse=DIR out=DIR [masks=DIR] [steps=K] [local=false]

Pairs images and coarse masks by file stem, writes OUT/<stem>.png (0/255); with masks= prints coarse vs
refined IoU (pooled), mBA and boundary F and writes OUT/refine_metrics.json. Options: experiments/refine.yaml.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.entry_points import refine  # noqa: E402 - also the console command diffseg-refine

if __name__ == "__main__":
    refine()
