r"""Batch composition and input rate: the shard layout and pipeline before permuted shards vs now.

  python benchmarks/batch_locality.py                       # 3000 captions, 2 rounds
  python benchmarks/batch_locality.py --captions 6000 --rounds 3 --baseline_commit HEAD~5

Captions are in file order (caption i is the i-th line, as when a captions file is grouped by
content). The same records are written twice with `import_images.shards_to_import`' assignment:
"before" puts runs of consecutive captions into each shard (the layout before data/caption_order.py,
read by the pipeline of --baseline_commit, checked out with `git archive` and run in a
subprocess), "now" puts a seeded global permutation into the shards (read by this tree). For
each, one subprocess streams batches with the same settings and reports

  near-pair ratio  fraction of same-batch caption pairs within N/100 of each other in the
                   file, over the whole run, divided by a global permutation's (~2%);
                   the acceptance bound is 1.3
  images/s         augmented views per second (wall) and per CPU-second of the process

Rounds alternate before/now so drift in the shared machine's load hits both alike; the medians
are printed. Read-side settings (files per block, shuffle window) are scaled with --captions:
at CC12M scale a block is 16 shards of 1000 captions out of 10M, here 16 of --captions_per_shard.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

# The same photo-like test images as the input benchmark (this folder); it imports torch, which
# must load before TensorFlow (triton's LLVM clashes with TF's).
from input_pipeline import make_jpegs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE_COMMIT = "7f0549a"      # the last commit before permuted shards / the steps-per-epoch fix
BOUND = 1.3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--captions", type=int, default=3000)
    p.add_argument("--captions_per_shard", type=int, default=10)
    p.add_argument("--images_per_caption", type=int, default=2)
    p.add_argument("--stored_size", type=int, default=96)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=60, help="captions per batch")
    p.add_argument("--permute_window", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="tf.data threads")
    p.add_argument("--seconds", type=float, default=15.0, help="timed seconds per run")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--baseline_commit", default=BASELINE_COMMIT)
    p.add_argument("--worker", nargs=2, metavar=("TRAIN_FILES", "OUT_JSON"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Worker: runs against whichever stablerep_jax is first on sys.path (old tree or this one).


def worker(args) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stablerep_jax import config_utils
    from stablerep_jax.data import pipeline
    train_files, out_json = args.worker
    config = config_utils.load_config(os.path.join(os.environ["BENCH_TREE"], "configs",
                                                   "stablerep.py"))
    data = config.data
    data.train_files = train_files
    data.n_img, data.num_crop, data.image_size = 2, 1, args.crop
    data.image_dtype, data.permute_window = "float32", args.permute_window
    it = pipeline.make_train_iterator(data, batch_size=args.batch, seed=0,
                                      num_threads=args.threads)
    labels = [next(it)["labels"] for _ in range(3)]        # warm-up: graphs, buffers
    views, wall0, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall0 < args.seconds:
        batch = next(it)
        labels.append(batch["labels"])
        views += batch["images"].shape[0] * batch["images"].shape[1]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    with open(out_json, "w") as f:
        json.dump({"views": views, "wall": wall, "cpu": cpu,
                   "labels": [b.tolist() for b in labels],
                   "steps_per_epoch": it.info.steps_per_epoch}, f)


# --------------------------------------------------------------------------------------------
# Data: one set of records, two shard layouts.


def write_layouts(args, workdir: str) -> dict[str, str]:
    """{"before": glob, "now": glob}: the same records in file-order and permuted shards."""
    from stablerep_jax import import_images
    from stablerep_jax.data import caption_order, layouts, records
    k, n, per = args.images_per_caption, args.captions, args.captions_per_shard
    jpegs = make_jpegs(64, args.stored_size)
    groups = [layouts.CaptionGroup(caption=f"caption {i}", caption_id=i, paths=())
              for i in range(n)]

    def record(g):
        return records.CaptionRecord(caption=g.caption, caption_id=g.caption_id,
                                     images=[jpegs[(g.caption_id * k + j) % len(jpegs)]
                                             for j in range(k)], seeds=list(range(k)))

    file_order = [(f"train-{s:05d}.tfrecord", groups[start:start + per])
                  for s, start in enumerate(range(0, n, per))]
    globs = {}
    for layout, plan, meta in (("before", file_order, {}),
                               ("now", import_images.shards_to_import(groups, per),
                                {caption_order.ORDER_KEY: caption_order.order_info()})):
        directory = os.path.join(workdir, layout)
        os.makedirs(directory)
        shards = {}
        for name, chunk in plan:
            records.write_shard(os.path.join(directory, name), [record(g) for g in chunk])
            shards[name] = {"captions": len(chunk), "images": k * len(chunk)}
        records.write_manifest(directory, shards, images_per_caption=k, num_caption_ids=n, **meta)
        globs[layout] = os.path.join(directory, "*.tfrecord")
    return globs


def baseline_tree(commit: str, workdir: str) -> str:
    """The package and configs at `commit`, unpacked into workdir/baseline."""
    tree = os.path.join(workdir, "baseline")
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", REPO, "archive", commit, "stablerep_jax", "configs"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
    return tree


def run_worker(args, tree: str, train_files: str, out_json: str) -> dict:
    env = dict(os.environ, PYTHONPATH=tree, BENCH_TREE=tree, CUDA_VISIBLE_DEVICES="")
    argv = [sys.executable, os.path.abspath(__file__), "--worker", train_files, out_json,
            "--crop", str(args.crop), "--batch", str(args.batch), "--threads", str(args.threads),
            "--permute_window", str(args.permute_window), "--seconds", str(args.seconds)]
    subprocess.run(argv, check=True, env=env, cwd=tree, stdout=subprocess.DEVNULL)
    with open(out_json) as f:
        return json.load(f)


def main():
    args = parse_args()
    if args.worker:
        worker(args)
        return
    sys.path.insert(0, REPO)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from stablerep_jax.data import locality
    results = {"before": [], "now": []}
    with tempfile.TemporaryDirectory() as workdir:
        globs = write_layouts(args, workdir)
        trees = {"before": baseline_tree(args.baseline_commit, workdir), "now": REPO}
        for r in range(args.rounds):
            for layout in ("before", "now"):
                out = os.path.join(workdir, f"{layout}-{r}.json")
                results[layout].append(run_worker(args, trees[layout], globs[layout], out))
    expected = locality.permutation_fraction(args.captions)
    print(f"\n{args.captions} captions in file order, {args.captions_per_shard} per shard, "
          f"K={args.images_per_caption} JPEGs {args.stored_size}px -> {args.crop}px, batch "
          f"{args.batch} captions x 2 images, permutation window {args.permute_window}, tf.data "
          f"threads {args.threads}, {os.cpu_count()} cores visible, {args.rounds} rounds of "
          f"{args.seconds:.0f} s; baseline {args.baseline_commit}")
    print(f"global permutation: {100 * expected:.2f}% of same-batch pairs within "
          f"{locality.near_distance(args.captions)} ids")
    print(f"{'layout + pipeline':<34}{'near pairs':>11}{'ratio':>8}{'img/s wall':>12}"
          f"{'img/s per CPU-s':>17}{'steps/epoch':>13}")
    rates = {}
    for layout, label in (("before", "before (file-order shards)"), ("now", "now (permuted shards)")):
        runs = results[layout]
        labels = [np.asarray(b) for run in runs[:1] for b in run["labels"]]
        fraction = locality.near_pair_fraction(labels, args.captions)
        wall = float(np.median([run["views"] / run["wall"] for run in runs]))
        cpu = float(np.median([run["views"] / run["cpu"] for run in runs]))
        rates[layout] = (wall, cpu)
        print(f"{label:<34}{100 * fraction:>10.2f}%{fraction / expected:>8.2f}{wall:>12.1f}"
              f"{cpu:>17.1f}{runs[0]['steps_per_epoch']:>13}")
    print(f"rate now / before: wall {rates['now'][0] / rates['before'][0]:.2f}x, per CPU-second "
          f"{rates['now'][1] / rates['before'][1]:.2f}x (acceptance: >= 0.80)")
    batches = len(results["now"][0]["labels"])
    print(f"near-pair ratios from the first round's {batches} batches "
          f"({batches / results['now'][0]['steps_per_epoch']:.1f} epochs); bound {BOUND}")


if __name__ == "__main__":
    main()
