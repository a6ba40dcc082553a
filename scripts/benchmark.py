"""Inference speed and memory of a method: python scripts/benchmark.py METHOD [options]

    python scripts/benchmark.py imgx [--scale tiny|paper] [--device cpu|cuda] [--bf16] [--compile]
                                     [--repeats N] [--samples N] [--override KEY=VALUE ...]
    python scripts/benchmark.py segdiff [same options; --samples N, default 9; --scale default tiny]
    python scripts/benchmark.py volume [same options; --size 80 80 80; --scale default tiny]

One subcommand per method: ``add_<method>(subparsers)`` declares it and ``bench_<method>(args)``
measures it; the timing/memory helpers are shared (diffseg/utils/benchmark.py). Models are built
from the same Hydra configs as scripts/fit.py (``--override`` takes any fit.py override).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from monai.data import MetaTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffseg.utils.benchmark import format_table, measure, model_from_config  # noqa: E402

BRATS_INFO = dict(spatial_dims=3, in_channels=4, num_classes=4, class_names=["wt", "tc", "et"],
                  regions={"wt": [1, 2, 3], "tc": [1, 3], "et": [3]})


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=["tiny", "paper"], action="append",
                        help="tiny and/or paper (repeatable; default: both)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (as trainer.precision=bf16-mixed)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network (model.compile=true)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats per figure (default 3; 1 for paper scale on CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (0: time the first)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="wall time, or this process's CPU time (robust to other jobs on a shared CPU)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra fit.py config override, e.g. model.sampling.steps=10 (repeatable)")


# ---------------------------------------------------------------------------------------- imgx
def add_imgx(subparsers) -> None:
    p = subparsers.add_parser("imgx", help="ImgX-DiffSeg: denoiser forward vs K-step sampling, N samples as one batch")
    common_arguments(p)
    p.add_argument("--samples", type=int, default=4,
                   help="N for the one-batch vs N-runs comparison (1 skips it, e.g. paper scale on CPU)")
    p.set_defaults(func=bench_imgx)


def bench_imgx(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for scale in args.scale or ["tiny", "paper"]:
        overrides = ["experiment=imgx_brats", "data=brats_synthetic", f"scale={scale}",
                     f"model.compile={str(args.compile).lower()}", *args.override]
        model, cfg = model_from_config(overrides, BRATS_INFO)
        model = model.to(device).eval()
        repeats = args.repeats or (1 if scale == "paper" and device.type == "cpu" else 3)
        patch = [int(p) for p in cfg.data.patch_size]
        g = torch.Generator(device=device).manual_seed(0)
        image = torch.randn(1, BRATS_INFO["in_channels"], *patch, generator=g, device=device)
        x_t = torch.randn(1, model.num_classes, *patch, generator=g, device=device)
        t = torch.tensor([500.0], device=device)

        def run(fn):
            return measure(fn, device, repeats=repeats, warmup=args.warmup, bf16=args.bf16, clock=args.clock)

        def sample(n):
            model.configure_sampling(num_samples=n)
            model._case_generator = torch.Generator(device=device).manual_seed(0)
            return lambda: model.predict_window(image)

        steps, n = model.sampling.steps, args.samples
        fwd = run(lambda: model.denoise(image, x_t, t))
        one = run(sample(1))
        row = {"scale": scale, "patch": "x".join(map(str, patch)), "K": steps, "forward_s": fwd.seconds,
               "sample_s": one.seconds, "sample/fwd": one.seconds / fwd.seconds, "target<=": 1.05 * steps,
               "fwd_MB": fwd.peak_mb, "sample_MB": one.peak_mb}
        if n > 1:  # N samples as one batch vs N separate runs
            batch = run(sample(n))
            separate_fn = sample(1)
            separate = run(lambda: [separate_fn() for _ in range(n)])
            row.update({"N": n, "batchN_s": batch.seconds, "N_runs_s": separate.seconds,
                        "batch/runs": batch.seconds / separate.seconds, "batchN_MB": batch.peak_mb})
        rows.append({**row, "repeats": repeats})
        print(format_table(rows[-1:]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------- segdiff
FOLDER2D_INFO = dict(spatial_dims=2, in_channels=3, num_classes=2, class_names=["foreground"],
                     regions={"foreground": [1]})


def add_segdiff(subparsers) -> None:
    p = subparsers.add_parser(
        "segdiff", help="SegDiff: time(N samples as one batch) / (N x time(1 sample)), one window",
        description="SegDiff multiple generation: N samples of a window as ONE batch vs one sample. "
                    "Paper scale on CPU is slow (100 steps of a 256-px 7-level UNet): the ratio is per "
                    "step, so --override model.sampling.steps=5 gives the same figure in minutes.")
    common_arguments(p)
    p.add_argument("--samples", type=int, default=9, help="N (the paper averages 9)")
    p.set_defaults(func=bench_segdiff)


def bench_segdiff(args) -> list[dict]:
    if args.samples < 2:
        raise SystemExit(f"--samples: expected >= 2, got {args.samples}")
    device = torch.device(args.device)
    rows = []
    for scale in args.scale or ["tiny"]:
        overrides = ["experiment=segdiff_folder2d", "data=shapes2d", f"scale={scale}",
                     f"model.compile={str(args.compile).lower()}",
                     # the paper net (7 levels, attention at 16x16 and 8x8) is the 256-px one
                     *(["data.patch_size=[256,256]"] if scale == "paper" else []), *args.override]
        model, cfg = model_from_config(overrides, FOLDER2D_INFO)
        model = model.to(device).eval()
        repeats = args.repeats or (1 if scale == "paper" and device.type == "cpu" else 3)
        patch = [int(p) for p in cfg.data.patch_size]
        image = torch.randn(1, FOLDER2D_INFO["in_channels"], *patch, device=device,
                            generator=torch.Generator(device=device).manual_seed(0))

        def sample(n):
            model.sampling = {**model.sampling, "num_samples": n}
            model.seed_case("benchmark", device)
            return lambda: model.predict_window(image)

        n = args.samples
        one = measure(sample(1), device, repeats=repeats, warmup=args.warmup, bf16=args.bf16, clock=args.clock)
        batch = measure(sample(n), device, repeats=repeats, warmup=args.warmup, bf16=args.bf16, clock=args.clock)
        rows.append({
            "scale": scale, "patch": "x".join(map(str, patch)), "steps": model.sampler.num_steps, "N": n,
            "sample1_s": one.seconds, f"batch{n}_s": batch.seconds,
            "ratio": batch.seconds / (n * one.seconds), "target<=": 0.4,
            "sample1_MB": one.peak_mb, f"batch{n}_MB": batch.peak_mb, "repeats": repeats,
        })
        print(format_table(rows[-1:]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------- volume
def add_volume(subparsers) -> None:
    p = subparsers.add_parser(
        "volume", help="ImgX-DiffSeg vs the same-size UNet: full-volume prediction through the sliding window",
        description="Seconds per full-volume prediction (model.predict_case: every window, the K-step sampling "
                    "and the stitching) of ImgX-DiffSeg with one sample and of the UNet of the same size, on a "
                    "random BraTS-like volume several windows wide. 'val' stitches the final output only (what "
                    "validation does); 'test' also stitches the per-step outputs (test and evaluate). The ratio "
                    "to the UNet should stay near K.")
    common_arguments(p)
    p.add_argument("--size", type=int, nargs=3, default=[80, 80, 80],
                   help="volume size (default 80 80 80: 4 x 4 x 4 windows of the tiny 32^3 at overlap 0.5)")
    p.set_defaults(func=bench_volume)


def bench_volume(args) -> list[dict]:
    device = torch.device(args.device)
    rows = []
    for scale in args.scale or ["tiny"]:
        common = ["data=brats_synthetic", f"scale={scale}", f"model.compile={str(args.compile).lower()}"]
        imgx, _ = model_from_config(["experiment=imgx_brats", *common, "model.sampling.num_samples=1",
                                     *args.override], BRATS_INFO)
        unet, _ = model_from_config(["experiment=unet_brats", *common], BRATS_INFO)
        imgx, unet = imgx.to(device).eval(), unet.to(device).eval()
        repeats = args.repeats or (1 if scale == "paper" and device.type == "cpu" else 3)
        # a MetaTensor with an affine, as the test loader serves it
        image = MetaTensor(torch.randn(1, BRATS_INFO["in_channels"], *args.size, device=device,
                                       generator=torch.Generator(device=device).manual_seed(0)),
                           affine=torch.eye(4))

        def run(model, curves=True):
            def predict():
                model.curves = curves  # False: validation's final-only prediction
                return model.predict_case(image, "benchmark")
            return measure(predict, device, repeats=repeats, warmup=args.warmup, bf16=args.bf16, clock=args.clock)

        base, val, test = run(unet), run(imgx, curves=False), run(imgx, curves=True)
        steps = imgx.sampling.steps
        rows.append({
            "scale": scale, "volume": "x".join(map(str, args.size)), "window": "x".join(map(str, imgx.roi_size)),
            "K": steps, "unet_s": base.seconds, "imgx_val_s": val.seconds, "imgx_test_s": test.seconds,
            "val/unet": val.seconds / base.seconds, "test/unet": test.seconds / base.seconds,
            "target<=": 1.1 * steps, "unet_MB": base.peak_mb, "imgx_test_MB": test.peak_mb, "repeats": repeats,
        })
        print(format_table(rows[-1:]), flush=True)
    return rows


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="method", required=True)
    add_imgx(subparsers)
    add_segdiff(subparsers)
    add_volume(subparsers)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"benchmark {args.method} on {where}; bf16={args.bf16} compile={args.compile}; "
          f"{args.clock} clock, seconds = best of the repeats", flush=True)
    rows = args.func(args)
    print("\n" + format_table(rows))


if __name__ == "__main__":
    main()
