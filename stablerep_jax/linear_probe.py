r"""Linear probe on frozen CLS features: every base lr of a sweep trained side by side in one pass.

  python -m stablerep_jax.linear_probe --config=configs/linear_probe.py:imagenet2012 \
      --config.checkpoint=RUN_DIR --config.data_dir=/data/tfds --workdir=RUN_DIR/probe

The reference protocol: SGD momentum 0.9, no weight decay, lr = blr x batch / 256 with a cosine
schedule, optional BatchNorm without affine before the linear layer, heads initialised with a
truncated normal of std 0.01. All heads share each batch (same data order), so the sweep is one
vmapped update over stacked heads: it equals running each lr alone. Modes:
  cached_features  centre-crop features are extracted once; an epoch is one compiled scan
  augmented        RandomResizedCrop + flip views go through the frozen encoder every step
Batches are sharded over the `data` mesh axis (every device of every host); BatchNorm statistics
and the loss are over the global batch. Test accuracy counts every test example exactly once
(padding is masked). Writes WORKDIR/results.json, metrics.jsonl + TensorBoard, best_head/.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from stablerep_jax import features as features_lib
from stablerep_jax import checkpoint, fileio, knn, parallel
from stablerep_jax.data import eval_data
from stablerep_jax.metrics import MetricWriter

MODES = ("cached_features", "augmented")
BN_EPS = 1e-6          # the reference: BatchNorm1d(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1      # PyTorch convention: running = 0.9 running + 0.1 batch
INIT_STD = 0.01
BEST_HEAD = "best_head"


# --------------------------------------------------------------------------------------------
# Heads: pure functions on a stack of H linear classifiers


@flax.struct.dataclass
class HeadState:
    step: jax.Array          # int32 []
    kernel: jax.Array        # [H, D, C]
    bias: jax.Array          # [H, C]
    kernel_trace: jax.Array  # SGD momentum buffers
    bias_trace: jax.Array
    bn_mean: jax.Array       # [D] running statistics; BN has no parameters, so heads share them
    bn_var: jax.Array


@dataclasses.dataclass(frozen=True)
class HeadHParams:
    lrs: tuple[float, ...]   # absolute peak lr per head
    total_steps: int
    warmup_steps: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0
    use_bn: bool = False


def init_heads(seed: int, num_heads: int, dim: int, num_classes: int) -> HeadState:
    """Every head starts from the same weights (so each equals a run with its lr alone)."""
    kernel = INIT_STD * jax.random.truncated_normal(jax.random.PRNGKey(seed), -2.0, 2.0,
                                                    (dim, num_classes), jnp.float32)
    kernel = jnp.broadcast_to(kernel, (num_heads, dim, num_classes))
    bias = jnp.zeros((num_heads, num_classes), jnp.float32)
    return HeadState(step=jnp.zeros((), jnp.int32), kernel=kernel, bias=bias,
                     kernel_trace=jnp.zeros_like(kernel), bias_trace=jnp.zeros_like(bias),
                     bn_mean=jnp.zeros((dim,), jnp.float32), bn_var=jnp.ones((dim,), jnp.float32))


def lr_factor(hp: HeadHParams, step) -> jax.Array:
    """Linear warmup, then half-cycle cosine to 0 (per step)."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.asarray(max(hp.warmup_steps, 1), jnp.float32)
    decay = jnp.asarray(max(hp.total_steps - hp.warmup_steps, 1), jnp.float32)
    cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip((step - hp.warmup_steps) / decay, 0.0, 1.0)))
    return jnp.where(step < hp.warmup_steps, step / warm, cosine)


def _normalize_train(state: HeadState, x, hp: HeadHParams):
    if not hp.use_bn:
        return x, state
    mean, var = jnp.mean(x, axis=0), jnp.var(x, axis=0)
    n = x.shape[0]
    unbiased = var * n / max(n - 1, 1)
    state = state.replace(bn_mean=(1 - BN_MOMENTUM) * state.bn_mean + BN_MOMENTUM * mean,
                          bn_var=(1 - BN_MOMENTUM) * state.bn_var + BN_MOMENTUM * unbiased)
    return (x - mean) * jax.lax.rsqrt(var + BN_EPS), state


