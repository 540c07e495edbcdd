"""Frozen-encoder features for evaluation (linear probe, k-NN), sharded over the `data` mesh axis.

The one home of evaluation features: `load_encoder` (always float32 compute, whatever the run
trained in), `make_encode_fn` (the jitted encoder) and `split_features` (a whole split, each
example once, in split order). The encoder's params are replicated, image batches are split over
every device of every host, and the features of all hosts are gathered back to every host as
numpy with the masked padding dropped. Cached features go back onto the devices split by rows
(`shard_rows`, each device keeping 1/devices of them) and are read there by index
(`make_row_gather`). The weighted k-NN classifier on such features lives here too, so that the
`knn` and `linear_probe` jobs share it without importing each other.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from stablerep_jax import checkpoint, parallel
from stablerep_jax.data import eval_data
from stablerep_jax.models.encoder import StableRepModel, build_model

# The reference probes in float32 (main_linear.py runs timm in fp32, no autocast), so features
# are computed in float32 even from a checkpoint whose model config says bfloat16.
EVAL_DTYPE = "float32"


@dataclasses.dataclass
class Encoder:
    """A frozen image encoder: the model (float32 compute), its variables and the checkpoint's
    model config as saved (`trained_dtype` is the compute dtype the run trained in)."""
    model: StableRepModel
    variables: dict          # {"params": ..., "batch_stats": ...}
    model_config: dict
    image_size: int

    @property
    def trained_dtype(self) -> str:
        return str(self.model_config.get("dtype", "float32"))

    @property
    def width(self) -> int:
        return int(self.model.width)


def load_encoder(path: str, step: Optional[int] = None,
                 image_size: Optional[int] = None) -> Encoder:
    """Reads a `train` / `convert` checkpoint for evaluation, computing in `EVAL_DTYPE`.
    `image_size` defaults to the checkpoint's own (the ViT's position embedding fixes it, so
    another size is an error naming both)."""
    params, batch_stats, model_config = checkpoint.load_model(path, step)
    trained_size = int(model_config["image_size"])
    if image_size is not None and int(image_size) != trained_size:
        raise ValueError(f"image_size={image_size}, but the checkpoint {path} was built for "
                         f"{trained_size}x{trained_size} images (its position embedding); leave "
                         "image_size unset or set it to that")
    model = build_model(eval_model_config(model_config))
    return Encoder(model, {"params": params, "batch_stats": batch_stats}, model_config,
                   trained_size)


def eval_model_config(model_config) -> dict:
    """The checkpoint's model config with the compute dtype set to `EVAL_DTYPE` (params are
    stored in float32 either way, so nothing is lost by computing in float32)."""
    return {**dict(model_config), "dtype": EVAL_DTYPE}


def make_encode_fn(model: StableRepModel, mesh) -> Callable:
    """jit(variables, images [B, S, S, 3] sharded over `data`) -> CLS features [B, width] f32."""
    def encode(variables, images):
        feats = model.apply(variables, images, method=StableRepModel.encode_image)
        return feats.astype(np.float32)

    return jax.jit(encode, in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
                   out_shardings=parallel.batch_sharded(mesh))


def to_host(x: jax.Array) -> np.ndarray:
    """A global array -> the full numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree: Any, mesh) -> Any:
    return jax.device_put(tree, parallel.replicated(mesh))


# --------------------------------------------------------------------------------------------
# Cached features on the devices, sharded by rows


def shard_rows(array: np.ndarray, mesh) -> jax.Array:
    """Rows [N, ...] every host holds in full -> a global array [N', ...] split by rows over
    `data`, so each device keeps N' / devices of them (ImageNet's 1.28M x 768 float32 is 3.9 GB:
    0.49 GB per device of 8, not 3.9 GB on each). N' rounds N up to a multiple of the devices;
    the padding rows are zeros. Each host fills only its own devices' shards."""
    array = np.asarray(array)
    n_dev = mesh.shape[parallel.DATA_AXIS]
    pad = -len(array) % n_dev
    if pad:
        array = np.concatenate([array, np.zeros((pad,) + array.shape[1:], array.dtype)])
    return parallel.from_host(mesh, array, P(parallel.DATA_AXIS))


