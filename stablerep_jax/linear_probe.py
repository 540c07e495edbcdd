r"""Linear probe on frozen CLS features: every base lr of a sweep trained side by side in one pass.

  python -m stablerep_jax.linear_probe --config=configs/linear_probe.py:imagenet2012 \
      --config.checkpoint=RUN_DIR --config.data_dir=/data/tfds --workdir=RUN_DIR/probe

The reference protocol (StableRep/main_linear.py), which the presets run by default: features
of the frozen encoder in float32; classifiers trained on fresh RandomResizedCrop + flip views
every epoch (mode "augmented"); SGD momentum 0.9, no weight decay, lr = blr x batch / 256 with
a per-step cosine schedule to 0, batch 1024, 90 epochs, 10 base lrs side by side; heads N(0,
0.01) with zero bias; optional BatchNorm without affine (eps 1e-6) before the linear layer;
the test split evaluated every `eval_every` epochs (and after the last), and the result is the
best top-1 over (epoch, lr). All heads share each batch (same data order), so the sweep is one
vmapped update over stacked heads: it equals running each lr alone.

Mode "cached_features" is a deviation for speed: centre-crop features of the training split are
extracted once and every epoch is one compiled scan over them (no augmentation). They stay on
the devices split by rows (1/devices each) and every step gathers its batch rows there.

Batches are sharded over the `data` mesh axis (every device of every host); BatchNorm statistics
and the loss are over the global batch. Test accuracy counts every test example exactly once
(padding is masked). Process 0 writes WORKDIR/results.json, metrics.jsonl + TensorBoard and
best_head.npz (the head at the best (epoch, lr)), through `fileio` (local paths, gs://).

Resume: after each evaluated epoch the heads, their SGD momentum, the losses, the evaluations
and the best head so far are saved in WORKDIR/probe_checkpoints (orbax; the newest kept), and
rerunning the same command continues from there to the same results as an uninterrupted run
(other settings are refused, naming them). SIGTERM (preemption; `preemption.PreemptionWatch`,
installed first): a cached-features epoch (one compiled scan) is finished, an augmented one is
dropped before its next step; the heads as after the last finished epoch are saved and the job
exits 75 (`cli.EXIT_RESUME`) without results.json. Hosts stop together (JAX's preemption sync
point); during start-up (feature extraction) a single process stops at once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import os
import time
from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from stablerep_jax import features as features_lib
from stablerep_jax import checkpoint, fileio, parallel, preemption
from stablerep_jax.data import eval_data
from stablerep_jax.metrics import MetricWriter

MODES = ("augmented", "cached_features")
BN_EPS = 1e-6          # the reference: SyncBatchNorm(affine=False, eps=1e-6)
BN_MOMENTUM = 0.1      # PyTorch convention: running = 0.9 running + 0.1 batch
INIT_STD = 0.01        # the reference: weight.normal_(0, 0.01), bias zero
BEST_HEAD = "best_head.npz"
RESULTS = "results.json"


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
    """Weights N(0, INIT_STD), biases 0, as the reference. Every head starts from the same draw
    (the reference draws one per head) so that each equals a run with its lr alone."""
    kernel = INIT_STD * jax.random.normal(jax.random.PRNGKey(seed), (dim, num_classes),
                                          jnp.float32)
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


def make_hparams(lrs: Sequence[float], epochs: int, steps_per_epoch: int,
                 momentum: float = 0.9, weight_decay: float = 0.0, warmup_epochs: float = 0.0,
                 use_bn: bool = False) -> HeadHParams:
    return HeadHParams(lrs=tuple(float(x) for x in lrs), total_steps=epochs * steps_per_epoch,
                       warmup_steps=int(round(warmup_epochs * steps_per_epoch)),
                       momentum=float(momentum), weight_decay=float(weight_decay),
                       use_bn=bool(use_bn))


def make_epoch_fn(hp: HeadHParams, mesh):
    """jit(state, feats [N', D], labels [N'] (both `features.shard_rows`), order [S, B]) ->
    (state, losses [S, H]): one epoch as one scan. The features stay on the devices, split by
    rows; each step gathers its batch rows there (`features.make_row_gather`), so every device
    ends up with its own part of the batch and only B x D values move per step."""
    take = features_lib.make_row_gather(mesh)

    def epoch(state, feats, labels, order):
        def step(state, rows):
            return head_step(state, (take(feats, rows), take(labels, rows)), hp)
        return jax.lax.scan(step, state, order)

    rep, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(epoch, in_shardings=(rep, rows, rows, rep), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def cached_epoch_runner(feats: np.ndarray, labels: np.ndarray, hp: HeadHParams, batch_size: int,
                        mesh, seed: int = 0) -> Callable:
    """`run_epoch(state, epoch) -> (state, mean loss [H])` on cached features (every host holds
    all of them): they are put on the devices once, split by rows (each device keeps 1/devices
    of them); each epoch uploads only a fresh permutation (remainder dropped) and runs one
    compiled scan."""
    steps = len(feats) // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(feats)} training examples")
    epoch_fn = make_epoch_fn(hp, mesh)
    on_device = [features_lib.shard_rows(np.asarray(a, dtype), mesh)
                 for a, dtype in ((feats, np.float32), (labels, np.int32))]
    num_examples = len(feats)

    def run_epoch(state, epoch, stop=None):     # one compiled scan: never dropped
        order = _epoch_order(seed, epoch, num_examples, steps, batch_size).astype(np.int32)
        state, losses = epoch_fn(state, *on_device, parallel.from_host(mesh, order, P()))
        return state, jnp.mean(losses, axis=0)

    return run_epoch


def make_augmented_step(encode_fn, hp: HeadHParams, mesh):
    """jit(state, encoder variables, images [B, S, S, 3], labels [B]) -> (state, losses [H])."""
    def step(state, variables, images, labels):
        feats = jax.lax.stop_gradient(encode_fn(variables, images))
        return head_step(state, (feats, labels), hp)

    rep, data = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    return jax.jit(step, in_shardings=(rep, rep, data, data), out_shardings=(rep, rep),
                   donate_argnums=(0,))


def augmented_epoch_runner(split, encode_fn, variables, hp: HeadHParams, batch_size: int,
                           image_size: int, mesh, seed: int = 0,
                           shuffle_buffer: int = 50_000) -> Callable:
    """`run_epoch(state, epoch) -> (state, mean loss [H])` of the reference: every step encodes
    fresh RandomResizedCrop + flip views (`eval_data.train_batches`) with the frozen encoder."""
    step_fn = make_augmented_step(encode_fn, hp, mesh)

    def run_epoch(state, epoch, stop: Optional[Callable[[], bool]] = None):
        """`stop()` is asked before each step; when it says True the epoch is dropped: the
        state it started from comes back (a copy: steps donate theirs) with losses None."""
        start = jax.tree_util.tree_map(jnp.copy, state) if stop is not None else None
        losses = []
        for host_batch in eval_data.train_batches(split, image_size, batch_size, seed, epoch,
                                                  shuffle_buffer, jax.process_index(),
                                                  jax.process_count()):
            if stop is not None and stop():
                return start, None
            g = parallel.global_batch(mesh, {"image": host_batch["image"],
                                             "label": host_batch["label"]})
            state, loss = step_fn(state, variables, g["image"], g["label"])
            losses.append(loss)
        return state, jnp.mean(jnp.stack(losses), axis=0)

    return run_epoch


@dataclasses.dataclass(frozen=True)
class Evaluation:
    epoch: int               # 1-based: after this many epochs
    top1: np.ndarray         # [H] fractions
    top5: np.ndarray


@dataclasses.dataclass
class FitResult:
    state: HeadState
    history: np.ndarray              # [epochs, H] mean training loss
    evaluations: list                # [Evaluation], in epoch order
    best_head: Optional[dict] = None  # host copy of the head at the best (epoch, lr)
    stopped: bool = False            # `stop` ended it early (the state is after len(history))

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def best_top1(self) -> float:
        """The best top-1 of any head so far (-inf before the first evaluation)."""
        return max((float(np.max(e.top1)) for e in self.evaluations), default=-np.inf)


def eval_epochs(epochs: int, eval_every: int) -> tuple[int, ...]:
    """The 1-based epochs after which the heads are tested: every `eval_every` epochs, as the
    reference's (epoch + 1) % eval_freq == 0, plus the last epoch (0 = the last only)."""
    every = range(eval_every, epochs + 1, eval_every) if eval_every > 0 else ()
    return tuple(sorted(set(every) | {epochs}))


