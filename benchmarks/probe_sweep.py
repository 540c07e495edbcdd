r"""Linear-probe benchmarks: the side-by-side lr sweep's speed, and what the cached-features
shortcut costs in accuracy against the reference protocol.

  python benchmarks/probe_sweep.py                                  # sweep speed, CPU-sized
  python benchmarks/probe_sweep.py --num 1281167 --dim 768 --classes 1000 --batch 1024 \
      --epochs 2 --no-separate                                      # ImageNet-sized, accelerator
  python benchmarks/probe_sweep.py --compare-modes                  # accuracy gap, tiny case
  python benchmarks/probe_sweep.py --epoch-timing --num 1281167 --dim 768 --classes 1000 \
      --batch 1024 --lrs 10                                         # cached features: now vs old

Sweep speed: random features stand in for frozen CLS features. Both sides run the same code
(`linear_probe.cached_epoch_runner`): once with all H lrs stacked (one vmapped update per
step), then H times with one lr (skipped with --no-separate). Each runner's first epoch compiles
and is not timed; prints the median seconds of the later epochs of each and the ratio. The
features stay on the devices, split by rows (each device holds N x D x 4 / devices bytes of
them: 3.9 GB for ImageNet and ViT-B in all, 0.49 GB per device of 8).

Mode gap (`--compare-modes`): a random-init tiny ViT (1 block, width 192, patch 8, 32px) probed
on toy-world renders labelled by one caption attribute, once with mode "augmented" (the
reference: RandomResizedCrop + flip every epoch) and once with "cached_features" (centre crops
extracted once), same lrs, epochs and evaluation cadence; prints the best top-1 of each. It is a
tiny case that runs on a CPU, not a prediction of the ImageNet gap. Nothing is asserted.

Epoch timing (`--epoch-timing`): seconds per epoch and per test evaluation of the cached-features
mode on random features, for (a) the code `linear_probe` runs today (features put on the devices
once, split by rows over `data`; each epoch uploads only its [steps, batch] int32 order, and each
step gathers its rows from the devices holding them with one reduce-scatter; the evaluator
uploads the test features once and is compiled once) and (b) the path
it replaced (commit 0e96d18), rebuilt here as the baseline: the features stay host numpy, each
epoch permutes them with numpy (`feats[order]`) and uploads the permuted copy sharded over
`data`, and each evaluation builds a new jit of a new partial and uploads the test features again.
Both use the same initial heads and data order, so they train the same heads. Epoch 1 includes
compilation and is reported apart, then the median of the rest. Prints the bytes each moves
host -> device per epoch and per evaluation, and the bytes of training features (a) keeps on
each device (measured from the live arrays' shards). On a CPU the "device" is the host: an upload is a
memory copy, not a PCIe or ICI transfer, so the numbers there say what the copies cost on that
machine.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import resource
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from stablerep_jax import checkpoint, config_utils, linear_probe, parallel  # noqa: E402
from stablerep_jax.demo import toy_world  # noqa: E402
from stablerep_jax.models.encoder import build_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ENCODER = {"variant": "tiny", "depth": 1, "patch_size": 8, "mlp_dim": 32, "emb_dim": 16,
                "dtype": "float32", "image_size": 32}


def sweep_epoch_seconds(feats: np.ndarray, labels: np.ndarray, classes: int,
                        lrs: Sequence[float], epochs: int, batch: int, mesh) -> float:
    """Seconds per epoch of `linear_probe`'s cached-features epoch training one head per lr,
    after the first epoch (which compiles: each runner is a new jit)."""
    hp = linear_probe.make_hparams(lrs, epochs, len(feats) // batch, use_bn=True)
    run_epoch = linear_probe.cached_epoch_runner(feats, labels, hp, batch, mesh)
    state = jax.device_put(linear_probe.init_heads(0, len(lrs), feats.shape[1], classes),
                           parallel.replicated(mesh))
    seconds = []
    for epoch in range(epochs):
        start = time.perf_counter()
        state, losses = run_epoch(state, epoch)
        np.asarray(jax.device_get(losses))
        seconds.append(time.perf_counter() - start)
    return _steady(seconds)


def sweep_speed(args) -> None:
    if args.epochs < 2:
        raise ValueError(f"--epochs {args.epochs}: need >= 2 (epoch 1 compiles; the rest are "
                         "timed)")
    feats, labels, _ = random_features(args.num, args.dim, args.classes, 0.0, 0)
    lrs = tuple(np.geomspace(0.001, 0.5, args.lrs) * args.batch / 256)
    mesh = parallel.make_mesh()
    timing = functools.partial(sweep_epoch_seconds, feats, labels, args.classes,
                               epochs=args.epochs, batch=args.batch, mesh=mesh)
    together = timing(lrs)
    print(f"devices {jax.device_count()} ({jax.devices()[0].platform}); {args.num} x {args.dim} "
          f"features, {args.classes} classes, batch {args.batch}, {args.lrs} lrs; seconds per "
          f"epoch after epoch 1 (compiles)")
    print(f"side by side : {together:8.3f} s/epoch for all {args.lrs} heads")
    if args.no_separate:
        return
    separate = sum(timing((lr,)) for lr in lrs)
    print(f"one per run  : {separate:8.3f} s/epoch summed over {args.lrs} runs")
    print(f"speed-up     : {separate / together:8.2f}x")


# --------------------------------------------------------------------------------------------
# Epoch timing: cached features on the devices (today) vs the host round trip (before)

GB = 1e9


def random_features(num: int, dim: int, classes: int, signal: float, seed: int,
                    centroids: Optional[np.ndarray] = None, chunk: int = 1 << 16
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [num, dim] f32, labels [num] int32, class centroids [classes, dim]): N(0, 1)
    noise plus `signal` x the label's centroid (0 = pure noise; ~1 separates the classes). Drawn
    in float32 and in chunks, so the only big array alive is the result."""
    rng = np.random.default_rng(seed)
    if centroids is None:
        centroids = rng.standard_normal((classes, dim), dtype=np.float32)
    labels = rng.integers(0, classes, num).astype(np.int32)
    feats = np.empty((num, dim), np.float32)
    for start in range(0, num, chunk):
        part = feats[start:start + chunk]
        rng.standard_normal(part.shape, dtype=np.float32, out=part)
        if signal:
            part += np.float32(signal) * centroids[labels[start:start + chunk]]
    return feats, labels, centroids


