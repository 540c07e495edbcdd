r"""Our Flax Stable Diffusion sampler vs diffusers' PyTorch `StableDiffusionPipeline`, on the
same random weights, steps, resolution, guidance, batch and initial latents, in one run.

  python benchmarks/generate.py                      # tiny random SD on CPU (seconds)
  python benchmarks/generate.py --size sd15 --batch 8 --steps 50 --resolution 512 \
      --dtype bfloat16 --repeats 3 --json out.json  # SD-v1.5-sized random weights, on a GPU
  python benchmarks/generate.py --size sd15 --dtype bfloat16 --steps 50 --skip-torch \
      --sweep 8,16,32,64                            # per-device batch: images/s and bytes
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python benchmarks/generate.py --layouts 8x1,1x4    # how much the batch shape moves pixels

The model is a diffusers PyTorch pipeline folder (tests/tiny_sd.py writes a random one); ours
loads it through our own Flax modules, diffusers through its own. Both sides get the same
per-image initial latents (ours derive them from (seed, caption id, k)), so the printed pixel
difference also checks that both compute the same images. Timings exclude compilation and
warm-up and cover whole batches (text encoder, every UNet step with classifier-free guidance,
VAE decode, images on the host). FLOPs per image are counted from our program's jaxpr
(matmuls and convolutions; `program_flops`), and utilisation is reported against a bf16 matmul
peak measured here on random data (`--peak`), and a published peak when given. Nothing is
asserted.

`--sweep` times our sampler at several per-device batches (one compile each) and reports
images/s, the allocator's peak bytes and XLA's memory analysis for each. `--layouts` samples the
same images with samplers of other batch shapes (devices x images per device), in float32 and
bfloat16, and prints how far their pixels lie from the first layout's: the bound the README
states.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch  # noqa: F401  (before TensorFlow: triton's LLVM clashes with TF's when loaded after)

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, REPO)

from stablerep_jax.generation import sampler as sampler_lib  # noqa: E402
from tiny_sd import SIZES, torch_pipeline, write_tiny_sd  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CAPTIONS = ["a photo of a red bicycle leaning on a wall", "a bowl of soup on a wooden table",
            "two dogs running on a beach at sunset", "a city street at night in the rain"]


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--model", help="existing diffusers pipeline dir (default: write a random one)")
    p.add_argument("--batch", type=int, default=4, help="images per call (and per device)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--resolution", type=int, help="default: the size's native resolution")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="float32")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--attention", default="auto", help="auto, xla or cudnn (ours)")
    p.add_argument("--sweep", help="per-device batches to time, e.g. 8,16,32,64 (ours only)")
    p.add_argument("--peak", action="store_true",
                   help="measure a matmul peak (random operands) for the utilisation column")
    p.add_argument("--published_peak_tflops", type=float, default=0.0)
    p.add_argument("--json", help="write the results here")
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
            ids, _ = sampler.prompt_ids(texts)
            images.append(_sample_all(sampler, ids, seeds, cids).astype(int))
        for (devices, batch), other in zip(layouts[1:], images[1:]):
            diff = np.abs(other - images[0])
            print(f"| {dtype} | {devices}x{batch} | {diff.max()} | {diff.mean():.4f} | "
                  f"{(diff > 0).sum()} of {diff.size} ({(diff > 0).mean():.2%}) |")


def _flax(model, args, resolution, batch=None):
    settings = sampler_lib.SamplingSettings(
        num_inference_steps=args.steps, guidance_scale=args.guidance, resolution=resolution,
        scheduler="ddim", dtype=args.dtype)
    sampler = sampler_lib.make_sampler(model, settings, devices=jax.local_devices()[:1],
                                       per_device_batch=batch or args.batch,
                                       attention=args.attention)
    compile_s = sampler.compile()
    n = sampler.batch_size
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    ids, _ = sampler.prompt_ids(texts)
    seeds = [k % 2 for k in range(n)]
    cids = [i // 2 for i in range(n)]
    images = sampler.sample(ids, seeds, cids)          # warm-up (first run allocations)
    start = time.perf_counter()
    for _ in range(args.repeats):
        images = sampler.sample(ids, seeds, cids)
    seconds = time.perf_counter() - start
    latents = sampler.initial_latents(seeds, cids)
    stats = sampler.devices[0].memory_stats() or {}
    return dict(images=images, latents=latents, texts=texts, seconds=seconds,
                batch=n, images_per_s=n * args.repeats / seconds,
                compile_s=compile_s, device=str(sampler.devices[0].device_kind),
                attention=sampler.attention, flops_per_image=sampler.flops_per_image(),
                peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                bytes_limit=stats.get("bytes_limit"), memory=sampler.memory_analysis())


def _torch(model, args, resolution, texts, latents):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = TORCH_DTYPES[args.dtype]
    pipe = torch_pipeline(model, torch_dtype=dtype).to(device)
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


def _utilisation(result: dict, peak: float, published: float) -> dict:
    achieved = result["flops_per_image"] * result["images_per_s"]
    return dict(achieved_tflops=achieved / 1e12,
                mfu_measured_peak=achieved / peak if peak else None,
                mfu_published_peak=achieved / (published * 1e12) if published else None)


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("images", "latents", "texts")}


def _report(label: str, r: dict) -> None:
    mem = r.get("peak_bytes_in_use")
    print(f"{label}: batch {r['batch']}, {r['images_per_s']:.3f} images/s, "
          f"{r['flops_per_image'] / 1e9:.1f} GFLOP/image, {r['achieved_tflops']:.1f} TFLOP/s"
          + (f" ({r['mfu_measured_peak']:.1%} of the measured matmul peak)"
             if r.get("mfu_measured_peak") else "")
          + (f", {r['mfu_published_peak']:.1%} of published" if r.get("mfu_published_peak")
             else "")
          + (f", peak {mem / 2**30:.2f} GiB" if mem else "")
          + f", temp {r['memory'].get('temp_size_in_bytes', 0) / 2**30:.2f} GiB, compile "
            f"{r['compile_s']:.1f} s, attention {r['attention']}", flush=True)


def main():
    args = _args()
    resolution = args.resolution or SIZES[args.size]["resolution"]
    out: dict = dict(size=args.size, resolution=resolution, steps=args.steps,
                     guidance=args.guidance, dtype=args.dtype, repeats=args.repeats,
                     jax_version=jax.__version__, torch_version=torch.__version__)

    def save():
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=2)

    peak = 0.0
    if args.peak:
        from train_step import matmul_peak_flops
        peak = matmul_peak_flops(jax.numpy.bfloat16)
        out["matmul_peak_tflops"] = peak / 1e12
        print(f"bf16 matmul peak (random operands): {peak / 1e12:.1f} TFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            start = time.perf_counter()
            model = write_tiny_sd(os.path.join(tmp, args.size), size=args.size)
            print(f"wrote random {args.size} SD in {time.perf_counter() - start:.1f} s")
        if args.layouts:
            compare_layouts(model, args, resolution)
            return
        print(f"config: size={args.size} resolution={resolution} steps={args.steps} "
              f"guidance={args.guidance} dtype={args.dtype} repeats={args.repeats} "
              f"jax={jax.__version__} torch={torch.__version__}", flush=True)
        if args.sweep:
            out["sweep"] = []
            for batch in [int(b) for b in args.sweep.split(",")]:
                try:
                    r = _flax(model, args, resolution, batch)
                except Exception as e:   # out of memory at a large batch ends the sweep
                    print(f"batch {batch}: failed: {type(e).__name__}: {str(e)[:300]}")
                    out["sweep"].append(dict(batch=batch, error=f"{type(e).__name__}: {e}"[:500]))
                    save()
                    break
                r.update(_utilisation(r, peak, args.published_peak_tflops))
                _report("flax (ours)", r)
                out["sweep"].append(_public(r))
                save()
            return
        ours = _flax(model, args, resolution)
        ours.update(_utilisation(ours, peak, args.published_peak_tflops))
        _report(f"flax (ours, {ours['device']})", ours)
        out["ours"] = _public(ours)
        save()
        if args.skip_torch:
            return
        theirs = _torch(model, args, resolution, ours["texts"], ours["latents"])
        theirs["images_per_s"] = ours["batch"] * args.repeats / theirs["seconds"]
        print(f"torch diffusers StableDiffusionPipeline ({theirs['device']}): "
              f"{theirs['images_per_s']:.3f} images/s "
              f"({theirs['seconds'] / args.repeats:.3f} s per batch)")
        ratio = ours["images_per_s"] / theirs["images_per_s"]
        print(f"ratio flax / torch: {ratio:.2f}x")
        diff = np.abs(ours["images"].astype(int) - theirs["images"].astype(int))
        print(f"same latents, pixel difference (0-255): max {diff.max()}, mean {diff.mean():.3f}")
        out["torch"] = _public(theirs)
        out["ratio"] = ratio
        out["pixel_difference"] = dict(max=int(diff.max()), mean=float(diff.mean()))
        save()


if __name__ == "__main__":
    main()