def select_best(top1_grid) -> tuple[int, int]:
    """(evaluation index, head index) of the best top-1 in an [evaluations, heads] grid, picked
    as the reference does: the highest; a tie goes to the earlier evaluation, then to the
    earlier lr of the list (it scans epochs then lrs and keeps the first strict maximum)."""
    grid = np.asarray(top1_grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"need a non-empty [evaluations, heads] grid, got shape {grid.shape}")
    return divmod(int(np.argmax(grid)), grid.shape[1])    # argmax: first in row-major order


def head_arrays(state: HeadState, index: int) -> dict:
    """Host copies of head `index` (kernel [D, C], bias [C]) and the shared BN statistics."""
    return {"kernel": np.array(state.kernel[index]), "bias": np.array(state.bias[index]),
            "bn_mean": np.array(state.bn_mean), "bn_var": np.array(state.bn_var)}


def fit_heads(state: HeadState, run_epoch: Callable, epochs: int,
              evaluate: Optional[Callable] = None, eval_at: Sequence[int] = (),
              log: Optional[Callable] = None, *, resume: Optional[FitResult] = None,
              save: Optional[Callable[[FitResult], None]] = None,
              stop: Optional[Callable[[], bool]] = None) -> FitResult:
    """Trains the stacked heads for `epochs` epochs with `run_epoch(state, epoch) -> (state,
    mean loss [H])` (either mode). After each epoch in `eval_at` (1-based) it tests them with
    `evaluate(state) -> (top1 [H], top5 [H])` and keeps a host copy of the head at the best
    (epoch, lr) so far (`select_best`'s rule). `log(epoch, losses, evaluation or None)`.

    `resume`: a fit saved after some epochs (its state replaces `state`); the rest of the
    epochs follow as if it had never stopped. `save(fit so far)` after each evaluated epoch and
    when stopping. `stop()` is asked after each epoch (and passed on to
    `run_epoch(state, epoch, stop=stop)`, which may drop its epoch: it then returns the state
    it started from and losses None); when it says True the fit ends with `stopped`."""
    history, evaluations, best_head = [], [], None
    if resume is not None:
        state, history = resume.state, [np.asarray(h, np.float64) for h in resume.history]
        evaluations, best_head = list(resume.evaluations), resume.best_head

    def so_far(stopped=False):
        losses = np.stack(history) if history else np.zeros((0, state.bias.shape[0]))
        return FitResult(state, losses, list(evaluations), best_head, stopped)

    best_top1, saved = so_far().best_top1, len(history)
    stopped = False
    for epoch in tqdm(range(len(history), epochs), desc="probe epochs", unit="epoch",
                      initial=len(history), total=epochs, disable=jax.process_index() != 0):
        if stop is None:
            state, losses = run_epoch(state, epoch)
        else:
            state, losses = run_epoch(state, epoch, stop=stop)
        if losses is None:                    # dropped: `state` is the one it started from
            stopped = True
            logging.warning("epoch %d dropped (SIGTERM): the heads stay as after epoch %d",
                            epoch + 1, epoch)
            break
        history.append(np.asarray(jax.device_get(losses), np.float64))
        evaluation = None
        if evaluate is not None and epoch + 1 in eval_at:
            top1, top5 = evaluate(state)
            evaluation = Evaluation(epoch + 1, np.asarray(top1), np.asarray(top5))
            evaluations.append(evaluation)
            head = int(np.argmax(evaluation.top1))
            if evaluation.top1[head] > best_top1:
                best_top1, best_head = float(evaluation.top1[head]), head_arrays(state, head)
        if log is not None:
            log(epoch + 1, history[-1], evaluation)
        stopped = stop is not None and epoch + 1 < epochs and stop()
        if save is not None and (evaluation is not None or stopped):
            save(so_far())
            saved = len(history)
        if stopped:
            logging.warning("stopped (SIGTERM) after epoch %d of %d", epoch + 1, epochs)
            break
    if stopped and save is not None and saved != len(history):
        save(so_far())                        # the epoch before a dropped one
    return so_far(stopped)


