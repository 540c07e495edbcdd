r"""Input-pipeline throughput: decoded + augmented images per second per CPU core, ours (the
tf.data pipeline of `stablerep_jax.data.pipeline`, from TFRecords) vs the reference's chain
(PIL decode + torchvision RandomResizedCrop/ColorJitter/Grayscale/GaussianBlur/Flip/ToTensor/
Normalize, as in StableRep's `main_stablerep.py`), on the same JPEG images, in one run.

  python benchmarks/input_pipeline.py                        # 256px JPEGs -> 224 crops, strong
  python benchmarks/input_pipeline.py --recipe weak --threads 4 --seconds 20

"Per core" is images per CPU-second of the process (user + system time over the timed window),
so it does not depend on how many cores the machine lends us; wall-clock rates are printed too.
The reference side reads the JPEG bytes from memory (no file I/O); ours reads TFRecord shards
(from the page cache) and also parses records, samples m of K images and batches.

Cores per TPU v4 chip = (images/s one chip trains on) / (our images per CPU-second). The chip
rate is an assumption unless given with --chip_images_per_sec from a measurement.
"""
from __future__ import annotations

import argparse
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

from stablerep_jax import config_utils  # noqa: E402
from stablerep_jax.data import pipeline, records  # noqa: E402

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# ViT-B/16 at 224px: 17.6 GMACs = 35.2 GFLOPs forward, x3 for forward + backward; TPU v4 peak
# 275 bf16 TFLOP/s at an assumed 50% MFU -> 275e12 * 0.5 / (3 * 35.2e9) ~ 1300 images/s/chip.
ASSUMED_CHIP_IMAGES_PER_SEC = 1300.0


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=128, help="distinct stored images")
    p.add_argument("--stored_size", type=int, default=256)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--recipe", default="strong", choices=["strong", "weak"])
    p.add_argument("--threads", type=int, default=1, help="tf.data threads for our pipeline")
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per side")
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


def bench_ours(jpegs, args, workdir) -> tuple[int, float, float]:
    k = 2
    shards = {}
    per_shard = len(jpegs) // k // 4
    for s in range(4):
        recs = [records.CaptionRecord(caption=f"c{c}", caption_id=c,
                                      images=jpegs[c * k:(c + 1) * k], seeds=list(range(k)))
                for c in range(s * per_shard, (s + 1) * per_shard)]
        name = f"bench-{s:05d}.tfrecord"
        records.write_shard(os.path.join(workdir, name), recs)
        shards[name] = {"captions": len(recs), "images": len(recs) * k}
    records.write_manifest(workdir, shards, images_per_caption=k)

    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py"))
    data = config.data
    data.train_files = os.path.join(workdir, "*.tfrecord")
    data.n_img, data.num_crop, data.image_size = k, 1, args.crop
    data.aug, data.image_dtype, data.shuffle_buffer = args.recipe, "float32", 64
    batch = 16
    it = pipeline.make_train_iterator(data, batch_size=batch, seed=0, num_threads=args.threads)
    for _ in range(3):
        next(it)                                            # warm-up: graph building, buffers
    return _timed(lambda: next(it)["images"].shape[0] * k, args.seconds)


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


def bench_reference(jpegs, args) -> tuple[int, float, float]:
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
    return _timed(step, args.seconds)


def main():
    args = parse_args()
    jpegs = make_jpegs(args.images, args.stored_size)
    with tempfile.TemporaryDirectory() as workdir:
        ours = bench_ours(jpegs, args, workdir)
    ref = bench_reference(jpegs, args)
    rows = []
    for name, (n, wall, cpu) in [("ours (tf.data)", ours), ("reference (PIL+torchvision)", ref)]:
        rows.append((name, n / cpu, n / wall))
    print(f"\n{args.images} JPEGs {args.stored_size}px -> {args.crop}px, {args.recipe} recipe, "
          f"our tf.data threads={args.threads}, {os.cpu_count()} cores visible")
    print(f"{'pipeline':<30}{'img/s per core':>16}{'img/s wall':>14}")
    for name, per_core, wall in rows:
        print(f"{name:<30}{per_core:>16.1f}{wall:>14.1f}")
    print(f"ratio ours / reference (per core): {rows[0][1] / rows[1][1]:.2f}x")
    chip = args.chip_images_per_sec or ASSUMED_CHIP_IMAGES_PER_SEC
    source = ("given with --chip_images_per_sec" if args.chip_images_per_sec else
              "ASSUMED, not measured here: 275 bf16 TFLOP/s x 50% MFU / (3 x 35.2 GFLOPs "
              "per 224px ViT-B/16 image)")
    print(f"TPU v4 chip at ViT-B/16 training speed: {chip:.0f} images/s ({source})")
    print(f"host cores needed per chip: ours {chip / rows[0][1]:.1f}, "
          f"reference {chip / rows[1][1]:.1f}")


if __name__ == "__main__":
    main()