def _normalize_eval(state: HeadState, x, use_bn: bool):
    if not use_bn:
        return x
    return (x - state.bn_mean) * jax.lax.rsqrt(state.bn_var + BN_EPS)


def _head_loss(kernel, bias, x, labels):
    logits = x @ kernel + bias
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def head_step(state: HeadState, batch: tuple, hp: HeadHParams) -> tuple[HeadState, jax.Array]:
    """One SGD step of every head on (features [B, D], labels [B]); returns per-head losses.

    PyTorch SGD semantics: trace = momentum * trace + (grad + wd * w); w -= lr * trace.
    """
    feats, labels = batch
    x, state = _normalize_train(state, feats.astype(jnp.float32), hp)
    losses, (g_kernel, g_bias) = jax.vmap(
        jax.value_and_grad(_head_loss, argnums=(0, 1)), in_axes=(0, 0, None, None))(
            state.kernel, state.bias, x, labels)
    g_kernel = g_kernel + hp.weight_decay * state.kernel
    g_bias = g_bias + hp.weight_decay * state.bias
    kernel_trace = hp.momentum * state.kernel_trace + g_kernel
    bias_trace = hp.momentum * state.bias_trace + g_bias
    lrs = jnp.asarray(hp.lrs, jnp.float32) * lr_factor(hp, state.step)
    state = state.replace(step=state.step + 1,
                          kernel=state.kernel - lrs[:, None, None] * kernel_trace,
                          bias=state.bias - lrs[:, None] * bias_trace,
                          kernel_trace=kernel_trace, bias_trace=bias_trace)
    return state, losses


def correct_counts(state: HeadState, feats, labels, mask, use_bn: bool, top_k: int):
    """(top-1 hits [H], top-k hits [H]) over the unmasked rows."""
    x = _normalize_eval(state, feats.astype(jnp.float32), use_bn)
    logits = jnp.einsum("bd,hdc->hbc", x, state.kernel) + state.bias[:, None, :]
    _, top = jax.lax.top_k(logits, top_k)                                  # [H, B, k]
    hits = top == labels[None, :, None]
    valid = mask[None, :].astype(jnp.int32)
    return (jnp.sum(hits[..., 0] * valid, axis=1), jnp.sum(jnp.any(hits, -1) * valid, axis=1))


# --------------------------------------------------------------------------------------------
# Training and evaluation over a mesh


def _epoch_order(seed: int, epoch: int, num_examples: int, steps: int, batch: int) -> np.ndarray:
    """[steps, batch] example indices of one epoch; depends on (seed, epoch) only."""
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x11EA])).permutation(
        num_examples)
    return perm[:steps * batch].reshape(steps, batch)


