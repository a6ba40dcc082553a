"""Write a high-resolution refinement case: shapes2d images much larger than a SegRefiner's training size, their
masks, and coarse masks as a low-resolution segmenter would give them (a coarse mask made at the model size
and enlarged with nearest interpolation: blocky boundaries, plus the training perturbations).

    python scripts/highres_shapes.py --out DIR [--size 512] [--model-size 64] [--cases 8] [--seed 1]
    python scripts/refine.py ckpt=RUN/checkpoints/best.ckpt images=DIR/images masks=DIR/masks \
        coarse=DIR/coarse out=OUT            # global pass + local patches (local=false: sliding window)

refine.py then prints coarse, global-pass-only and refined IoU / mBA and the local patches per image.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.data.coarse import make_coarse_mask  # noqa: E402
from diffseg.data.synthetic import write_shapes2d  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--model-size", type=int, default=64, help="the SegRefiner's training size")
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1, help="shapes2d seed (the tiny runs train on seed 0)")
    parser.add_argument("--iou-target", type=float, default=0.8, help="coarse-mask perturbation at the model size")
    args = parser.parse_args()
    if args.size <= args.model_size:
        parser.error(f"--size {args.size} must exceed --model-size {args.model_size} (the local pass needs it)")
    root = write_shapes2d(args.out, num_cases=args.cases, size=args.size, seed=args.seed)
    (root / "coarse").mkdir(exist_ok=True)
    for i, path in enumerate(sorted((root / "masks").glob("*.png"))):
        gt = torch.as_tensor(np.asarray(Image.open(path)) > 0, dtype=torch.float32)[None, None]
        small = F.interpolate(gt, size=(args.model_size,) * 2, mode="area")[0, 0].numpy() >= 0.5
        coarse = make_coarse_mask(small, np.random.default_rng([args.seed, i]), iou_target=args.iou_target)
        big = F.interpolate(torch.as_tensor(coarse, dtype=torch.float32)[None, None], size=(args.size,) * 2,
                            mode="nearest")[0, 0].numpy()
        Image.fromarray((big > 0.5).astype(np.uint8) * 255).save(root / "coarse" / path.name)
    print(f"wrote {args.cases} cases of {args.size}x{args.size} to {root}/ (images, masks, coarse)")


if __name__ == "__main__":
    main()
