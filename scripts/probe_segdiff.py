"""Probe a trained SegDiff for the image-blind plateau (docs/methods.md §2):

    python scripts/probe_segdiff.py ckpt=DIR [bins=5] [split=test] [out=DIR/probe.json]

For the first ``cases`` cases of the split (resized/cropped to the patch size by the data pipeline) and
``bins`` equal ranges of t, with fixed noise:
- ``eps_mse``: the ε loss (mean of (ε̂ - ε)²) of the EMA network, the quantity the training minimises;
- ``x0_mse``: the squared error of the implied x̂0 = (x_t - sqrt(1-ᾱ)·ε̂)/sqrt(ᾱ), clamped to [-1, 1];
- ``swap``: the mean |x̂0(x_t, I) - x̂0(x_t, I')| where I' is another case's image (the batch rolled by
  one) and x_t is the same: 0 means the network ignores the image at these steps (image-blind);
- ``swap_vs_error``: swap / mean |x̂0(x_t, I) - x0|, the image's share of the prediction's variation.
Also the sampled prediction's change when the image is swapped (``sample_swap_iou``: IoU between the
predictions for I and I' with the same noise; 1 = the same blobs whatever the image).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.drivers.run import build_datamodule, load_model  # noqa: E402
from diffseg.models.base import FINAL  # noqa: E402
from diffseg.utils.checkpoint import resolve_checkpoint  # noqa: E402


def parse(argv: list[str]) -> dict:
    args = {"bins": "5", "split": "test", "cases": "16", "out": None}
    for a in argv:
        key, sep, value = a.partition("=")
        if not sep or key not in {"ckpt", *args}:
            raise SystemExit(f"expected KEY=VALUE with KEY in ckpt, {', '.join(args)}; got {a!r}")
        args[key] = value
    if "ckpt" not in args:
        raise SystemExit("ckpt=DIR (a run directory or a .ckpt file) is required")
    return args


@torch.no_grad()
def probe(model, image: torch.Tensor, label: torch.Tensor, bins: int, seed: int = 0) -> dict:
    net, diffusion = model.eval_net.eval(), model.diffusion
    x0 = model.encode_mask(label)
    other = image.roll(1, dims=0)
    g = torch.Generator().manual_seed(seed)
    steps = diffusion.num_steps
    edges = torch.linspace(0, steps, bins + 1).round().long().tolist()
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        acc = {"eps_mse": 0.0, "x0_mse": 0.0, "swap": 0.0, "error": 0.0}
        for t_value in range(lo, hi):
            t = torch.full((image.shape[0],), t_value, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, t, noise)
            out, out_other = net(x_t, image, t), net(x_t, other, t)
            x0_hat = diffusion.predict_x0(out, x_t, t).clamp(-1, 1)
            x0_other = diffusion.predict_x0(out_other, x_t, t).clamp(-1, 1)
            acc["eps_mse"] += (diffusion.predict_eps(out, x_t, t) - noise).square().mean().item()
            acc["x0_mse"] += (x0_hat - x0).square().mean().item()
            acc["swap"] += (x0_hat - x0_other).abs().mean().item()
            acc["error"] += (x0_hat - x0).abs().mean().item()
        n = hi - lo
        row = {"t": f"{lo}-{hi - 1}", **{k: v / n for k, v in acc.items()}}
        row["swap_vs_error"] = row["swap"] / max(row["error"], 1e-12)
        rows.append(row)
    # the sampler from pure noise, the same noise for I and I'
    model.seed_case("probe", image.device)
    pred = model.predict_window(image)[FINAL].argmax(1).bool()
    model.seed_case("probe", image.device)
    pred_other = model.predict_window(other)[FINAL].argmax(1).bool()
    inter, union = (pred & pred_other).sum().item(), (pred | pred_other).sum().item()
    truth = label[:, 0] == 1
    iou = ((pred & truth).sum() / (pred | truth).sum().clamp(min=1)).item()
    return {"bins": rows, "sample_swap_iou": inter / max(union, 1), "sample_iou_pooled": iou}


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    model, cfg = load_model(resolve_checkpoint(args["ckpt"]))
    dm = build_datamodule(cfg)
    dm.setup("test")
    loader = dm.test_dataloader() if args["split"] == "test" else dm.val_dataloader()
    images, labels = [], []
    for batch in loader:
        images.append(model._plain(batch["image"]))
        labels.append(model._plain(batch["label"]))
    crop = [int(p) for p in cfg.data.patch_size]
    sl = (slice(None), slice(None), *(slice(0, c) for c in crop))
    image = torch.cat([i[sl] for i in images])[: int(args["cases"])].float()
    label = torch.cat([lab[sl] for lab in labels])[: int(args["cases"])]
    result = probe(model, image, label, int(args["bins"]))
    result["ckpt"] = str(resolve_checkpoint(args["ckpt"]))
    out = Path(args["out"]) if args["out"] else Path(args["ckpt"]) / "probe.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"{'t':>7} {'eps_mse':>8} {'x0_mse':>8} {'swap':>7} {'swap/err':>8}")
    for r in result["bins"]:
        print(f"{r['t']:>7} {r['eps_mse']:8.4f} {r['x0_mse']:8.4f} {r['swap']:7.4f} {r['swap_vs_error']:8.3f}")
    print(f"sampled: IoU(pred(I), pred(I')) = {result['sample_swap_iou']:.3f}; pooled IoU vs truth "
          f"{result['sample_iou_pooled']:.3f}  -> {out}")


if __name__ == "__main__":
    main()
