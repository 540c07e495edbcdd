r"""Input-pipeline throughput: decoded + augmented images per second per CPU core, ours (the
tf.data pipeline of `stablerep_jax.data.pipeline`, from TFRecords) vs the reference's chain
(PIL decode + torchvision RandomResizedCrop/ColorJitter/Grayscale/GaussianBlur/Flip/ToTensor/
Normalize, as in StableRep's `main_stablerep.py`), on the same JPEG images, in one run.

  python benchmarks/input_pipeline.py                        # 256px JPEGs -> 224 crops, strong
  python benchmarks/input_pipeline.py --recipe weak --threads 4 --seconds 20 --rounds 3

Ours runs as training runs it: the host decodes only the crop, resizes and flips, and ships
uint8 views plus each view's colour parameters; the colour stage runs in the train step on the
accelerator. The device's share is shown too, so nothing is hidden: its FLOPs per image from
XLA's cost analysis (next to a ViT-B/16 training step's), and its CPU time per image when jitted
on this CPU, with the per-core rate host + device stage would have if that CPU had to do both.

"Per core" is images per CPU-second of the process (user + system time over the timed window),
so it does not depend on how many cores the machine lends us; wall-clock rates are printed too.
The sides alternate for `--rounds` rounds (a load change on a shared machine then hits all of
them) and each side's images and CPU-seconds are summed over its rounds. The reference side
reads the JPEG bytes from memory (no file I/O); ours reads TFRecord shards (from the page
cache) and also parses records, samples m of K images and batches.

Cores per TPU v4 chip = (images/s one chip trains on) / (our images per CPU-second). The chip
rate is an assumption unless given with --chip_images_per_sec from a measurement.
"""
from __future__ import annotations

import argparse
import gc
import io
import os
import random
import sys
import tempfile
import time

import numpy as np

# torchvision loads triton, which crashes when loaded after TensorFlow: import it first.
import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

from stablerep_jax import config_utils  # noqa: E402
from stablerep_jax.data import augment, device_augment, pipeline, records  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ViT-B/16 at 224px: 17.6 GMACs = 35.2 GFLOPs forward, x3 for forward + backward; TPU v4 peak
# 275 bf16 TFLOP/s at an assumed 50% MFU -> 275e12 * 0.5 / (3 * 35.2e9) ~ 1300 images/s/chip.
ASSUMED_CHIP_IMAGES_PER_SEC = 1300.0
VIT_B16_FORWARD_FLOPS = 35.2e9
BATCH = 16                    # captions per batch (x 2 images each)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=128, help="distinct stored images")
    p.add_argument("--stored_size", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--recipe", default="strong", choices=["strong", "weak"])
    p.add_argument("--threads", type=int, default=1, help="tf.data threads for our pipeline")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per side and round")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of all sides")
    p.add_argument("--chip_images_per_sec", type=float, default=None,
                   help="measured ViT-B/16 training images/s per TPU v4 chip (else assumed)")
    return p.parse_args()


def make_jpegs(n: int, size: int) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields with edges and a little noise (quality 90)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        coarse = rng.integers(0, 256, (max(1, size // 32),) * 2 + (3,)).astype(np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        img += rng.normal(0, 6, img.shape)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def _timed(step, seconds: float) -> tuple[int, float, float]:
    """Runs step() (returns images done) until `seconds` pass: (images, wall s, CPU s)."""
    count, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < seconds:
        count += step()
    return count, time.perf_counter() - wall0, time.process_time() - cpu0


def write_shards(jpegs, workdir, k: int = 2) -> str:
    """The JPEGs as 4 TFRecord shards of captions with k images each; returns their glob."""
    per_shard = len(jpegs) // k // 4
    shards = {}
    for s in range(4):
        recs = [records.CaptionRecord(caption=f"c{c}", caption_id=c,
                                      images=jpegs[c * k:(c + 1) * k], seeds=list(range(k)))
                for c in range(s * per_shard, (s + 1) * per_shard)]
        name = f"bench-{s:05d}.tfrecord"
        records.write_shard(os.path.join(workdir, name), recs)
        shards[name] = {"captions": len(recs), "images": len(recs) * k}
    records.write_manifest(workdir, shards, images_per_caption=k)
    return os.path.join(workdir, "*.tfrecord")


def data_config(files: str, args, k: int = 2):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py"))
    data = config.data
    data.train_files = files
    data.n_img, data.num_crop, data.image_size = k, 1, args.crop
    data.aug, data.image_dtype, data.permute_window = args.recipe, "float32", 64
    return data


def ours_side(files: str, args):
    """A fresh iterator of our pipeline, warmed up, and a step for `_timed` (one batch). Made
    anew for each round and dropped after it, so that its background threads never run while
    another side is timed (their CPU time would count against that side)."""
    data = data_config(files, args)
    it = pipeline.make_train_iterator(data, batch_size=BATCH, seed=0, num_threads=args.threads)
    for _ in range(3):
        next(it)                                            # warm-up: graph building, buffers
    return lambda: int(np.prod(next(it)["images"].shape[:2]))


def device_stage(files: str, args) -> dict:
    """The colour stage that training runs on the accelerator, here jitted on this CPU: XLA's
    FLOPs per image and CPU-seconds per image (on a real batch of the pipeline)."""
    data = data_config(files, args)
    batch = next(pipeline.make_train_iterator(data, batch_size=BATCH, seed=0, num_threads=1))
    images, params = batch["images"], batch[augment.PARAMS_KEY]
    spec = augment.AugmentSpec.from_config(data)
    finish = jax.jit(lambda x, p: device_augment.finish_views(x, p, spec))
    compiled = finish.lower(images, params).compile()
    per_batch = int(np.prod(images.shape[:2]))
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    flops = float((analysis or {}).get("flops", 0.0)) / per_batch
    moved = float((analysis or {}).get("bytes accessed", 0.0)) / per_batch
    images, params = jax.device_put(images), jax.device_put(params)
    compiled(images, params).block_until_ready()

    def step():
        compiled(images, params).block_until_ready()
        return per_batch
    n, wall, cpu = _timed(step, max(2.0, args.seconds / 4))
    return {"flops_per_image": flops, "bytes_per_image": moved, "cpu_s_per_image": cpu / n,
            "wall_s_per_image": wall / n}


def reference_transform(recipe: str, size: int):
    normalize = [T.ToTensor(), T.Normalize(MEAN, STD)]
    if recipe == "weak":
        return T.Compose([T.RandomResizedCrop(size, scale=(0.5, 1.0))] + normalize)
    blur = T.Lambda(lambda im: im.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0))))
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.08, 1.0)),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([blur], p=0.5),
        T.RandomHorizontalFlip(),
    ] + normalize)


