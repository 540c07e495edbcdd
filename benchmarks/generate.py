r"""Our Flax Stable Diffusion sampler vs the PyTorch diffusers `StableDiffusionPipeline`, on the
same random weights, steps, resolution, guidance, batch and initial latents, in one run.

  python benchmarks/generate.py                      # tiny random SD on CPU (seconds)
  python benchmarks/generate.py --size sd15 --batch 8 --steps 50 --resolution 512 \
      --dtype bfloat16 --repeats 5                  # SD-v1.5-sized random weights, on a GPU
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/generate.py --layouts 8x1,1x4    # how much the batch shape moves pixels

The model is written in diffusers Flax format (tests/tiny_sd.py) and its weights converted
into PyTorch (`tiny_sd.torch_pipeline`). Both sides get the same per-image initial latents
(ours derive them from (seed, caption id, k)), so the printed max pixel difference also
checks that our sampling loop computes what diffusers' PyTorch pipeline computes. Timings
exclude compilation / warm-up and cover whole batches (text encoder, all UNet steps with
classifier-free guidance, VAE decode, images on the host). Prints images/s of each and the
ratio; nothing is asserted.

`--layouts` instead samples the same images (same captions, seeds and caption ids) with
samplers of other batch shapes (devices x images per device), in float32 and bfloat16, and
prints how far their pixels lie from the first layout's: the bound the README states.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch  # noqa: F401  (before TensorFlow: triton's LLVM clashes with TF's when loaded after)

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)

from stablerep_jax.generation import sampler as sampler_lib  # noqa: E402
from tiny_sd import SIZES, torch_pipeline, write_tiny_sd  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPTIONS = ["a photo of a red bicycle leaning on a wall", "a bowl of soup on a wooden table",
            "two dogs running on a beach at sunset", "a city street at night in the rain"]


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--model", help="existing diffusers Flax dir (default: write a random one)")
    p.add_argument("--batch", type=int, default=4, help="images per call (and per device)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resolution", type=int, help="default: the size's native resolution")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--layouts", help="compare batch shapes instead, e.g. 8x1,1x4 "
                   "(devices x images per device; the first is the reference)")
    p.add_argument("--layout_images", type=int, default=16,
                   help="images compared per layout (captions x 2 seeds)")
    return p.parse_args()


def _parse_layouts(text: str) -> list[tuple[int, int]]:
    try:
        layouts = [tuple(int(v) for v in item.split("x")) for item in text.split(",")]
    except ValueError:
        layouts = []
    if len(layouts) < 2 or any(len(t) != 2 or min(t) < 1 for t in layouts):
        raise SystemExit(f"--layouts={text!r}: give two or more DEVICESxBATCH items, e.g. 8x1,1x4")
    if max(d for d, _ in layouts) > jax.local_device_count():
        raise SystemExit(f"--layouts={text!r} needs {max(d for d, _ in layouts)} devices; JAX "
                         f"sees {jax.local_device_count()} (on CPU set XLA_FLAGS="
                         "--xla_force_host_platform_device_count=8)")
    return layouts


def _sample_all(sampler, ids, seeds, cids) -> np.ndarray:
    """Every image, in calls of the sampler's batch size (the last one padded)."""
    size = sampler.batch_size
    return np.concatenate([sampler.sample(ids[i:i + size], seeds[i:i + size], cids[i:i + size])
                           for i in range(0, len(seeds), size)])


