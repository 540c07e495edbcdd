r"""Linear-probe benchmarks: the side-by-side lr sweep's speed, and what the cached-features
shortcut costs in accuracy against the reference protocol.

  python benchmarks/probe_sweep.py                                  # sweep speed, CPU-sized
  python benchmarks/probe_sweep.py --num 1281167 --dim 768 --classes 1000 --batch 1024 \
      --epochs 2 --no-separate                                      # ImageNet-sized, accelerator
  python benchmarks/probe_sweep.py --compare-modes                  # accuracy gap, tiny case

Sweep speed: random features stand in for frozen CLS features. Both sides run the same code
(`linear_probe.train_heads_on_features`): once with all H lrs stacked (one vmapped update per
step), then H times with one lr (skipped with --no-separate). Each side is run once to compile,
then timed; prints seconds per epoch of each and the ratio. The features stay on the devices
(every device holds them all: N x D x 4 bytes, 3.9 GB for ImageNet and ViT-B).

Mode gap (`--compare-modes`): a random-init tiny ViT (1 block, width 192, patch 8, 32px) probed
on toy-world renders labelled by one caption attribute, once with mode "augmented" (the
reference: RandomResizedCrop + flip every epoch) and once with "cached_features" (centre crops
extracted once), same lrs, epochs and evaluation cadence; prints the best top-1 of each. It is a
tiny case that runs on a CPU, not a prediction of the ImageNet gap. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stablerep_jax import checkpoint, config_utils, linear_probe, parallel  # noqa: E402
from stablerep_jax.generation import toy_world  # noqa: E402
from stablerep_jax.models.encoder import build_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ENCODER = {"variant": "tiny", "depth": 1, "patch_size": 8, "mlp_dim": 32, "emb_dim": 16,
                "dtype": "float32", "image_size": 32}


def timed(fn) -> float:
    fn()                                   # compile
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sweep_speed(args) -> None:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(args.num, args.dim)).astype(np.float32)
    labels = rng.integers(0, args.classes, args.num)
    lrs = tuple(np.geomspace(0.001, 0.5, args.lrs) * args.batch / 256)
    mesh = parallel.make_mesh()

    def run(head_lrs):
        state, _ = linear_probe.train_heads_on_features(
            feats, labels, args.classes, head_lrs, args.epochs, args.batch, mesh, use_bn=True)
        jax.block_until_ready(state.kernel)

    together = timed(lambda: run(lrs))
    print(f"devices {jax.device_count()} ({jax.devices()[0].platform}); {args.num} x {args.dim} "
          f"features, {args.classes} classes, batch {args.batch}, {args.lrs} lrs")
    print(f"side by side : {together / args.epochs:8.3f} s/epoch for all {args.lrs} heads")
    if args.no_separate:
        return
    separate = sum(timed(lambda lr=lr: run((lr,))) for lr in lrs)
    print(f"one per run  : {separate / args.epochs:8.3f} s/epoch summed over {args.lrs} runs")
    print(f"speed-up     : {separate / together:8.2f}x")


def save_random_encoder(directory: str, seed: int) -> str:
    model = build_model(TINY_ENCODER, TINY_ENCODER["image_size"])
    size = TINY_ENCODER["image_size"]
    variables = model.init(jax.random.PRNGKey(seed), np.zeros((2, 2, size, size, 3), np.float32),
                           train=False)
    checkpoint.save_model(directory, 0, variables["params"], variables.get("batch_stats", {}),
                          TINY_ENCODER)
    return directory


def mode_gap(args) -> None:
    root = tempfile.mkdtemp(prefix="probe_modes_")
    folder = os.path.join(root, "folder")
    toy_world.write_toy_probe_folder(folder, args.attribute, args.train_per_class,
                                     args.test_per_class, args.render_size, seed=0)
    classes = len(toy_world.ATTRIBUTE_VALUES[args.attribute])
    print(f"{args.attribute}: {classes} classes, {args.train_per_class} train / "
          f"{args.test_per_class} test per class, {args.render_size}px renders -> 32px views; "
          f"{args.gap_epochs} epochs, batch {args.gap_batch}, eval every {args.eval_every}, "
          f"use_bn {args.use_bn}; random-init 1-block ViT-Tiny")
    rows = []
    for seed in range(args.seeds):
        encoder = save_random_encoder(os.path.join(root, f"encoder{seed}"), seed)
        row = {}
        for mode in ("augmented", "cached_features"):
            c = config_utils.load_config(os.path.join(REPO, "configs", "linear_probe.py") + ":folder")
            c.checkpoint, c.dataset, c.mode = encoder, f"folder:{folder}", mode
            c.epochs, c.batch_size, c.eval_every = args.gap_epochs, args.gap_batch, args.eval_every
            c.use_bn, c.seed, c.knn.enabled = args.use_bn, seed, False
            start = time.perf_counter()
            r = linear_probe.run(c, os.path.join(root, f"work_{mode}_{seed}"))
            row[mode] = (r["best_top1"], time.perf_counter() - start)
        rows.append(row)
        print(f"encoder seed {seed}: augmented {row['augmented'][0]:.4f} "
              f"({row['augmented'][1]:.0f} s), cached_features {row['cached_features'][0]:.4f} "
              f"({row['cached_features'][1]:.0f} s), gap "
              f"{row['augmented'][0] - row['cached_features'][0]:+.4f}", flush=True)
    aug = np.array([r["augmented"][0] for r in rows])
    cached = np.array([r["cached_features"][0] for r in rows])
    print(f"mean best top-1: augmented {aug.mean():.4f}, cached_features {cached.mean():.4f}, "
          f"gap (augmented - cached) {np.mean(aug - cached):+.4f} over {len(rows)} encoders")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=8192, help="training examples")
    parser.add_argument("--dim", type=int, default=384, help="feature width")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lrs", type=int, default=10, help="heads in the sweep")
    parser.add_argument("--no-separate", action="store_true",
                        help="time only the side-by-side sweep (for ImageNet-sized features)")
    parser.add_argument("--compare-modes", action="store_true",
                        help="measure augmented vs cached_features top-1 on a tiny case instead")
    parser.add_argument("--attribute", default="shape", choices=tuple(toy_world.ATTRIBUTE_VALUES))
    parser.add_argument("--train-per-class", type=int, default=80)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--render-size", type=int, default=48)
    parser.add_argument("--gap-epochs", type=int, default=30)
    parser.add_argument("--gap-batch", type=int, default=64)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--use-bn", action="store_true")
    parser.add_argument("--seeds", type=int, default=3, help="random encoders to average over")
    args = parser.parse_args()
    if args.compare_modes:
        mode_gap(args)
    else:
        sweep_speed(args)


if __name__ == "__main__":
    main()