def reference_step(jpegs, args):
    """A step function for `_timed`: 16 images through PIL decode + the torchvision chain."""
    torch.set_num_threads(1)
    transform = reference_transform(args.recipe, args.crop)
    state = {"i": 0}

    def step():
        for _ in range(16):
            data = jpegs[state["i"] % len(jpegs)]
            state["i"] += 1
            image = Image.open(io.BytesIO(data)).convert("RGB")
            transform(image)
        return 16
    step()
    return step


def main():
    args = parse_args()
    jpegs = make_jpegs(args.images, args.stored_size)
    names = ["ours, colour stage on device (host share)", "reference (PIL+torchvision)"]
    totals = {name: [0, 0.0, 0.0] for name in names}
    with tempfile.TemporaryDirectory() as workdir:
        files = write_shards(jpegs, workdir)
        sides = {names[0]: lambda: ours_side(files, args),
                 names[1]: lambda: reference_step(jpegs, args)}
        for _ in range(args.rounds):
            for name in names:
                step = sides[name]()
                for i, value in enumerate(_timed(step, args.seconds)):
                    totals[name][i] += value
                del step
                gc.collect()                 # ends the iterator's tf.data threads
        device = device_stage(files, args)
    rate = {name: (n / cpu, n / wall) for name, (n, wall, cpu) in totals.items()}
    ref = rate[names[1]][0]
    print(f"\n{args.images} JPEGs {args.stored_size}px -> {args.crop}px, {args.recipe} recipe, "
          f"our tf.data threads={args.threads}, {os.cpu_count()} cores visible, "
          f"{args.rounds} rounds x {args.seconds:g} s per side")
    print(f"{'pipeline':<44}{'img/s per core':>16}{'img/s wall':>12}{'vs reference':>14}")
    for name in names:
        per_core, wall = rate[name]
        print(f"{name:<44}{per_core:>16.1f}{wall:>12.1f}{per_core / ref:>13.2f}x")
    host_share = rate[names[0]][0]
    both = 1.0 / (1.0 / host_share + device["cpu_s_per_image"])
    train_flops = 3 * VIT_B16_FORWARD_FLOPS
    what = "jitter, grayscale, blur, normalise" if args.recipe == "strong" else "normalise"
    print(f"device stage ({what}; jitted, float32): "
          f"{device['flops_per_image'] / 1e6:.1f} MFLOP per image (XLA cost analysis) = "
          f"{100 * device['flops_per_image'] / train_flops:.3f}% of a ViT-B/16 training step's "
          f"{train_flops / 1e9:.1f} GFLOP per image; {device['bytes_per_image'] / 1e6:.1f} MB "
          f"accessed per image")
    print(f"  on this CPU: {1e3 * device['cpu_s_per_image']:.2f} ms CPU per image; host share + "
          f"this stage on the same CPU: {both:.1f} images per CPU-second ({both / ref:.2f}x "
          f"reference)")
    chip = args.chip_images_per_sec or ASSUMED_CHIP_IMAGES_PER_SEC
    source = ("given with --chip_images_per_sec" if args.chip_images_per_sec else
              "ASSUMED, not measured here: 275 bf16 TFLOP/s x 50% MFU / (3 x 35.2 GFLOPs "
              "per 224px ViT-B/16 image)")
    print(f"TPU v4 chip at ViT-B/16 training speed: {chip:.0f} images/s ({source})")
    print(f"host cores needed per chip: ours {chip / host_share:.1f} (colour on device), "
          f"reference {chip / ref:.1f}")


if __name__ == "__main__":
    main()