def host_round_trip_runner(feats: np.ndarray, labels: np.ndarray, hp, batch_size: int, mesh,
                           seed: int, phases: dict) -> Callable:
    """The cached-features epoch before commit 959ef73 (rebuilt as the baseline): the features
    are host numpy; each epoch permutes them with numpy into [steps, batch, D], uploads that copy
    sharded over `data` and scans it. Appends each phase's seconds to `phases[name]`."""
    steps = len(feats) // batch_size
    spec = P(None, parallel.DATA_AXIS)

    def epoch(state, f, l):
        return jax.lax.scan(functools.partial(linear_probe.head_step, hp=hp), state, (f, l))

    rep, data = parallel.replicated(mesh), NamedSharding(mesh, spec)
    epoch_fn = jax.jit(epoch, in_shardings=(rep, data, data), out_shardings=(rep, rep),
                       donate_argnums=(0,))

    def run_epoch(state, epoch_index):
        start = time.perf_counter()
        order = linear_probe._epoch_order(seed, epoch_index, len(feats), steps, batch_size)
        f, l = feats[order], labels[order]     # a permuted host copy
        permuted = time.perf_counter()
        f_dev, l_dev = jax.block_until_ready((parallel.from_host(mesh, f, spec), parallel.from_host(mesh, l, spec)))
        del f, l
        uploaded = time.perf_counter()
        state, losses = jax.block_until_ready(epoch_fn(state, f_dev, l_dev))
        for name, seconds in (("permute", permuted - start), ("upload", uploaded - permuted),
                              ("scan", time.perf_counter() - uploaded)):
            phases.setdefault(name, []).append(seconds)
        return state, losses.mean(axis=0)

    return run_epoch


