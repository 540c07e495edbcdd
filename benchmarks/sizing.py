r"""Sizing: what one chip of this machine does per second for the two expensive jobs, and what the
paper's CC12M recipe therefore costs in chip-hours.

  python benchmarks/sizing.py                                   # on a GPU/TPU: paper settings
  python benchmarks/sizing.py --dtype float32 --gen_batch 1 --train_captions 2   # on a CPU

Measured on ONE device of the default JAX backend (the per-chip rate, no communication):
- generation: an SD-v1.5-sized Stable Diffusion with random weights (same architecture, so the
  same cost as the real one), our sampler, 512px, 50 DDIM steps, classifier-free guidance (two
  UNet passes per step), VAE decode, images on the host;
- training: our jitted StableRep step (ViT-B/16 + MLP head, multi-positive loss, AdamW) on
  `--train_captions` captions x 6 images of 224px, the paper's per-GPU batch by default (43),
  fed as the input pipeline feeds `train`: uint8 views plus colour parameters, so the rate and
  FLOPs include the colour stage the step runs (benchmarks/train_step.py's `random_batch`).

Each rate comes with the model FLOPs per image (the sampler's from its program's matmuls and
convolutions, `program_flops`; the train step's from `flops.py`: XLA's GPU cost analysis leaves
cuBLAS/cuDNN calls out), the achieved FLOP/s, and the utilisation of this device's measured
matmul peak.
The CC12M cost uses the paper's recipe: `--dataset_captions` captions (about 10M for CC12M) x 10
images generated, and 15 epochs ("1x") of captions x 6 images for training.

`--project NAME=PEAK_TFLOPS,...` adds rows that are NOT measured: the counted FLOPs divided by a
chip's published peak times `--assumed_utilisation`, labelled as projections. Nothing is asserted;
`--json PATH` also writes every number.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

try:  # torch/torchvision (if installed; diffusers loads them) before TensorFlow: triton's LLVM
    import torch  # noqa: F401  # clashes with TensorFlow's when it is loaded after it
    import torchvision  # noqa: F401
except ImportError:
    pass

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from stablerep_jax.generation import sampler as sampler_lib  # noqa: E402
from tiny_sd import write_tiny_sd  # noqa: E402
from train_step import bench_jax, make_config, matmul_peak_flops, random_batch  # noqa: E402

CAPTION = "a photo of a red bicycle leaning on a brick wall"


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--skip_generation", action="store_true")
    p.add_argument("--skip_training", action="store_true")
    p.add_argument("--sd_model", help="existing diffusers Flax dir (default: random SD-v1.5 size)")
    p.add_argument("--gen_batch", type=int, default=8, help="images per sampler call")
    p.add_argument("--gen_steps", type=int, default=50)
    p.add_argument("--gen_resolution", type=int, default=512)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--gen_repeats", type=int, default=3, help="timed sampler calls")
    p.add_argument("--gen_warmup", type=int, default=1,
                   help="untimed calls first (compilation is separate and never timed)")
    p.add_argument("--variant", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--train_captions", type=int, default=43, help="captions per step")
    p.add_argument("--views", type=int, default=6, help="images per caption (n_img)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--train_steps", type=int, default=5, help="timed steps (after 2 warm-up)")
    p.add_argument("--dataset_captions", type=float, default=10e6,
                   help="captions in the data set (CC12M: about 10M)")
    p.add_argument("--images_per_caption", type=int, default=10, help="generated per caption")
    p.add_argument("--epochs", type=float, default=15.0, help="training epochs (1x = 15)")
    p.add_argument("--project", default="",
                   help="NAME=PEAK_TFLOPS,... chips to project to (not measured)")
    p.add_argument("--assumed_utilisation", type=float, default=0.4)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    try:   # checked before minutes of measuring, not after
        args.project = [(name.strip(), float(tflops)) for name, tflops in
                        (item.split("=") for item in args.project.split(",") if item.strip())]
    except ValueError:
        p.error(f"--project {args.project!r}: expected NAME=PEAK_TFLOPS[,NAME=PEAK_TFLOPS...]")
    return args


def measure_generation(args, device) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.sd_model
        if model is None:
            start = time.perf_counter()
            model = write_tiny_sd(os.path.join(tmp, "sd15"), size="sd15")
            print(f"wrote a random SD-v1.5-sized model in {time.perf_counter() - start:.0f} s",
                  flush=True)
        settings = sampler_lib.SamplingSettings(
            num_inference_steps=args.gen_steps, guidance_scale=args.guidance,
            resolution=args.gen_resolution, scheduler="ddim", dtype=args.dtype)
        sampler = sampler_lib.make_sampler(model, settings, devices=[device],
                                           per_device_batch=args.gen_batch)
    compile_s = sampler.compile()
    ids, _ = sampler.prompt_ids([CAPTION] * args.gen_batch)
    seeds, cids = list(range(args.gen_batch)), [0] * args.gen_batch
    for _ in range(args.gen_warmup):
        sampler.sample(ids, seeds, cids)
    start = time.perf_counter()
    for _ in range(args.gen_repeats):
        sampler.sample(ids, seeds, cids)
    seconds = (time.perf_counter() - start) / args.gen_repeats
    flops = sampler.flops_per_image()     # model FLOPs from the program (program_flops)
    return dict(images_per_s=args.gen_batch / seconds, seconds_per_batch=seconds,
                compile_s=compile_s, flops_per_image=flops,
                settings=dict(resolution=args.gen_resolution, steps=args.gen_steps,
                              guidance=args.guidance, batch=args.gen_batch, dtype=args.dtype))


def measure_training(args, device) -> dict:
    config = make_config(argparse.Namespace(
        captions=args.train_captions, views=args.views, image_size=args.image_size,
        variant=args.variant, mlp_dim=4096, emb_dim=256, dtype=args.dtype))
    seconds, flops = bench_jax(config, random_batch(config), args.train_steps, devices=[device])
    images = args.train_captions * args.views
    return dict(images_per_s=images / seconds, seconds_per_step=seconds,
                flops_per_image=flops / images,
                settings=dict(variant=args.variant, captions=args.train_captions,
                              views=args.views, image_size=args.image_size, dtype=args.dtype))


def chip_hours(args, gen_rate: float | None, train_rate: float | None) -> dict:
    """Chip-hours of the CC12M recipe at the given images/s per chip."""
    out = {}
    if gen_rate:
        out["generation"] = args.dataset_captions * args.images_per_caption / gen_rate / 3600
    if train_rate:
        out["training"] = args.epochs * args.dataset_captions * args.views / train_rate / 3600
    return out


def main():
    args = _args()
    device = jax.devices()[0]
    kind = f"{device.platform} ({device.device_kind})"
    if device.platform == "cpu":
        kind += f", {os.cpu_count()} cores"
    print(f"device: {kind}; jax {jax.__version__}", flush=True)
    peak = matmul_peak_flops(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)
    results = dict(device=kind, dtype=args.dtype, matmul_peak_flops=peak,
                   dataset_captions=args.dataset_captions,
                   images_per_caption=args.images_per_caption, epochs=args.epochs)

    rows = []
    for job, skip, measure in (("generation", args.skip_generation, measure_generation),
                               ("training", args.skip_training, measure_training)):
        if skip:
            continue
        r = measure(args, device)
        r["utilisation"] = r["images_per_s"] * r["flops_per_image"] / peak
        results[job] = r
        print(f"{job}: {r['images_per_s']:.4g} images/s per chip; "
              f"{r['flops_per_image'] / 1e9:,.1f} GFLOP/image (XLA); "
              f"{r['utilisation']:.1%} of the measured matmul peak; {r['settings']}", flush=True)
        rows.append(job)

    hours = chip_hours(args, results.get("generation", {}).get("images_per_s"),
                       results.get("training", {}).get("images_per_s"))
    results["cc12m_chip_hours"] = hours
    print("\n| chip | job | images/s per chip | CC12M chip-hours | basis |\n|---|---|---|---|---|")
    for job in rows:
        r = results[job]
        print(f"| {kind} | {job} | {r['images_per_s']:.3g} | {hours[job]:,.0f} | measured |")

    projections = []
    for name, tflops in args.project:
        for job in rows:
            flops = results[job]["flops_per_image"]
            if not flops:
                print(f"| {name} | {job} | - | - | no projection: XLA counted no FLOPs here |")
                continue
            rate = tflops * 1e12 * args.assumed_utilisation / flops
            rates = (rate, None) if job == "generation" else (None, rate)
            projections.append(dict(chip=name, job=job, images_per_s=rate,
                                    chip_hours=chip_hours(args, *rates)[job]))
            print(f"| {name} | {job} | {rate:.3g} | {projections[-1]['chip_hours']:,.0f} | "
                  f"projection: {tflops:g} TFLOP/s peak x {args.assumed_utilisation:.0%}, "
                  f"not measured |")
    results["projections"] = projections
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
