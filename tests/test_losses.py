"""Parity of our multi-positive losses with the reference PyTorch math, on one and 8 devices."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stablerep_jax import losses

torch = pytest.importorskip("torch")
from stablerep_jax.testing import torch_reference as tref  # noqa: E402  (needs torch)


def _view_major_labels(n_captions, n_views):
    """Labels as the encoder lays them out: all captions' view 0, then view 1, ..."""
    return np.tile(np.arange(n_captions), n_views)


@pytest.mark.parametrize("n_captions,n_views,dim", [(4, 2, 16), (7, 3, 32), (16, 6, 8), (1, 2, 4)])
@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.5])
def test_image_loss_and_grad_match_reference(n_captions, n_views, dim, temperature, close):
    rng = np.random.default_rng(n_captions * 100 + n_views)
    feats = rng.normal(size=(n_captions * n_views, dim)).astype(np.float32)
    labels = _view_major_labels(n_captions, n_views)

    ours, ours_grad = jax.value_and_grad(losses.multi_positive_contrastive_loss)(
        jnp.asarray(feats), jnp.asarray(labels), temperature)

    t_feats = torch.tensor(feats, dtype=torch.float64, requires_grad=True)
    ref = tref.multi_pos_loss(t_feats, torch.tensor(labels), temperature)
    ref.backward()
    close(ours, ref.item(), 1e-5)
    close(ours_grad, t_feats.grad.numpy(), 1e-5)


def test_duplicated_labels_and_singletons_match_reference(close):
    """Captions repeated across the batch are positives; a caption with one image has none."""
    rng = np.random.default_rng(0)
    labels = np.array([0, 1, 2, 0, 1, 3, 0, 5, 5, 9])
    feats = rng.normal(size=(len(labels), 12)).astype(np.float32)
    ours, grad = jax.value_and_grad(losses.multi_positive_contrastive_loss)(
        jnp.asarray(feats), jnp.asarray(labels), 0.1)
    t_feats = torch.tensor(feats, dtype=torch.float64, requires_grad=True)
    ref = tref.multi_pos_loss(t_feats, torch.tensor(labels), 0.1)
    ref.backward()
    close(ours, ref.item(), 1e-5)
    close(grad, t_feats.grad.numpy(), 1e-5)


def test_loss_is_stable_for_large_features_and_bf16():
    feats = 1e4 * np.random.default_rng(1).normal(size=(12, 8)).astype(np.float32)
    labels = jnp.asarray(_view_major_labels(6, 2))
    value = losses.multi_positive_contrastive_loss(jnp.asarray(feats), labels, 0.01)
    value_bf16 = losses.multi_positive_contrastive_loss(jnp.asarray(feats, jnp.bfloat16), labels, 0.01)
    assert np.isfinite(value) and np.isfinite(value_bf16)


def test_perfect_features_give_lower_loss_than_random():
    """Sanity of direction: features equal within a caption beat random features."""
    labels = _view_major_labels(8, 4)
    centres = np.random.default_rng(2).normal(size=(8, 16))
    aligned = centres[labels]
    random = np.random.default_rng(3).normal(size=aligned.shape)
    aligned_loss = losses.multi_positive_contrastive_loss(jnp.asarray(aligned), jnp.asarray(labels))
    random_loss = losses.multi_positive_contrastive_loss(jnp.asarray(random), jnp.asarray(labels))
    assert aligned_loss < random_loss


@pytest.mark.parametrize("n_captions,n_views", [(4, 2), (6, 3)])
def test_image_text_loss_and_grads_match_reference(n_captions, n_views, close):
    rng = np.random.default_rng(n_captions)
    n_img = n_captions * n_views
    arrays = dict(
        image_feats=rng.normal(size=(n_img, 16)),
        image_emb=rng.normal(size=(n_img, 8)),
        text_emb=rng.normal(size=(n_captions, 8)),
    )
    v_labels = _view_major_labels(n_captions, n_views)
    t_labels = np.arange(n_captions)
    scale, w1, w2 = 1 / 0.07, 0.7, 1.3

    def ours_fn(a):
        return losses.multi_positive_image_text_loss(
            a["image_feats"], a["image_emb"], a["text_emb"], jnp.asarray(v_labels),
            jnp.asarray(t_labels), jnp.float32(scale), 0.1, w1, w2)

    jax_arrays = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
    ours = ours_fn(jax_arrays)
    ours_grads = jax.grad(lambda a: ours_fn(a)["loss"])(jax_arrays)

    t_arrays = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in arrays.items()}
    ref = tref.image_text_loss(t_arrays["image_feats"], t_arrays["image_emb"],
                                t_arrays["text_emb"], torch.tensor(v_labels),
                                torch.tensor(t_labels), scale, 0.1, w1, w2)
    ref["loss"].backward()
    for key in ("loss", "image_loss", "img_txt_loss"):
        close(ours[key], ref[key].item(), 1e-5)
    for key in arrays:
        close(ours_grads[key], t_arrays[key].grad.numpy(), 1e-5)


def test_sharded_global_batch_equals_single_device(close):
    """The loss on a batch sharded over 8 devices sees the global batch: same value and grads."""
    devices = np.array(jax.devices())
    assert len(devices) == 8, "tests expect 8 simulated devices (see tests/conftest.py)"
    mesh = Mesh(devices, ("data",))
    rng = np.random.default_rng(4)
    n_captions, n_views = 16, 3
    feats = jnp.asarray(rng.normal(size=(n_captions * n_views, 32)), jnp.float32)
    labels = jnp.asarray(_view_major_labels(n_captions, n_views))

    loss_and_grad = jax.value_and_grad(losses.multi_positive_contrastive_loss)
    single = jax.jit(loss_and_grad, static_argnums=2)(feats, labels, 0.1)

    sharding = NamedSharding(mesh, P("data"))
    sharded_feats = jax.device_put(feats, sharding)
    sharded_labels = jax.device_put(labels, sharding)
    assert len(sharded_feats.addressable_shards) == 8
    multi = jax.jit(loss_and_grad, static_argnums=2, out_shardings=(NamedSharding(mesh, P()), sharding))(
        sharded_feats, sharded_labels, 0.1)
    close(multi[0], single[0], 1e-5)
    close(multi[1], single[1], 1e-5)