def _eval_chunk(num: int, n_dev: int, chunk: int = 4096) -> int:
    """The old evaluation's rows per upload: a multiple of the devices, at most `chunk`."""
    return max(n_dev, min(chunk, -(-num // n_dev) * n_dev) // n_dev * n_dev)


def rejit_evaluate(state, feats: np.ndarray, labels: np.ndarray, num_classes: int, use_bn: bool,
                   mesh, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation before commit 959ef73 (rebuilt as the baseline): every call jits a new
    partial (so it traces and compiles again) and uploads the test features chunk by chunk."""
    chunk = _eval_chunk(len(feats), mesh.shape[parallel.DATA_AXIS], chunk)
    fn = jax.jit(functools.partial(linear_probe.correct_counts, use_bn=use_bn,
                                   top_k=min(5, num_classes)),
                 in_shardings=(parallel.replicated(mesh),) + (parallel.batch_sharded(mesh),) * 3,
                 out_shardings=parallel.replicated(mesh))
    hits1 = hits5 = 0
    for start in range(0, len(feats), chunk):
        part = slice(start, start + chunk)
        valid = len(feats[part])
        f = np.pad(np.asarray(feats[part], np.float32), ((0, chunk - valid), (0, 0)))
        l = np.pad(np.asarray(labels[part], np.int32), (0, chunk - valid))
        m = np.arange(chunk) < valid
        c1, c5 = fn(state, *(parallel.from_host(mesh, a, P(parallel.DATA_AXIS)) for a in (f, l, m)))
        hits1, hits5 = hits1 + np.asarray(c1), hits5 + np.asarray(c5)
    return hits1 / len(feats), hits5 / len(feats)


def _padded_rows(num: int, n_dev: int) -> int:
    """Rows the old evaluation uploads per call: whole chunks, the last one padded."""
    chunk = _eval_chunk(num, n_dev)
    return -(-num // chunk) * chunk


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GB:.2f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:.1f} MB"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB   # Linux: KiB


def time_variant(name: str, run_epoch: Callable, evaluate: Callable, state, epochs: int,
                 eval_calls: int) -> dict:
    """Runs `epochs` epochs, then `eval_calls` evaluations, timing each (synchronised) and
    printing each time as it comes (an ImageNet-sized epoch on a CPU takes minutes)."""
    epoch_s = []
    for epoch in range(epochs):
        start = time.perf_counter()
        state, losses = run_epoch(state, epoch)
        np.asarray(jax.device_get(losses))                 # what fit_heads does every epoch
        epoch_s.append(time.perf_counter() - start)
        print(f"  {name}: epoch {epoch + 1} {epoch_s[-1]:.2f} s", flush=True)
    eval_s, top1 = [], None
    for _ in range(eval_calls):
        start = time.perf_counter()
        top1, _ = evaluate(state)
        eval_s.append(time.perf_counter() - start)
        print(f"  {name}: evaluation {len(eval_s)} {eval_s[-1]:.2f} s", flush=True)
    return {"epoch_s": epoch_s, "eval_s": eval_s, "top1": np.asarray(top1),
            "kernel": np.asarray(jax.device_get(state.kernel)), "peak_rss_gb": _peak_rss_gb()}


def _bytes_on_first_device(arrays) -> int:
    """Bytes the first device holds of these arrays (its shards; all of a replicated one)."""
    first = jax.devices()[0]
    return sum(s.data.nbytes for x in arrays for s in x.addressable_shards if s.device == first)


def _steady(seconds: Sequence[float]) -> float:
    """Median seconds after the first call (which compiles; the median resists a busy machine's
    spikes); the first call if there is only one."""
    return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def epoch_timing(args, mesh=None) -> dict:
    """Times (a) today's cached-features path and (b) the host round trip it replaced, on the
    same random features, heads and data order; returns both variants' timings and results."""
    if args.epochs < 2:
        raise ValueError(f"--epochs {args.epochs}: need >= 2 (epoch 1 compiles; the rest are "
                         "timed)")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    train_f, train_l, centroids = random_features(args.num, args.dim, args.classes, args.signal, 0)
    test_f, test_l, _ = random_features(args.test_num, args.dim, args.classes, args.signal, 1,
                                        centroids)
    steps = args.num // args.batch
    if steps == 0:
        raise ValueError(f"--batch {args.batch} is larger than --num {args.num}")
    lrs = tuple(np.geomspace(0.001, 0.5, args.lrs) * args.batch / 256)
    hp = linear_probe.make_hparams(lrs, args.epochs, steps, use_bn=args.use_bn)

    def fresh_state():
        return jax.device_put(linear_probe.init_heads(0, args.lrs, args.dim, args.classes),
                              parallel.replicated(mesh))

    results = {"num": args.num, "dim": args.dim, "classes": args.classes, "batch": args.batch,
               "steps": steps, "heads": args.lrs, "test_num": args.test_num,
               "devices": mesh.size, "platform": jax.devices()[0].platform,
               "train_gb": train_f.nbytes / GB}
    # (a) today: the features go up once; an epoch uploads its int32 order only.
    start = time.perf_counter()
    live_before = {id(x) for x in jax.live_arrays()}
    run_epoch = linear_probe.cached_epoch_runner(train_f, train_l, hp, args.batch, mesh)
    held = _bytes_on_first_device([x for x in jax.live_arrays() if id(x) not in live_before])
    evaluate = linear_probe.make_evaluator(test_f, test_l, args.classes, args.use_bn, mesh)
    setup_s = time.perf_counter() - start
    a = time_variant("(a)", run_epoch, evaluate, fresh_state(), args.epochs, args.eval_calls)
    a.update(setup_s=setup_s, epoch_bytes=steps * args.batch * 4, eval_bytes=0,
             train_bytes_per_device=held)
    results["on_device"] = a
    del run_epoch, evaluate                                   # free the device copy before (b)
    gc.collect()
    # (b) before: permute on the host, upload the permuted copy, every epoch.
    phases: dict = {}
    run_epoch = host_round_trip_runner(train_f, train_l, hp, args.batch, mesh, 0, phases)
    b = time_variant("(b)", run_epoch, functools.partial(
        rejit_evaluate, feats=test_f, labels=test_l, num_classes=args.classes,
        use_bn=args.use_bn, mesh=mesh), fresh_state(), args.epochs, args.eval_calls)
    b.update(setup_s=0.0, phases={k: _steady(v) for k, v in phases.items()},
             epoch_bytes=steps * args.batch * (args.dim * 4 + 4),
             eval_bytes=_padded_rows(args.test_num, mesh.shape[parallel.DATA_AXIS])
             * (args.dim * 4 + 4 + 1))
    results["host_round_trip"] = b
    return results


def print_epoch_timing(r: dict) -> None:
    a, b = r["on_device"], r["host_round_trip"]
    print(f"{r['num']} x {r['dim']} random f32 features ({r['train_gb']:.2f} GB), {r['classes']} "
          f"classes, batch {r['batch']} ({r['steps']} steps/epoch), {r['heads']} heads; "
          f"{r['test_num']} test; {r['devices']} device(s) ({r['platform']})")
    for name, v in (("(a) on device, today  ", a), ("(b) host round trip   ", b)):
        print(f"{name}: epoch 1 (compiles) {v['epoch_s'][0]:7.2f} s, then "
              f"{_steady(v['epoch_s']):7.2f} s/epoch; evaluation {_steady(v['eval_s']):6.2f} s "
              f"per call (first {v['eval_s'][0]:.2f} s); host->device "
              f"{_size(v['epoch_bytes'])}/epoch, {_size(v['eval_bytes'])}/evaluation; peak RSS "
              f"{v['peak_rss_gb']:.1f} GB")
    print(f"    (a) one-off setup (features up once, evaluator built): {a['setup_s']:.2f} s; "
          f"training features held per device: {_size(a['train_bytes_per_device'])} of "
          f"{r['train_gb']:.2f} GB")
    print("    (b) per epoch: " + ", ".join(f"{k} {v:.2f} s" for k, v in b["phases"].items())
          + " (after epoch 1)")
    print(f"ratio (b)/(a): {_steady(b['epoch_s']) / _steady(a['epoch_s']):.2f}x per epoch, "
          f"{_steady(b['eval_s']) / _steady(a['eval_s']):.2f}x per evaluation; best top-1 "
          f"(a) {a['top1'].max():.4f}, (b) {b['top1'].max():.4f}")
    if r["platform"] == "cpu":
        print("note: on a CPU the devices are the host, so (b)'s upload is a memory copy, not a "
              "PCIe/ICI transfer; the ratio is what the copies cost on this machine")


def save_random_encoder(directory: str, seed: int) -> str:
    model = build_model(TINY_ENCODER)
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
            c = config_utils.load_config(
                os.path.join(REPO, "configs", "linear_probe.py") + ":folder")
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=8192, help="training examples")
    parser.add_argument("--dim", type=int, default=384, help="feature width")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3,
                        help="the first compiles; the median of the rest is reported")
    parser.add_argument("--lrs", type=int, default=10, help="heads in the sweep")
    parser.add_argument("--no-separate", action="store_true",
                        help="time only the side-by-side sweep (for ImageNet-sized features)")
    parser.add_argument("--epoch-timing", action="store_true",
                        help="time cached-features epochs: on the devices (today) vs the host "
                             "round trip it replaced")
    parser.add_argument("--test-num", type=int, default=50_000,
                        help="--epoch-timing: test examples (ImageNet val: 50000)")
    parser.add_argument("--eval-calls", type=int, default=2,
                        help="--epoch-timing: evaluations timed per variant (first compiles)")
    parser.add_argument("--signal", type=float, default=0.0,
                        help="--epoch-timing: class-centroid scale added to the noise (0: "
                             "random labels; ~1: separable)")
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
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = make_parser().parse_args(argv)
    if args.compare_modes:
        mode_gap(args)
    elif args.epoch_timing:
        print_epoch_timing(epoch_timing(args))
    else:
        sweep_speed(args)


if __name__ == "__main__":
    main()