def make_row_gather(mesh) -> Callable:
    """`take(rows, index)`: rows [N', ...] from `shard_rows`, index [B] int32 (replicated, B a
    multiple of the devices) -> rows[index] [B, ...] split over `data` (a batch, each device its
    part). Traceable, for use inside a jitted scan. Each device looks up the wanted rows it
    holds (zeros for the others) and one reduce-scatter sums these into every device's part of
    the batch: a step moves B x D values, never the N x D table. Adding zeros is exact, so the
    result equals indexing a replicated copy bit for bit."""
    def take(shard, index):
        n_local = shard.shape[0]
        local = index - jax.lax.axis_index(parallel.DATA_AXIS) * n_local
        here = (local >= 0) & (local < n_local)
        picked = jnp.take(shard, jnp.clip(local, 0, n_local - 1), axis=0)
        picked = jnp.where(here.reshape(here.shape + (1,) * (shard.ndim - 1)), picked,
                           jnp.zeros_like(picked))
        return jax.lax.psum_scatter(picked, parallel.DATA_AXIS, scatter_dimension=0, tiled=True)

    return jax.shard_map(take, mesh=mesh, in_specs=(P(parallel.DATA_AXIS), P()),
                         out_specs=P(parallel.DATA_AXIS))


class Stopped(Exception):
    """`stop()` said to stop an extraction (a preemption notice): no features."""


def extract_features(encode_fn: Callable, variables: Any, batches: Iterable[dict], mesh,
                     num_batches: Optional[int] = None, desc: str = "features",
                     stop: Optional[Callable[[], bool]] = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the frozen encoder over host batches (image, label, index, mask) and returns
    (features [N, D] float32, labels [N] int32, indices [N] int64) of the unmasked examples,
    sorted by the examples' index in the split. `stop()` is asked before each batch (on every
    host alike): True raises `Stopped`."""
    feats, labels, indices = [], [], []
    for batch in tqdm(batches, total=num_batches, desc=desc, unit="batch",
                      disable=jax.process_index() != 0):
        if stop is not None and stop():
            raise Stopped(f"{desc}: stopped after {len(feats)} batches")
        images = parallel.global_batch(mesh, {"image": batch["image"]})["image"]
        out = to_host(encode_fn(variables, images))
        meta = _gather_host_arrays({k: batch[k] for k in ("label", "index", "mask")})
        keep = meta["mask"].astype(bool)
        feats.append(out[keep])
        labels.append(meta["label"][keep])
        indices.append(meta["index"][keep])
    if not feats:
        raise ValueError(f"{desc}: no batches to encode")
    feats, labels, indices = np.concatenate(feats), np.concatenate(labels), np.concatenate(indices)
    order = np.argsort(indices, kind="stable")
    logging.info("%s: %d examples, %d-dim features", desc, len(order), feats.shape[1])
    return feats[order], labels[order].astype(np.int32), indices[order]


def _gather_host_arrays(tree: dict) -> dict:
    """Host-local numpy arrays of equal length -> their concatenation over hosts (host order)."""
    if jax.process_count() == 1:
        return {k: np.asarray(v) for k, v in tree.items()}
    return {k: np.asarray(multihost_utils.process_allgather(np.asarray(v), tiled=True))
            for k, v in tree.items()}


def split_features(encode_fn: Callable, variables: Any, split, image_size: int, batch_size: int,
                   mesh, desc: str = "features", stop: Optional[Callable[[], bool]] = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, indices) of every example of an eval_data split, centre-crop views
    (`eval_data.eval_view`), in split order; `batch_size` is the global batch, a multiple of
    the mesh's devices (rounded down to one, at least one per device). `stop`: see
    `extract_features`."""
    n_dev = mesh.shape[parallel.DATA_AXIS]
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    batches = eval_data.eval_batches(split, image_size, batch_size, jax.process_index(),
                                     jax.process_count())
    steps = eval_data.num_eval_batches(split, batch_size, jax.process_count())
    return extract_features(encode_fn, variables, batches, mesh, steps, desc, stop)