def train_heads_on_features(feats: np.ndarray, labels: np.ndarray, num_classes: int,
                            hp_lrs: Sequence[float], epochs: int, batch_size: int, mesh,
                            seed: int = 0, momentum: float = 0.9, weight_decay: float = 0.0,
                            warmup_epochs: float = 0.0,
                            use_bn: bool = False) -> tuple[HeadState, np.ndarray]:
    """Trains one head per absolute lr in `hp_lrs` on cached features, without evaluation.
    Returns the final state and the mean training loss per epoch and head [E, H]."""
    hp = make_hparams(hp_lrs, epochs, len(feats) // batch_size, momentum, weight_decay,
                      warmup_epochs, use_bn)
    run_epoch = cached_epoch_runner(feats, labels, hp, batch_size, mesh, seed)
    state = jax.device_put(init_heads(seed, len(hp.lrs), feats.shape[1], num_classes),
                           parallel.replicated(mesh))
    fit = fit_heads(state, run_epoch, epochs)
    return fit.state, fit.history


def make_evaluator(feats: np.ndarray, labels: np.ndarray, num_classes: int, use_bn: bool, mesh,
                   chunk: int = 4096) -> Callable:
    """`evaluate(state) -> (top-1 [H], top-5 [H])` fractions over all test examples. The test
    features go to the devices once, in chunks sharded over `data` (the last one padded with
    masked blanks), and the evaluation is compiled once: one scan over the chunks per call."""
    n_dev = mesh.shape[parallel.DATA_AXIS]
    num = len(feats)
    chunk = max(n_dev, min(chunk, -(-num // n_dev) * n_dev) // n_dev * n_dev)
    chunks = -(-num // chunk)
    pad = chunks * chunk - num
    spec = P(None, parallel.DATA_AXIS)
    f = np.pad(np.asarray(feats, np.float32), ((0, pad), (0, 0))).reshape(chunks, chunk, -1)
    l = np.pad(np.asarray(labels, np.int32), (0, pad)).reshape(chunks, chunk)
    m = (np.arange(chunks * chunk) < num).reshape(chunks, chunk)
    on_device = [parallel.from_host(mesh, a, spec) for a in (f, l, m)]
    count = functools.partial(correct_counts, use_bn=use_bn, top_k=min(5, num_classes))

    def hits(state, f, l, m):
        def body(total, xs):
            c1, c5 = count(state, *xs)
            return (total[0] + c1, total[1] + c5), None
        zeros = jnp.zeros(state.bias.shape[0], jnp.int32)
        return jax.lax.scan(body, (zeros, zeros), (f, l, m))[0]

    rep = parallel.replicated(mesh)
    data = NamedSharding(mesh, spec)
    fn = jax.jit(hits, in_shardings=(rep, data, data, data), out_shardings=rep)

    def evaluate(state):
        c1, c5 = fn(state, *on_device)
        return np.asarray(c1) / num, np.asarray(c5) / num

    return evaluate


def evaluate_heads(state: HeadState, feats: np.ndarray, labels: np.ndarray, num_classes: int,
                   use_bn: bool, mesh, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 [H], top-5 [H]) fractions over all test examples (one-off `make_evaluator`)."""
    return make_evaluator(feats, labels, num_classes, use_bn, mesh, chunk)(state)


def sweep(config, run_epoch: Callable, dim: int, test: tuple, num_classes: int, mesh,
          log: Optional[Callable] = None, **resume_save_stop) -> FitResult:
    """The probe config's lr sweep: one head per base lr, trained by `run_epoch` for
    `config.epochs` and tested on `test` = (features, labels) every `config.eval_every` epochs.
    `resume`, `save`, `stop`: see `fit_heads`."""
    state = jax.device_put(init_heads(config.seed, len(config.base_lrs), dim, num_classes),
                           parallel.replicated(mesh))
    return fit_heads(state, run_epoch, config.epochs,
                     make_evaluator(*test, num_classes, config.use_bn, mesh),
                     eval_epochs(config.epochs, config.eval_every), log, **resume_save_stop)


def probe_cached(config, train: tuple, test: tuple, num_classes: int, mesh) -> dict:
    """`summarize`d results of the probe config's sweep on cached features: `train` and
    `test` are (features [N, D], labels [N]) every host holds in full. For callers that
    extract features once and probe several labellings of them (the demo's attributes)."""
    feats, labels = train
    batch = effective_batch(config.batch_size, len(feats), mesh.shape[parallel.DATA_AXIS])
    lrs = tuple(float(b) * batch / 256.0 for b in config.base_lrs)
    hp = make_hparams(lrs, config.epochs, len(feats) // batch, config.momentum,
                      config.weight_decay, config.warmup_epochs, config.use_bn)
    run_epoch = cached_epoch_runner(feats, labels, hp, batch, mesh, config.seed)
    fit = sweep(config, run_epoch, feats.shape[1], test, num_classes, mesh)
    return {**summarize(fit, config.base_lrs, lrs), "batch_size": batch,
            "num_classes": num_classes, "num_train": len(feats), "num_test": len(test[0])}


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
    for field, low in (("epochs", 1), ("batch_size", 1), ("extract_batch_size", 1),
                       ("eval_every", 0)):
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


def _epoch_logger(writer: MetricWriter, base_lrs: Sequence[float]) -> Callable:
    """`fit_heads`' log: training loss per lr every epoch, test top-1/top-5 when evaluated."""
    def log(epoch, losses, evaluation):
        scalars = {f"train_loss/blr={_lr_key(b)}": float(v) for b, v in zip(base_lrs, losses)}
        if evaluation is not None:
            for name, values in (("test_top1", evaluation.top1), ("test_top5", evaluation.top5)):
                scalars.update({f"{name}/blr={_lr_key(b)}": float(v)
                                for b, v in zip(base_lrs, values)})
        writer.write(epoch, scalars)
    return log


def summarize(fit: FitResult, base_lrs: Sequence[float], lrs: Sequence[float]) -> dict:
    """The sweep's results: the best (epoch, lr) overall, each lr's best epoch, the final epoch
    and the whole (epoch, lr) grid of test accuracies."""
    epochs = [e.epoch for e in fit.evaluations]
    top1 = np.stack([e.top1 for e in fit.evaluations])            # [E, H]
    top5 = np.stack([e.top5 for e in fit.evaluations])
    e_best, h_best = select_best(top1)
    per_lr_epoch = np.argmax(top1, axis=0)                        # first best evaluation per lr
    keys = [_lr_key(b) for b in base_lrs]
    per_lr = [{"base_lr": float(b), "lr": float(lr), "top1": float(top1[per_lr_epoch[h], h]),
               "top5": float(top5[per_lr_epoch[h], h]), "best_epoch": epochs[per_lr_epoch[h]],
               "final_top1": float(top1[-1, h]), "final_top5": float(top5[-1, h]),
               "final_train_loss": float(fit.history[-1, h])}
              for h, (b, lr) in enumerate(zip(base_lrs, lrs))]
    return {
        "best_top1": float(top1[e_best, h_best]), "best_top5": float(top5[e_best, h_best]),
        "best_lr": float(base_lrs[h_best]), "best_abs_lr": float(lrs[h_best]),
        "best_epoch": epochs[e_best],
        "top1": {k: row["top1"] for k, row in zip(keys, per_lr)},
        "top5": {k: row["top5"] for k, row in zip(keys, per_lr)},
        "final_top1": {k: row["final_top1"] for k, row in zip(keys, per_lr)},
        "per_lr": per_lr,
        "grid": {"epochs": epochs, "base_lrs": [float(b) for b in base_lrs],
                 "top1": top1.tolist(), "top5": top5.tolist()},
    }


def probe_settings(config, step_dir, data, batch: int, image_size: int) -> dict:
    """What a probe's results depend on (not devices, hosts or the extraction batch): a resume
    must find the same in its checkpoint."""
    return {"checkpoint": str(step_dir), "dataset": data.name,
            "train_split": config.train_split, "test_split": config.test_split,
            "image_key": config.image_key, "label_key": config.label_key,
            "image_size": int(image_size), "mode": config.mode, "epochs": int(config.epochs),
            "batch_size": int(batch), "base_lrs": [float(b) for b in config.base_lrs],
            "momentum": float(config.momentum), "weight_decay": float(config.weight_decay),
            "warmup_epochs": float(config.warmup_epochs), "use_bn": bool(config.use_bn),
            "eval_every": int(config.eval_every), "seed": int(config.seed),
            "shuffle_buffer": int(config.shuffle_buffer), "num_classes": data.num_classes,
            "num_train": data.train.num_examples, "num_test": data.test.num_examples}


def _check_resume(saved: dict, settings: dict, directory) -> None:
    changed = [f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in settings.items()
               if saved.get(key) != value]
    if changed:
        raise ValueError(f"{directory} holds a probe run with other settings ({'; '.join(changed)})"
                         ": pass a new --workdir, or remove that directory to start over")


def _fit_of(heads: dict, progress: dict, best_head: Optional[dict]) -> FitResult:
    evaluations = [Evaluation(int(e["epoch"]), np.asarray(e["top1"], np.float64),
                              np.asarray(e["top5"], np.float64))
                   for e in progress["evaluations"]]
    return FitResult(HeadState(**heads), np.asarray(progress["history"], np.float64),
                     evaluations, best_head)


def _heads_dict(state: HeadState) -> dict:
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(HeadState)}


def _progress_of(fit: FitResult, settings: dict) -> dict:
    return {"settings": settings, "history": fit.history.tolist(),
            "evaluations": [{"epoch": e.epoch, "top1": np.asarray(e.top1).tolist(),
                             "top5": np.asarray(e.top5).tolist()} for e in fit.evaluations]}


def _restore(ckpt: checkpoint.ProbeCheckpointer, settings: dict, config, dim: int,
             num_classes: int, mesh) -> Optional[FitResult]:
    """The fit saved in `ckpt` (checked against `settings`), or None when there is none."""
    epoch = ckpt.latest_epoch()
    if epoch is None:
        return None
    _check_resume(ckpt.restore_progress(epoch)["settings"], settings, ckpt.directory)
    shapes = jax.eval_shape(lambda: init_heads(config.seed, len(config.base_lrs), dim,
                                               num_classes))
    rep = parallel.replicated(mesh)
    target = {f.name: jax.ShapeDtypeStruct(getattr(shapes, f.name).shape,
                                           getattr(shapes, f.name).dtype, sharding=rep)
              for f in dataclasses.fields(HeadState)}
    fit = _fit_of(*ckpt.restore(epoch, target))
    logging.info("resuming the probe after epoch %d of %d (%s)", epoch, config.epochs,
                 ckpt.directory)
    return fit


def run(config, workdir: str, mesh=None, checkpoint_workdir: Optional[str] = None) -> dict:
    """Probes `config.checkpoint` on `config.dataset`; returns the results, which process 0
    writes to WORKDIR/results.json (and the best head to WORKDIR/best_head.npz).

    After each evaluated epoch the heads, their SGD momentum and the progress so far are saved
    in WORKDIR/probe_checkpoints (or `checkpoint_workdir`'s: orbax writes local paths and gs://,
    not ram://); a rerun resumes from there exactly (the same results as a run that never
    stopped) and refuses other settings. No SIGTERM handler: see `run_until_preempted`."""
    return _run(config, workdir, mesh, checkpoint_workdir, None)[0]


def run_until_preempted(config, workdir: str, mesh=None,
                        checkpoint_workdir: Optional[str] = None) -> tuple[Optional[dict], bool]:
    """`run` under a SIGTERM handler (`preemption.PreemptionWatch`, installed first): returns
    (results or None, preempted). A notice ends the epoch (cached features: one compiled scan,
    finished; augmented: dropped before its next step) and every host stops together after
    saving the heads as they are after the last finished epoch; results.json is left for the
    rerun, which resumes. A notice during start-up (one process) stops at once: (None, True)."""
    with preemption.PreemptionWatch() as watch:
        try:
            return _run(config, workdir, mesh, checkpoint_workdir, watch)
        except preemption.PreemptedAtStartup:
            logging.warning("stopped by SIGTERM during start-up: nothing new to save")
            return None, True


def _run(config, workdir, mesh, checkpoint_workdir, watch) -> tuple[Optional[dict], bool]:
    start = time.time()
    check_config(config)
    # Cheap checks first: the checkpoint path, then the dataset, before any device work.
    step_dir = checkpoint.resolve_step_dir(config.checkpoint, config.checkpoint_step)
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
    settings = probe_settings(config, step_dir, data, batch, encoder.image_size)
    ckpt = checkpoint.ProbeCheckpointer(checkpoint_workdir or workdir)
    try:
        resume = _restore(ckpt, settings, config, encoder.width, data.num_classes, mesh)
        return _probe(config, workdir, mesh, watch, start, data, encoder, batch, base_lrs, lrs,
                      ckpt, settings, resume)
    finally:
        ckpt.close()


def _probe(config, workdir, mesh, watch, start, data, encoder, batch, base_lrs, lrs, ckpt,
           settings, resume) -> tuple[Optional[dict], bool]:
    n_dev = mesh.shape[parallel.DATA_AXIS]

    encode_fn = features_lib.make_encode_fn(encoder.model, mesh)
    variables = features_lib.replicate(encoder.variables, mesh)
    extract = functools.partial(features_lib.split_features, encode_fn, variables,
                                image_size=encoder.image_size,
                                batch_size=config.extract_batch_size, mesh=mesh)
    test_f, test_l, _ = extract(data.test, desc="test features")
    train_f = train_l = None
    if config.mode == "cached_features" or config.knn.enabled:
        train_f, train_l, _ = extract(data.train, desc="train features")

    hp = make_hparams(lrs, config.epochs, eval_data.train_steps_per_epoch(data.train, batch),
                      config.momentum, config.weight_decay, config.warmup_epochs, config.use_bn)
    if config.mode == "cached_features":
        run_epoch = cached_epoch_runner(train_f, train_l, hp, batch, mesh, config.seed)
    else:
        run_epoch = augmented_epoch_runner(data.train, encode_fn, variables, hp, batch,
                                           encoder.image_size, mesh, config.seed,
                                           config.shuffle_buffer)
    # Rows past the resumed epoch (logged by a run that stopped later) are dropped.
    writer = MetricWriter(workdir, keep_through_step=resume.epochs_done if resume else 0)
    stop = None
    if watch is not None:
        checks = itertools.count(1)       # the same sequence on every host (sync point)
        stop = lambda: watch.should_stop(next(checks))  # noqa: E731
    save = lambda fit: ckpt.save(fit.epochs_done, _heads_dict(fit.state),  # noqa: E731
                                 _progress_of(fit, settings), fit.best_head)
    try:
        with contextlib.nullcontext() if watch is None else watch.working():
            fit = sweep(config, run_epoch, encoder.width, (test_f, test_l), data.num_classes,
                        mesh, _epoch_logger(writer, base_lrs), resume=resume, save=save,
                        stop=stop)
    finally:
        writer.close()
    if fit.stopped:
        logging.warning("stopped after epoch %d of %d, saved in %s: rerun the same command to "
                        "resume", fit.epochs_done, config.epochs, ckpt.directory)
        return None, True

    results = summarize(fit, base_lrs, lrs)
    results.update({
        "dataset": data.name, "checkpoint": str(config.checkpoint), "mode": config.mode,
        "use_bn": bool(config.use_bn), "epochs": int(config.epochs),
        "eval_every": int(config.eval_every), "batch_size": batch,
        "num_classes": data.num_classes, "num_train": data.train.num_examples,
        "num_test": data.test.num_examples, "image_size": encoder.image_size,
        "feature_dim": encoder.width, "feature_dtype": features_lib.EVAL_DTYPE,
        "checkpoint_dtype": encoder.trained_dtype, "devices": n_dev,
    })
    if config.knn.enabled:
        results.update(features_lib.knn_classify(train_f, train_l, test_f, test_l,
                                                 data.num_classes, config.knn.k,
                                                 config.knn.temperature, mesh))
    results["seconds"] = round(time.time() - start, 1)
    if jax.process_index() == 0:
        checkpoint.save_probe_head(os.path.join(workdir, BEST_HEAD), fit.best_head, {
            "base_lr": results["best_lr"], "lr": results["best_abs_lr"],
            "epoch": results["best_epoch"], "top1": results["best_top1"],
            "use_bn": bool(config.use_bn), "class_names": list(data.class_names),
            "checkpoint": str(config.checkpoint), "dataset": data.name})
        fileio.write_json_atomic(os.path.join(workdir, RESULTS), results)
    logging.info("best top-1 %.4f at base lr %g after epoch %d (%s)", results["best_top1"],
                 results["best_lr"], results["best_epoch"],
                 ", ".join(f"{k}: {v:.4f}" for k, v in results["top1"].items()))
    return results, False


# --------------------------------------------------------------------------------------------
# Best head


# The head's file format lives with the other checkpoint code (`checkpoint.save_probe_head`).


def predict(head: dict, feats: np.ndarray, use_bn: bool) -> np.ndarray:
    """Class logits of a saved head on features [N, D] (numpy)."""
    x = np.asarray(feats, np.float32)
    if use_bn:
        x = (x - head["bn_mean"]) / np.sqrt(head["bn_var"] + BN_EPS)
    return x @ head["kernel"] + head["bias"]


def main(config):
    parallel.start_job(flags.FLAGS)
    _, preempted = run_until_preempted(config, flags.FLAGS.workdir)
    from stablerep_jax import cli
    return cli.EXIT_RESUME if preempted else cli.EXIT_OK


if __name__ == "__main__":
    from stablerep_jax import cli
    cli.define_job_flags("results.json, metrics, TensorBoard and best_head.npz go here")
    cli.run(main)
