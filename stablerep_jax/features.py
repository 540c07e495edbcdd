"""Frozen-encoder features for evaluation (linear probe, k-NN), sharded over the `data` mesh axis.

The one home of evaluation features: `load_encoder` (always float32 compute, whatever the run
trained in), `make_encode_fn` (the jitted encoder) and `split_features` (a whole split, each
example once, in split order). The encoder's params are replicated, image batches are split over
every device of every host, and the features of all hosts are gathered back to every host as
numpy with the masked padding dropped. The weighted k-NN classifier on such features lives here
too, so that the `knn` and `linear_probe` jobs share it without importing each other.
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


def extract_features(encode_fn: Callable, variables: Any, batches: Iterable[dict], mesh,
                     num_batches: Optional[int] = None, desc: str = "features"
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs the frozen encoder over host batches (image, label, index, mask) and returns
    (features [N, D] float32, labels [N] int32, indices [N] int64) of the unmasked examples,
    sorted by the examples' index in the split."""
    feats, labels, indices = [], [], []
    for batch in tqdm(batches, total=num_batches, desc=desc, unit="batch",
                      disable=jax.process_index() != 0):
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
                   mesh, desc: str = "features") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, indices) of every example of an eval_data split, centre-crop views
    (`eval_data.eval_view`), in split order; `batch_size` is the global batch, a multiple of
    the mesh's devices (rounded down to one, at least one per device)."""
    n_dev = mesh.shape[parallel.DATA_AXIS]
    batch_size = max(n_dev, batch_size // n_dev * n_dev)
    batches = eval_data.eval_batches(split, image_size, batch_size, jax.process_index(),
                                     jax.process_count())
    steps = eval_data.num_eval_batches(split, batch_size, jax.process_count())
    return extract_features(encode_fn, variables, batches, mesh, steps, desc)


# --------------------------------------------------------------------------------------------
# Weighted k-NN on features (InstDisc / DINO protocol)


def _normalize(x):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("num_classes", "k"))
def knn_scores(train_feats, train_labels, test_feats, num_classes: int, k: int,
               temperature: float) -> jax.Array:
    """Class scores [Nt, C]: sum over the k most similar training features of exp(sim / T)."""
    sims = _normalize(test_feats) @ _normalize(train_feats).T               # [Nt, N]
    top_sims, top_idx = jax.lax.top_k(sims, k)
    weights = jnp.exp(top_sims / temperature)
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=weights.dtype)
    return jnp.einsum("tk,tkc->tc", weights, votes)


def knn_classify(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                 test_labels: np.ndarray, num_classes: int, k: int = 20,
                 temperature: float = 0.07, mesh=None, chunk: int = 1024) -> dict:
    """Weighted k-NN top-1 / top-5 (fractions) of the test features.

    Training features are replicated; test features go in chunks sharded over the `data` axis,
    the last one padded with masked blanks, so every test example counts exactly once.
    """
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError(f"k-NN needs features: {len(train_feats)} train, {len(test_feats)} test")
    mesh = mesh if mesh is not None else parallel.make_mesh()
    n_dev = mesh.shape[parallel.DATA_AXIS]
    k = min(int(k), len(train_feats))
    chunk = max(n_dev, chunk // n_dev * n_dev)
    rep, sharded = parallel.replicated(mesh), parallel.batch_sharded(mesh)
    train_f = jax.device_put(np.asarray(train_feats, np.float32), rep)
    train_l = jax.device_put(np.asarray(train_labels, np.int32), rep)
    correct1 = correct5 = 0
    for start in range(0, len(test_feats), chunk):
        part = np.asarray(test_feats[start:start + chunk], np.float32)
        valid = len(part)
        padded = np.zeros((chunk,) + part.shape[1:], np.float32)
        padded[:valid] = part
        scores = knn_scores(train_f, train_l, jax.device_put(padded, sharded), num_classes, k,
                            float(temperature))
        scores = to_host(scores)[:valid]
        labels = np.asarray(test_labels[start:start + chunk])
        ranked = np.argsort(-scores, axis=1, kind="stable")
        correct1 += int(np.sum(ranked[:, 0] == labels))
        correct5 += int(np.sum(np.any(ranked[:, :min(5, num_classes)] == labels[:, None], axis=1)))
    n = len(test_feats)
    return {"knn_top1": correct1 / n, "knn_top5": correct5 / n, "knn_k": k,
            "knn_temperature": float(temperature)}
