"""model.attention: the fused-attention path (jax.nn.dot_product_attention, tokens padded to a
multiple of model.attention_pad_to with the padded keys masked) equals our einsum reference in
float32, forward and gradients, for the ViT's 197 tokens and the text tower's causal 77; "auto"
picks the kernel per platform; every kind shares one parameter tree, so checkpoints move
between kinds and a resume may change the kind."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablerep_jax import config_utils, parallel, resume, train_step
from stablerep_jax.models import attention as attention_lib
from stablerep_jax.models.encoder import build_model
from stablerep_jax.models.text import TextTransformer
from stablerep_jax.models.vit import ATTENTION_IMPLEMENTATIONS, VisionTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _assert_close(got, want, tol=1e-5, what=""):
    """float32 agreement to `tol`, relative to the largest entry of `want` (gradients of a sum
    reach tens; their rounding scales with them)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def _assert_trees_close(got, want, tol=1e-5):
    flat = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        _assert_close(flat[path], w, tol, jax.tree_util.keystr(path))


@pytest.mark.parametrize("length,pad_to,causal", [(197, 2, False), (197, 64, False),
                                                  (77, 2, True), (77, 64, True), (9, 1, False)])
def test_padded_attention_equals_einsum_forward_and_gradients(length, pad_to, causal):
    """attention.attend on the XLA path, tokens padded and the padded keys masked, against
    the einsum reference: outputs and the gradients wrt q, k and v."""
    from stablerep_jax.models.vit import attend
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, length, 3, 16)), jnp.float32) for _ in range(3))

    def loss(kind, pad):
        def f(q, k, v):
            return jnp.sum(jnp.sin(attend(kind, q, k, v, causal=causal, pad_to=pad)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)
    (ref, ref_grads), (out, grads) = loss("einsum", 1), loss("xla", pad_to)
    _assert_close(out, ref)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        _assert_close(g, r, what=f"d/d{name}")


def _vit(kind, pad_to, **kw):
    return VisionTransformer(64, 2, 4, patch_size=16, image_size=224, attention=kind,
                             attention_pad_to=pad_to, **kw)


_IMAGES = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)


def _vit_output_and_grads(vit, params):
    def loss(p, x):
        return jnp.sum(jnp.sin(vit.apply({"params": p}, x)))
    out = jax.jit(lambda p, x: vit.apply({"params": p}, x))(params, _IMAGES)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1)))(params, _IMAGES)


@pytest.fixture(scope="module")
def vit_reference():
    """Params of a 2-block ViT at 224 px (197 tokens), einsum's output and gradients."""
    vit = _vit("einsum", 1)
    params = vit.init(jax.random.PRNGKey(0), _IMAGES)["params"]
    return params, _vit_output_and_grads(vit, params)


@pytest.mark.parametrize("kind,pad_to", [("xla", 2), ("xla", 64), ("auto", 2)])
def test_vit_through_the_padded_kernel_path_equals_einsum(vit_reference, kind, pad_to):
    """The ViT's 197 tokens (224 px, patch 16) through jax.nn.dot_product_attention padded to
    198 or 256: its output and the gradients of a loss over it wrt every parameter and the
    input images equal einsum's in float32 (1e-5). On a CPU "auto" is XLA."""
    params, (ref, (ref_p, ref_x)) = vit_reference
    out, (g_p, g_x) = _vit_output_and_grads(_vit(kind, pad_to), params)
    _assert_close(out, ref)
    _assert_trees_close(g_p, ref_p)
    _assert_close(g_x, ref_x, what="d/dimages")


def test_text_tower_through_the_padded_causal_kernel_equals_einsum():
    """The text tower's causal attention (77 tokens, padded to 78) through the kernel's own
    causal mask: output and parameter gradients equal einsum's."""
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 100, (3, 77)), jnp.int32)

    def tower(kind, pad_to):
        return TextTransformer(100, 77, 64, 2, 2, attention=kind, attention_pad_to=pad_to)
    params = tower("einsum", 1).init(jax.random.PRNGKey(0), tokens)["params"]

    def run(t):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(jnp.sin(t.apply({"params": p}, tokens)))))(params)
    (ref, ref_g), (out, g) = run(tower("einsum", 1)), run(tower("xla", 2))
    _assert_close(out, ref)
    _assert_trees_close(g, ref_g)


def _spy(monkeypatch):
    """Records what each jax.nn.dot_product_attention call asked for; computes with XLA."""
    real, seen = jax.nn.dot_product_attention, []

    def spy(q, k, v, *args, implementation=None, key_value_seq_lengths=None, **kwargs):
        seen.append(dict(implementation=implementation, tokens=q.shape[1],
                         kv_lengths=None if key_value_seq_lengths is None
                         else np.asarray(key_value_seq_lengths).tolist(),
                         causal=kwargs.get("is_causal", False)))
        return real(q, k, v, *args, key_value_seq_lengths=key_value_seq_lengths, **kwargs)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    return seen


def test_auto_is_cudnn_on_nvidia_gpus_padded_to_an_even_length(monkeypatch):
    """`auto` resolves per platform; on a GPU it asks for cuDNN with the 197 tokens padded to
    198 and the key length 197 (recorded here, computed by XLA: this is a CPU); float32, which
    cuDNN lacks, stays on XLA rather than failing."""
    assert attention_lib.resolve("auto", "gpu") == "cudnn"
    assert attention_lib.resolve("auto", "cpu") == attention_lib.resolve("auto", "tpu") == "xla"
    monkeypatch.setattr(attention_lib, "default_platform", lambda: "gpu")
    seen = _spy(monkeypatch)
    images = jnp.zeros((1, 224, 224, 3))
    jax.eval_shape(_vit("auto", 2, dtype=jnp.bfloat16).init, jax.random.PRNGKey(0), images)
    assert seen == [dict(implementation="cudnn", tokens=198, kv_lengths=[197], causal=False)] * 2
    seen.clear()
    jax.eval_shape(_vit("auto", 2).init, jax.random.PRNGKey(0), images)       # float32
    assert [s["implementation"] for s in seen] == ["xla", "xla"]