def _global_from_host(mesh, array: np.ndarray, spec: P) -> jax.Array:
    """An array every host holds in full -> a global array (each host fills its own shards)."""
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def make_epoch_fn(hp: HeadHParams, mesh):
    """jit(state, feats [S, B, D], labels [S, B]) -> (state, losses [S, H]): one epoch, one scan."""
    def epoch(state, feats, labels):
        return jax.lax.scan(functools.partial(head_step, hp=hp), state, (feats, labels))

    rep = parallel.replicated(mesh)
    data = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
    return jax.jit(epoch, in_shardings=(rep, data, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def train_heads_on_features(feats: np.ndarray, labels: np.ndarray, num_classes: int,
                            hp_lrs: Sequence[float], epochs: int, batch_size: int, mesh,
                            seed: int = 0, momentum: float = 0.9, weight_decay: float = 0.0,
                            warmup_epochs: float = 0.0, use_bn: bool = False,
                            on_epoch=None) -> tuple[HeadState, np.ndarray]:
    """Trains one head per absolute lr in `hp_lrs` on cached features (every host holds all of
    them). Returns the final state and the mean training loss per epoch and head [E, H].
    `on_epoch(epoch, state, losses)` is called after each epoch (evaluation, logging)."""
    steps = len(feats) // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(feats)} training examples")
    hp = HeadHParams(lrs=tuple(float(x) for x in hp_lrs), total_steps=epochs * steps,
                     warmup_steps=int(round(warmup_epochs * steps)), momentum=float(momentum),
                     weight_decay=float(weight_decay), use_bn=bool(use_bn))
    state = jax.device_put(init_heads(seed, len(hp.lrs), feats.shape[1], num_classes),
                           parallel.replicated(mesh))
    epoch_fn = make_epoch_fn(hp, mesh)
    feats = np.asarray(feats, np.float32)
    labels = np.asarray(labels, np.int32)
    history = []
    for epoch in tqdm(range(epochs), desc="probe epochs", unit="epoch",
                      disable=jax.process_index() != 0):
        order = _epoch_order(seed, epoch, len(feats), steps, batch_size)
        spec = P(None, parallel.DATA_AXIS)
        state, losses = epoch_fn(state, _global_from_host(mesh, feats[order], spec),
                                 _global_from_host(mesh, labels[order], spec))
        history.append(np.asarray(jax.device_get(losses)).mean(axis=0))
        if on_epoch is not None:
            on_epoch(epoch, state, history[-1])
    return state, np.stack(history)


def evaluate_heads(state: HeadState, feats: np.ndarray, labels: np.ndarray, num_classes: int,
                   use_bn: bool, mesh, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 [H], top-5 [H]) fractions over all test examples (last chunk padded + masked)."""
    n_dev = mesh.shape[parallel.DATA_AXIS]
    chunk = max(n_dev, min(chunk, -(-len(feats) // n_dev) * n_dev) // n_dev * n_dev)
    top_k = min(5, num_classes)
    fn = jax.jit(functools.partial(correct_counts, use_bn=use_bn, top_k=top_k),
                 in_shardings=(parallel.replicated(mesh),) + (parallel.batch_sharded(mesh),) * 3,
                 out_shardings=parallel.replicated(mesh))
    hits1 = hits5 = 0
    for start in range(0, len(feats), chunk):
        part = slice(start, start + chunk)
        valid = len(feats[part])
        pad = chunk - valid
        f = np.pad(np.asarray(feats[part], np.float32), ((0, pad), (0, 0)))
        l = np.pad(np.asarray(labels[part], np.int32), (0, pad))
        m = np.arange(chunk) < valid
        c1, c5 = fn(state, *(_global_from_host(mesh, a, P(parallel.DATA_AXIS)) for a in (f, l, m)))
        hits1, hits5 = hits1 + np.asarray(c1), hits5 + np.asarray(c5)
    return hits1 / len(feats), hits5 / len(feats)


def make_augmented_step(encode_fn, hp: HeadHParams, mesh):
    """jit(state, encoder variables, images [B, S, S, 3], labels [B]) -> (state, losses [H])."""
    def step(state, variables, images, labels):
        feats = jax.lax.stop_gradient(encode_fn(variables, images))
        return head_step(state, (feats, labels), hp)

    rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, rep, data, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))


# --------------------------------------------------------------------------------------------
# The job


def check_config(config) -> None:
    if not config.checkpoint:
        raise ValueError("set --config.checkpoint to a `train` or `convert` output directory")
    if config.mode not in MODES:
        raise ValueError(f"mode={config.mode!r}: choose one of {MODES}")
    lrs = tuple(config.base_lrs)
    if not lrs or any(float(x) <= 0 for x in lrs) or len(set(lrs)) != len(lrs):
        raise ValueError(f"base_lrs={lrs}: need distinct positive values")
    for field, low in (("epochs", 1), ("batch_size", 1), ("extract_batch_size", 1)):
        if config[field] < low:
            raise ValueError(f"{field}={config[field]}: must be >= {low}")
    if not 0.0 <= config.momentum < 1.0 or config.weight_decay < 0:
        raise ValueError(f"momentum={config.momentum}, weight_decay={config.weight_decay}: need "
                         "0 <= momentum < 1 and weight_decay >= 0")
    if not 0.0 <= config.warmup_epochs < config.epochs:
        raise ValueError(f"warmup_epochs={config.warmup_epochs}: must be in [0, epochs)")


def effective_batch(requested: int, num_train: int, n_dev: int) -> int:
    """The global batch: a multiple of the devices, at most the training set (tiny folders)."""
    if requested % n_dev:
        raise ValueError(f"batch_size {requested} is not divisible by the {n_dev} devices")
    if requested <= num_train:
        return requested
    batch = num_train // n_dev * n_dev
    if batch == 0:
        raise ValueError(f"the training split has {num_train} examples, fewer than the {n_dev} devices")
    logging.warning("batch_size %d > %d training examples: using %d", requested, num_train, batch)
    return batch


def _lr_key(base_lr: float) -> str:
    return f"{float(base_lr):g}"


def run(config, workdir: str, mesh=None) -> dict:
    """Probes `config.checkpoint` on `config.dataset`; returns and writes results.json."""
    start = time.time()
    check_config(config)
    # Cheap checks first: the checkpoint path, then the dataset, before any device work.
    checkpoint.resolve_step_dir(config.checkpoint, config.checkpoint_step)
    data = eval_data.load_eval_dataset(config.dataset, config.data_dir, config.train_split,
                                       config.test_split, config.image_key, config.label_key)
    encoder = features_lib.load_encoder(config.checkpoint, config.checkpoint_step,
                                        config.image_size)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    n_dev = mesh.shape[parallel.DATA_AXIS]
    batch = effective_batch(config.batch_size, data.train.num_examples, n_dev)
    base_lrs = tuple(float(x) for x in config.base_lrs)
    lrs = tuple(b * batch / 256.0 for b in base_lrs)
    logging.info("probe %s on %s (%d classes, %d train / %d test), %d devices, batch %d, mode %s",
                 config.checkpoint, data.name, data.num_classes, data.train.num_examples,
                 data.test.num_examples, n_dev, batch, config.mode)

    monitor = knn.KnnMonitor(encoder.model, data, encoder.image_size, mesh, config.knn.k,
                             config.knn.temperature, config.extract_batch_size)
    variables = features_lib.replicate(encoder.variables, mesh)
    test_f, test_l, _ = monitor.features(variables, data.test, "test features")
    train_f = train_l = None
    if config.mode == "cached_features" or config.knn.enabled:
        train_f, train_l, _ = monitor.features(variables, data.train, "train features")

    writer = MetricWriter(workdir)
    eval_every = config.eval_every

    def on_epoch(epoch, state, losses):
        scalars = {f"train_loss/blr={_lr_key(b)}": float(v) for b, v in zip(base_lrs, losses)}
        if eval_every > 0 and (epoch + 1) % eval_every == 0 and epoch + 1 < config.epochs:
            top1, _ = evaluate_heads(state, test_f, test_l, data.num_classes, config.use_bn, mesh)
            scalars.update({f"test_top1/blr={_lr_key(b)}": float(v) for b, v in zip(base_lrs, top1)})
        writer.write(epoch + 1, scalars)

    try:
        if config.mode == "cached_features":
            state, history = train_heads_on_features(
                train_f, train_l, data.num_classes, lrs, config.epochs, batch, mesh,
                seed=config.seed, momentum=config.momentum, weight_decay=config.weight_decay,
                warmup_epochs=config.warmup_epochs, use_bn=config.use_bn, on_epoch=on_epoch)
        else:
            state, history = _train_augmented(config, data, monitor, variables, encoder.width,
                                              lrs, batch, mesh, on_epoch)
        top1, top5 = evaluate_heads(state, test_f, test_l, data.num_classes, config.use_bn, mesh)
        writer.write(config.epochs, {**{f"test_top1/blr={_lr_key(b)}": float(v)
                                        for b, v in zip(base_lrs, top1)},
                                     **{f"test_top5/blr={_lr_key(b)}": float(v)
                                        for b, v in zip(base_lrs, top5)}})
    finally:
        writer.close()

    best = int(np.argmax(top1))
    results = {
        "best_top1": float(top1[best]), "best_top5": float(top5[best]),
        "best_lr": base_lrs[best], "best_abs_lr": lrs[best],
        "top1": {_lr_key(b): float(v) for b, v in zip(base_lrs, top1)},
        "top5": {_lr_key(b): float(v) for b, v in zip(base_lrs, top5)},
        "per_lr": [{"base_lr": b, "lr": lr, "top1": float(t1), "top5": float(t5),
                    "final_train_loss": float(loss)}
                   for b, lr, t1, t5, loss in zip(base_lrs, lrs, top1, top5, history[-1])],
        "dataset": data.name, "checkpoint": str(config.checkpoint), "mode": config.mode,
        "use_bn": bool(config.use_bn), "epochs": int(config.epochs), "batch_size": batch,
        "num_classes": data.num_classes, "num_train": data.train.num_examples,
        "num_test": data.test.num_examples, "image_size": encoder.image_size,
        "feature_dim": encoder.width, "devices": n_dev,
    }
    if config.knn.enabled:
        results.update(knn.knn_classify(train_f, train_l, test_f, test_l, data.num_classes,
                                        config.knn.k, config.knn.temperature, mesh))
    save_head(os.path.join(workdir, BEST_HEAD), state, best, {
        "base_lr": base_lrs[best], "lr": lrs[best], "top1": float(top1[best]),
        "use_bn": bool(config.use_bn), "class_names": list(data.class_names),
        "checkpoint": str(config.checkpoint), "dataset": data.name})
    results["seconds"] = round(time.time() - start, 1)
    if jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, "results.json"), results)
    logging.info("best top-1 %.4f at base lr %g (%s)", results["best_top1"], results["best_lr"],
                 ", ".join(f"{k}: {v:.4f}" for k, v in results["top1"].items()))
    return results


def _train_augmented(config, data, monitor, variables, width, lrs, batch, mesh, on_epoch):
    """The reference protocol: fresh RandomResizedCrop + flip views every epoch."""
    steps = eval_data.train_steps_per_epoch(data.train, batch)
    hp = HeadHParams(lrs=lrs, total_steps=config.epochs * steps,
                     warmup_steps=int(round(config.warmup_epochs * steps)),
                     momentum=float(config.momentum), weight_decay=float(config.weight_decay),
                     use_bn=bool(config.use_bn))
    state = jax.device_put(init_heads(config.seed, len(lrs), width, data.num_classes),
                           parallel.replicated(mesh))
    step_fn = make_augmented_step(monitor.encode, hp, mesh)
    history = []
    for epoch in tqdm(range(config.epochs), desc="probe epochs", unit="epoch",
                      disable=jax.process_index() != 0):
        losses = []
        for host_batch in eval_data.train_batches(
                data.train, monitor.image_size, batch, config.seed, epoch, config.shuffle_buffer,
                jax.process_index(), jax.process_count()):
            g = parallel.global_batch(mesh, {"image": host_batch["image"],
                                             "label": host_batch["label"]})
            state, loss = step_fn(state, variables, g["image"], g["label"])
            losses.append(loss)
        history.append(np.mean(np.asarray(jax.device_get(losses)), axis=0))
        on_epoch(epoch, state, history[-1])
    return state, np.stack(history)


# --------------------------------------------------------------------------------------------
# Best head checkpoint


def save_head(path: str, state: HeadState, index: int, meta: dict) -> None:
    """Head `index` (kernel [D, C], bias [C], BN running statistics) + JSON meta, via orbax
    (written to a temporary name and renamed; every process must call it)."""
    head = {"kernel": np.asarray(jax.device_get(state.kernel[index])),
            "bias": np.asarray(jax.device_get(state.bias[index])),
            "bn_mean": np.asarray(jax.device_get(state.bn_mean)),
            "bn_var": np.asarray(jax.device_get(state.bn_var))}
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        checkpointer.save(os.path.abspath(path), force=True, args=ocp.args.Composite(
            head=ocp.args.StandardSave(head), meta=ocp.args.JsonSave(meta)))
    finally:
        checkpointer.close()


def load_head(path: str) -> tuple[dict, dict]:
    """(head arrays, meta) of a `save_head` directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no probe head at {path}")
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        out = checkpointer.restore(os.path.abspath(path), args=ocp.args.Composite(
            head=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        checkpointer.close()
    return {k: np.asarray(v) for k, v in out["head"].items()}, dict(out["meta"])


def predict(head: dict, feats: np.ndarray, use_bn: bool) -> np.ndarray:
    """Class logits of a saved head on features [N, D] (numpy)."""
    x = np.asarray(feats, np.float32)
    if use_bn:
        x = (x - head["bn_mean"]) / np.sqrt(head["bn_var"] + BN_EPS)
    return x @ head["kernel"] + head["bias"]


def main(config):
    parallel.start_job(flags.FLAGS)
    run(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    from stablerep_jax import cli
    cli.define_job_flags("results.json, metrics, TensorBoard and best_head/ go here")
    cli.run(main)