def compare_layouts(model, args, resolution) -> None:
    """Prints max / mean / share of changed pixel values (0-255) of each layout vs the first."""
    layouts = _parse_layouts(args.layouts)
    n = args.layout_images
    texts = [CAPTIONS[(i // 2) % len(CAPTIONS)] + f" number {i // 2}" for i in range(n)]
    seeds, cids = [i % 2 for i in range(n)], [i // 2 for i in range(n)]
    print(f"config: size={args.size} resolution={resolution} steps={args.steps} "
          f"guidance={args.guidance} images={n} jax={jax.__version__} "
          f"device={jax.local_devices()[0].device_kind}")
    print("| dtype | layout vs " + "x".join(map(str, layouts[0])) +
          " | max diff (levels) | mean diff | values changed |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        settings = sampler_lib.SamplingSettings(
            num_inference_steps=args.steps, guidance_scale=args.guidance, resolution=resolution,
            scheduler="ddim", dtype=dtype)
        images = []
        for devices, batch in layouts:
            sampler = sampler_lib.make_sampler(model, settings,
                                               devices=jax.local_devices()[:devices],
                                               per_device_batch=batch)
            ids, _ = sampler.tokenize(texts)
            images.append(_sample_all(sampler, ids, seeds, cids).astype(int))
        for (devices, batch), other in zip(layouts[1:], images[1:]):
            diff = np.abs(other - images[0])
            print(f"| {dtype} | {devices}x{batch} | {diff.max()} | {diff.mean():.4f} | "
                  f"{(diff > 0).sum()} of {diff.size} ({(diff > 0).mean():.2%}) |")


def _flax(model, args, resolution):
    settings = sampler_lib.SamplingSettings(
        num_inference_steps=args.steps, guidance_scale=args.guidance, resolution=resolution,
        scheduler="ddim", dtype=args.dtype)
    sampler = sampler_lib.make_sampler(model, settings, devices=jax.local_devices()[:1],
                                       per_device_batch=args.batch)
    compile_s = sampler.compile()
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch)]
    ids, _ = sampler.tokenize(texts)
    seeds = [k % 2 for k in range(args.batch)]
    cids = [i // 2 for i in range(args.batch)]
    images = sampler.sample(ids, seeds, cids)          # warm-up (first run allocations)
    start = time.perf_counter()
    for _ in range(args.repeats):
        images = sampler.sample(ids, seeds, cids)
    seconds = time.perf_counter() - start
    latents = sampler.initial_latents(seeds, cids)
    return dict(images=images, latents=latents, texts=texts, seconds=seconds,
                compile_s=compile_s, device=str(sampler.devices[0].device_kind))


def _torch(model, args, resolution, texts, latents):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = TORCH_DTYPES[args.dtype]
    pipe = torch_pipeline(model).to(device, dtype)
    kwargs = dict(prompt=texts, num_inference_steps=args.steps, guidance_scale=args.guidance,
                  height=resolution, width=resolution, output_type="np",
                  latents=torch.from_numpy(latents).to(device, dtype))
    pipe(**kwargs)                                          # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        out = pipe(**kwargs).images
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = np.round(np.asarray(out, np.float32) * 255).astype(np.uint8)
    return dict(images=images, seconds=seconds, device=device)


def main():
    args = _args()
    resolution = args.resolution or SIZES[args.size]["resolution"]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            start = time.perf_counter()
            model = write_tiny_sd(os.path.join(tmp, args.size), size=args.size)
            print(f"wrote random {args.size} SD in {time.perf_counter() - start:.1f} s")
        if args.layouts:
            compare_layouts(model, args, resolution)
            return
        n = args.batch * args.repeats
        ours = _flax(model, args, resolution)
        ours_rate = n / ours["seconds"]
        print(f"config: size={args.size} resolution={resolution} steps={args.steps} "
              f"guidance={args.guidance} batch={args.batch} dtype={args.dtype} "
              f"repeats={args.repeats} jax={jax.__version__} torch={torch.__version__}")
        print(f"flax (ours, {ours['device']}): {ours_rate:.3f} images/s "
              f"({ours['seconds'] / args.repeats:.3f} s per batch; "
              f"compile {ours['compile_s']:.1f} s)")
        if args.skip_torch:
            return
        theirs = _torch(model, args, resolution, ours["texts"], ours["latents"])
        theirs_rate = n / theirs["seconds"]
        print(f"torch diffusers StableDiffusionPipeline ({theirs['device']}): "
              f"{theirs_rate:.3f} images/s ({theirs['seconds'] / args.repeats:.3f} s per batch)")
        print(f"ratio flax / torch: {ours_rate / theirs_rate:.2f}x")
        diff = np.abs(ours["images"].astype(int) - theirs["images"].astype(int))
        print(f"same latents, pixel difference (0-255): max {diff.max()}, mean {diff.mean():.3f}")


if __name__ == "__main__":
    main()