def test_build_model_passes_attention_and_padding_to_both_towers(monkeypatch):
    seen = _spy(monkeypatch)
    config = dict(variant="tiny", depth=1, patch_size=8, image_size=40, mlp_dim=16, emb_dim=8,
                  dtype="float32", add_language=True, text_width=32, text_depth=1,
                  text_heads=2, context_length=7, vocab_size=50, embed_dim=8,
                  attention="xla", attention_pad_to=4)
    model = build_model(config)
    jax.eval_shape(lambda key: model.init(key, jnp.zeros((2, 2, 40, 40, 3)),
                                          jnp.zeros((2, 7), jnp.int32), train=False),
                   jax.random.PRNGKey(0))
    assert seen == [dict(implementation="xla", tokens=28, kv_lengths=[26] * 4, causal=False),
                    dict(implementation="xla", tokens=8, kv_lengths=[7, 7], causal=True)]


def test_attention_config_errors_name_the_key():
    images = jnp.zeros((1, 16, 16, 3))

    def init(**kw):
        VisionTransformer(32, 1, 2, patch_size=8, image_size=16, **kw).init(
            jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match="model.attention='flash'; choose one of einsum, "
                                         "dot_product, xla, cudnn, auto"):
        init(attention="flash")
    with pytest.raises(ValueError, match="model.attention='cudnn' needs model.dtype bfloat16"):
        init(attention="cudnn")
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match=r"model.attention_pad_to=.*: must be an integer"):
            init(attention="xla", attention_pad_to=bad)
    with pytest.raises(ValueError, match="model.attention_pad_to=0"):
        TextTransformer(50, 7, 32, 1, 2, attention="xla", attention_pad_to=0).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 7), jnp.int32))


def _config(kind: str, pad_to: int):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.batch_size = 4
    config.model.add_language = True
    config.model.context_length = 7
    config.model.vocab_size = 50
    config.model.image_size = 40            # 25 patches + CLS: odd, so padding happens
    config.model.attention, config.model.attention_pad_to = kind, pad_to
    return config


def test_config_default_is_auto_padded_to_even():
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py"))
    assert (config.model.attention, config.model.attention_pad_to) == ("auto", 2)
    assert set(ATTENTION_IMPLEMENTATIONS) == {"einsum", "dot_product", "xla", "cudnn", "auto"}


@pytest.mark.slow
def test_a_checkpoint_saved_with_one_attention_runs_and_resumes_with_another(tmp_path):
    """Every kind has the same parameter tree; a train checkpoint written with einsum restores
    into a state built with the padded XLA kernel, whose features equal einsum's, and the
    train step runs on it; the resume check lets the kind change."""
    from stablerep_jax import checkpoint
    mesh = parallel.make_mesh(jax.devices()[:1])
    einsum, fused = _config("einsum", 1), _config("xla", 2)
    trees = [jax.eval_shape(train_step.build_training(c, mesh, 10, 0).init,
                            jax.random.PRNGKey(0)) for c in (einsum, fused, _config("auto", 64))]
    for tree in trees[1:]:
        assert (jax.tree_util.tree_structure(tree.params)
                == jax.tree_util.tree_structure(trees[0].params))
        assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
            lambda a, b: a.shape == b.shape and a.dtype == b.dtype, tree.params,
            trees[0].params)))

    parts = train_step.build_training(einsum, mesh, 10, 0)
    state = parts.init(jax.random.PRNGKey(0))
    meta = resume.run_identity(einsum.to_json_best_effort(), [["a.tfrecord", 8]], 1)
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
    ckpt.save(3, state, einsum.model.to_dict(), meta)
    ckpt.close()

    parts_f = train_step.build_training(fused, mesh, 10, 0)
    ckpt = checkpoint.TrainCheckpointer(str(tmp_path))
    resume.check_resume(ckpt.restore_meta(3), fused.to_json_best_effort(),
                        [["a.tfrecord", 8]], 1)           # a kind change is no mismatch
    restored = ckpt.restore(3, parts_f.abstract_state, parts_f.shardings)
    ckpt.close()
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(4, 2, 40, 40, 3)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 50, (4, 7)), jnp.int32)
    variables = {"params": restored.params, "batch_stats": restored.batch_stats}
    ours = parts_f.model.apply(variables, images, tokens, train=False)
    ref = parts.model.apply({"params": state.params, "batch_stats": state.batch_stats}, images,
                            tokens, train=False)
    for key in ("feats", "image_emb", "text_emb"):
        _assert_close(ours[key], ref[key], what=key)
    batch = {"images": images, "labels": jnp.arange(4, dtype=jnp.int32), "tokens": tokens}
    new_state, metrics = parts_f.step_fn(restored, batch)
    assert int(new_state.step) == 4 and np.isfinite(float(metrics["loss"]))


def test_resume_lets_the_attention_kind_and_padding_change():
    saved = resume.run_identity(_config("einsum", 1).to_json_best_effort(), [], 1)
    resume.check_resume(saved, _config("cudnn", 64).to_json_best_effort(), [], 1)
    old = json.loads(_config("einsum", 1).to_json_best_effort())
    del old["model"]["attention"], old["model"]["attention_pad_to"]   # a run from before both
    resume.check_resume(resume.run_identity(json.dumps(old), [], 1),
                        _config("auto", 2).to_json_best_effort(), [], 1)