# --------------------------------------------------------------------------------------------
# Weighted k-NN on features (InstDisc / DINO protocol)


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _vote(top_sims, top_labels, num_classes: int, temperature: float):
    """Class scores [Nt, C] from the k nearest: sum of exp(sim / T) per class."""
    weights = jnp.exp(top_sims / temperature)
    votes = jax.nn.one_hot(top_labels, num_classes, dtype=weights.dtype)
    return jnp.einsum("tk,tkc->tc", weights, votes)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_scores(train_feats, train_labels, test_feats, num_classes: int, k: int,
               temperature: float) -> jax.Array:
    """Class scores [Nt, C]: sum over the k most similar training features of exp(sim / T)."""
    sims = _normalize(test_feats) @ _normalize(train_feats).T               # [Nt, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    return _vote(top_sims, train_labels[top_idx], num_classes, temperature)


def make_sharded_knn_scores(mesh, num_train: int, num_classes: int, k: int,
                            temperature: float) -> Callable:
    """jit(train [N', D], labels [N'] (both `shard_rows`), test [Nt, D] replicated) -> the
    `knn_scores` of the test rows [Nt, C], replicated. Each device compares the test rows with
    its own rows of the training set only and keeps its k best (the padding rows never count);
    the devices' candidates are gathered and the k best of those are the global k best (on ties
    the lower training index wins, as in one `top_k` over all of them)."""
    def local(train, labels, test):
        n_local = train.shape[0]
        first = jax.lax.axis_index(parallel.DATA_AXIS) * n_local
        sims = _normalize(test) @ _normalize(train).T                      # [Nt, N'/devices]
        sims = jnp.where((first + jnp.arange(n_local) < num_train)[None], sims, -jnp.inf)
        sims, idx = jax.lax.top_k(sims, min(k, n_local))
        sims = jax.lax.all_gather(sims, parallel.DATA_AXIS, axis=1, tiled=True)
        cand = jax.lax.all_gather(labels[idx], parallel.DATA_AXIS, axis=1, tiled=True)
        top_sims, best = jax.lax.top_k(sims, k)
        return _vote(top_sims, jnp.take_along_axis(cand, best, axis=1), num_classes,
                     temperature)

    # The scores are computed from the gathered candidates, the same on every device; the
    # replication checker does not see through all_gather, hence check_vma=False.
    rows = P(parallel.DATA_AXIS)
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=P(),
                                 check_vma=False))


def knn_classify(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07, mesh=None, chunk: int = 1024) -> dict:
    """Weighted k-NN top-1 / top-5 (fractions) of the test features.

    The training features go to the devices once, split by rows (`shard_rows`: each device
    keeps 1/devices of them); the test features go in chunks of `chunk` rows, the last one
    padded (and its padding dropped), so one compiled function scores them all.
    """
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError(f"k-NN needs features: {len(train_feats)} train, {len(test_feats)} test")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    k = min(int(k), len(train_feats))
    chunk = min(chunk, len(test_feats))
    scores_fn = make_sharded_knn_scores(mesh, len(train_feats), num_classes, k,
                                        float(temperature))
    train_f = shard_rows(np.asarray(train_feats, np.float32), mesh)
    train_l = shard_rows(np.asarray(train_labels, np.int32), mesh)
    correct1 = correct5 = 0
    for start in range(0, len(test_feats), chunk):
        part = np.asarray(test_feats[start:start + chunk], np.float32)
        valid = len(part)
        padded = np.zeros((chunk,) + part.shape[1:], np.float32)
        padded[:valid] = part
        scores = scores_fn(train_f, train_l, replicate(padded, mesh))
        scores = to_host(scores)[:valid]
        labels = np.asarray(test_labels[start:start + chunk])
        ranked = np.argsort(-scores, axis=1, kind="stable")
        correct1 += int(np.sum(ranked[:, 0] == labels))
        correct5 += int(np.sum(np.any(ranked[:, :min(5, num_classes)] == labels[:, None], axis=1)))
    n = len(test_feats)
    return {"knn_top1": correct1 / n, "knn_top5": correct5 / n, "knn_k": k,
            "knn_temperature": float(temperature)}
