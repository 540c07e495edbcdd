"""Models: timm ViT parity, head parity (eval, per-group train statistics, running stats,
sharded = global statistics), text tower parity, encoder layout and build_model."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from stablerep_jax import parallel
from stablerep_jax.convert import apply_key_map
from stablerep_jax.models.encoder import StableRepModel, build_model
from stablerep_jax.models.heads import ProjectionHead, head_key_map
from stablerep_jax.models.text import TextTransformer, text_key_map
from stablerep_jax.models.vit import VIT_VARIANTS, VisionTransformer, timm_key_map

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from stablerep_jax.testing import torch_reference as tref  # noqa: E402  (needs torch)

pytestmark = pytest.mark.torch





def timm_vit(name, image_size, seed, depth=None):
    torch.manual_seed(seed)
    kwargs = {} if depth is None else {"depth": depth}
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=image_size, **kwargs)
    return tref.randomize_(model, seed).eval()


def nchw_to_nhwc(x):
    return np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------------------------
# ViT


@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
@pytest.mark.parametrize("name,variant,image_size", [
    ("vit_tiny_patch16_224", "tiny", 224),
    ("vit_small_patch16_224", "small", 224),
    ("vit_small_patch16_224", "small", 64),
])
def test_vit_matches_timm(close, name, variant, image_size, attention):
    model = timm_vit(name, image_size, seed=1)
    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(images).numpy()
    width, depth, heads = VIT_VARIANTS[variant]
    params = apply_key_map(tref.state_dict_numpy(model), timm_key_map(depth))["params"]
    vit = VisionTransformer(width, depth, heads, image_size=image_size, attention=attention)
    ours = vit.apply({"params": params}, nchw_to_nhwc(images))
    assert ours.shape == (2, width)
    close(ours, ref, 1e-5)


def test_vit_map_covers_every_parameter_with_the_right_shape():
    width, depth, heads = VIT_VARIANTS["tiny"]
    vit = VisionTransformer(width, 2, heads, image_size=32)
    abstract = jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    model = timm_vit("vit_tiny_patch16_224", 32, seed=0, depth=2)
    mapped = apply_key_map(tref.state_dict_numpy(model), timm_key_map(2))
    assert set(mapped) == {"params"}
    assert (jax.tree_util.tree_structure(mapped["params"])
            == jax.tree_util.tree_structure(abstract["params"]))
    for a, b in zip(jax.tree_util.tree_leaves(mapped["params"]),
                    jax.tree_util.tree_leaves(abstract["params"])):
        assert a.shape == b.shape


def test_vit_rejects_wrong_image_size():
    vit = VisionTransformer(32, 1, 2, patch_size=8, image_size=32)
    with pytest.raises(ValueError, match="32, 32, 3"):
        vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


# model.attention: "einsum" (our own) or jax.nn.dot_product_attention ("dot_product" = "xla":
# XLA's path; "cudnn": cuDNN's fused attention, GPU only; "auto": per platform). Same numbers,
# same gradients (the padded path: tests/test_attention.py).


def _vit_loss_and_grads(attention):
    """Multi-positive loss of a 3-block ViT's CLS features on 4 captions x 2 views, and grads."""
    from stablerep_jax import losses
    images = jnp.asarray(np.random.default_rng(3).normal(size=(8, 32, 32, 3)), jnp.float32)
    labels = jnp.tile(jnp.arange(4), 2)
    vit = VisionTransformer(64, 3, 4, patch_size=8, image_size=32, attention=attention)
    params = jax.jit(vit.init)(jax.random.PRNGKey(0), images)["params"]

    def loss(p):
        return losses.multi_positive_contrastive_loss(vit.apply({"params": p}, images), labels)
    return jax.jit(jax.value_and_grad(loss))(params)


def test_dot_product_attention_gives_the_same_loss_and_gradients_as_einsum():
    loss, grads = _vit_loss_and_grads("einsum")
    loss_d, grads_d = _vit_loss_and_grads("dot_product")
    assert abs(float(loss) - float(loss_d)) < 1e-5
    flat_d = dict(jax.tree_util.tree_flatten_with_path(grads_d)[0])
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        np.testing.assert_allclose(flat_d[path], g, atol=1e-5, rtol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("attention,calls,implementation", [
    ("einsum", 0, None), ("dot_product", 2, "xla"), ("xla", 2, "xla"), ("cudnn", 2, "cudnn"),
    ("auto", 2, "xla")])   # auto on a CPU: XLA
def test_attention_choice_reaches_every_block(monkeypatch, attention, calls, implementation):
    """Each block calls jax.nn.dot_product_attention exactly when asked to, with the kernel
    asked for (cuDNN is recorded, not run: this is a CPU; the spy computes with XLA)."""
    real, seen = jax.nn.dot_product_attention, []

    def spy(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return real(*args, **kwargs)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    dtype = jnp.bfloat16 if attention == "cudnn" else jnp.float32
    vit = VisionTransformer(32, 2, 2, patch_size=8, image_size=16, dtype=dtype,
                            attention=attention)
    jax.eval_shape(vit.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
    assert seen == [implementation] * calls


def test_build_model_passes_model_attention_to_the_vit(monkeypatch):
    real, seen = jax.nn.dot_product_attention, []

    def spy(*args, implementation=None, **kwargs):
        seen.append(implementation)
        return real(*args, **kwargs)
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    images = jnp.zeros((2, 2, 32, 32, 3))

    def trace(model):
        jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.PRNGKey(0))
    trace(build_model(tiny_model_config()))
    assert seen == []                                   # einsum by default
    trace(build_model(tiny_model_config(attention="dot_product")))
    assert seen == ["xla", "xla"]                       # every block of the 2-block ViT


def test_attention_rejects_unknown_names_and_cudnn_without_bfloat16():
    images = jnp.zeros((1, 16, 16, 3))
    with pytest.raises(ValueError, match="model.attention='flash'; choose one of einsum"):
        VisionTransformer(32, 1, 2, patch_size=8, image_size=16, attention="flash").init(
            jax.random.PRNGKey(0), images)
    with pytest.raises(ValueError, match="'cudnn' needs model.dtype bfloat16"):
        VisionTransformer(32, 1, 2, patch_size=8, image_size=16, attention="cudnn").init(
            jax.random.PRNGKey(0), images)


# --------------------------------------------------------------------------------------------
# Projection head

D, MLP, OUT = 12, 24, 8


def torch_head(seed=0):
    torch.manual_seed(seed)
    return tref.randomize_(tref.projection_head(D, MLP, OUT), seed)


def _map_head(head):
    sd = {f"h.{k}": v for k, v in tref.state_dict_numpy(head).items()}
    return apply_key_map(sd, head_key_map("h", ()))


def test_head_eval_matches_torch(close):
    head = torch_head().eval()
    x = np.random.default_rng(0).normal(size=(2, 10, D)).astype(np.float32)
    with torch.no_grad():
        ref = np.stack([head(torch.from_numpy(g)).numpy() for g in x])
    ours = ProjectionHead(MLP, OUT).apply(_map_head(head), x, train=False)
    close(ours, ref, 1e-5)
    ours_2d = ProjectionHead(MLP, OUT).apply(_map_head(head), x[0], train=False)
    close(ours_2d, ref[0], 1e-5)


def test_head_train_uses_per_group_statistics_and_updates_running_stats_like_torch(close):
    head = torch_head()
    variables = _map_head(head)            # running stats are non-trivial (randomize_)
    x = np.random.default_rng(1).normal(size=(3, 16, D)).astype(np.float32) * 2 + 0.5
    head.train()
    ref = []
    for group in x:                        # the reference: one forward per view group
        ref.append(head(torch.from_numpy(group)).detach().numpy())
    ours, mutated = ProjectionHead(MLP, OUT).apply(variables, x, train=True,
                                                   mutable=["batch_stats"])
    close(ours, np.stack(ref), 1e-5)
    torch_stats = {k: v for k, v in tref.state_dict_numpy(head).items() if "running" in k}
    for k in (1, 2):
        stats = mutated["batch_stats"][f"bn{k}"]
        close(stats["mean"], torch_stats[f"bn{k}.running_mean"], 1e-5)
        close(stats["var"], torch_stats[f"bn{k}.running_var"], 1e-5)


def test_head_statistics_differ_per_group():
    """Two groups with different offsets normalise independently (not one BN over 2n rows)."""
    head = ProjectionHead(MLP, OUT)
    x = np.random.default_rng(2).normal(size=(2, 8, D)).astype(np.float32)
    x[1] += 5.0
    variables = head.init(jax.random.PRNGKey(0), x, train=False)
    per_group = head.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    alone = head.apply(variables, x[1:], train=True, mutable=["batch_stats"])[0]
    joint = head.apply(variables, x.reshape(1, 16, D), train=True, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(per_group[1], alone[0], rtol=1e-5, atol=1e-5)
    assert not np.allclose(per_group[1], joint[0, 8:], atol=1e-3)


def test_sharded_head_uses_global_batch_statistics(close):
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    head = ProjectionHead(MLP, OUT)
    x = np.random.default_rng(3).normal(size=(2, 32, D)).astype(np.float32)
    variables = head.init(jax.random.PRNGKey(0), x, train=False)

    def step(v, batch):
        return head.apply(v, batch, train=True, mutable=["batch_stats"])

    want_out, want_stats = jax.jit(step)(variables, x)
    sharded = jax.device_put(x, NamedSharding(mesh, P(None, parallel.DATA_AXIS, None)))
    replicated = jax.device_put(variables, parallel.replicated(mesh))
    got_out, got_stats = jax.jit(step)(replicated, sharded)
    assert len(sharded.sharding.device_set) == 8
    close(got_out, want_out, 1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(want_stats)):
        close(a, b, 1e-5)
    # Global statistics, not per-shard ones: a shard's 4 rows alone normalise differently.
    shard_alone = head.apply(variables, x[:, :4], train=True, mutable=["batch_stats"])[0]
    assert not np.allclose(shard_alone, np.asarray(want_out)[:, :4], atol=1e-3)


# --------------------------------------------------------------------------------------------
# Text tower

VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS = 100, 16, 32, 2, 4


def random_tokens(batch, seed):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((batch, CONTEXT), np.int64)
    for i in range(batch):
        length = rng.integers(3, CONTEXT)
        tokens[i, :length] = rng.integers(1, VOCAB - 1, size=length)
        tokens[i, length - 1] = VOCAB - 1          # the end token has the largest id, as in CLIP
    return tokens


def test_text_tower_matches_torch(close):
    torch.manual_seed(4)
    ref_model = tref.randomize_(tref.TextEncoder(VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS), 4).eval()
    tokens = random_tokens(3, seed=5)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(tokens)).numpy()
    params = apply_key_map(tref.state_dict_numpy(ref_model), text_key_map(TDEPTH, flax_path=()))
    ours = TextTransformer(VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS).apply(
        params, jnp.asarray(tokens, jnp.int32))
    assert ours.shape == (3, TWIDTH)
    close(ours, ref, 1e-4)


def test_text_tower_is_causal():
    model = TextTransformer(VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS)
    tokens = random_tokens(2, seed=6)
    variables = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens, jnp.int32))
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 7) % (VOCAB - 1)     # only positions after every EOT
    end = tokens.argmax(-1)
    assert np.all(end < CONTEXT - 1)
    a = model.apply(variables, jnp.asarray(tokens, jnp.int32))
    b = model.apply(variables, jnp.asarray(changed, jnp.int32))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Encoder


def tiny_model_config(**overrides):
    config = {"variant": "tiny", "depth": 2, "patch_size": 16, "image_size": 32, "mlp_dim": MLP,
              "emb_dim": OUT, "dtype": "float32", "add_language": False}
    config.update(overrides)
    return config


def test_encoder_matches_reference_forward_view_major_with_per_group_bn(close):
    visual = timm_vit("vit_tiny_patch16_224", 32, seed=7, depth=2)
    head = tref.randomize_(tref.projection_head(192, MLP, OUT), 7)
    sd = {**tref.state_dict_numpy(visual, "visual."), **tref.state_dict_numpy(head, "image_mlp.")}
    key_map = {f"visual.{k}": (c, ("visual",) + p, t) for k, (c, p, t) in timm_key_map(2).items()}
    key_map.update(head_key_map("image_mlp", ("image_mlp",)))
    variables = apply_key_map(sd, key_map)
    b, v = 3, 2
    images = torch.randn(b, v, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    # The reference: torch.cat(augs, 0) (view-major), one ViT pass, head per view group.
    head_train = copy.deepcopy(head).train()
    with torch.no_grad():
        flat = torch.cat([images[:, i] for i in range(v)], 0)
        groups = torch.split(visual(flat), b, 0)
        ref = torch.cat([head_train(g) for g in groups], 0).numpy()
    model = build_model(tiny_model_config())
    out, _ = model.apply(variables, np.ascontiguousarray(images.numpy().transpose(0, 1, 3, 4, 2)),
                         train=True, mutable=["batch_stats"])
    assert set(out) == {"feats"}
    assert out["feats"].shape == (v * b, OUT)
    close(out["feats"], ref, 1e-4)
    enc = model.apply(variables, nchw_to_nhwc(images[:, 0]), method=StableRepModel.encode_image)
    with torch.no_grad():
        close(enc, visual(images[:, 0]).numpy(), 1e-4)


def test_encoder_sharded_over_captions_equals_unsharded(close):
    """8 devices, captions sharded over `data`: features and BN statistics are the global ones."""
    mesh = parallel.make_mesh()
    model = build_model(tiny_model_config(depth=1, patch_size=8))
    images = np.random.default_rng(12).normal(size=(16, 2, 32, 32, 3)).astype(np.float32)
    variables = model.init(jax.random.PRNGKey(0), images[:2], train=False)

    def step(v, x):
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    want, want_stats = jax.jit(step)(variables, images)
    got, got_stats = jax.jit(step)(jax.device_put(variables, parallel.replicated(mesh)),
                                   jax.device_put(images, parallel.batch_sharded(mesh)))
    close(got["feats"], want["feats"], 1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got_stats), jax.tree_util.tree_leaves(want_stats)):
        close(a, b, 1e-5)


@pytest.mark.parametrize("vl_projection", ["linear", "mlp"])
def test_stablerep_pp_outputs(vl_projection):
    config = tiny_model_config(add_language=True, text_width=TWIDTH, text_depth=1,
                               text_heads=THEADS, context_length=CONTEXT, vocab_size=VOCAB,
                               embed_dim=16, vl_projection=vl_projection,
                               logit_scale_init=1 / 0.07)
    model = build_model(config)
    images = jnp.asarray(np.random.default_rng(9).normal(size=(2, 3, 32, 32, 3)), jnp.float32)
    tokens = jnp.asarray(random_tokens(2, seed=10), jnp.int32)
    variables = model.init(jax.random.PRNGKey(0), images, tokens, train=False)
    assert set(variables["params"]) >= {"visual", "image_mlp", "text", "image_projection",
                                        "text_projection", "logit_scale"}
    np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
    out, _ = model.apply(variables, images, tokens, train=True, mutable=["batch_stats"])
    embed = 16 if vl_projection == "linear" else OUT
    assert out["feats"].shape == (6, OUT)
    assert out["image_emb"].shape == (6, embed)
    assert out["text_emb"].shape == (2, embed)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.07, rtol=1e-5)
    if vl_projection == "linear":
        cls = model.apply(variables, jnp.swapaxes(images, 0, 1).reshape(6, 32, 32, 3),
                          method=StableRepModel.encode_image)
        want = cls @ variables["params"]["image_projection"]
        np.testing.assert_allclose(out["image_emb"], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="tokens"):
        model.apply(variables, images, None, train=False)


def test_build_model_resolves_variant_depth_and_dtype():
    model = build_model(tiny_model_config(variant="small", depth=0, dtype="bfloat16"))
    assert (model.width, model.depth, model.num_heads, model.dtype) == (384, 12, 6, jnp.bfloat16)
    model = build_model(tiny_model_config(variant="base", depth=3, image_size=64))
    assert (model.width, model.depth, model.num_heads, model.image_size) == (768, 3, 12, 64)
    with pytest.raises(ValueError, match="huge"):
        build_model(tiny_model_config(variant="huge"))
    with pytest.raises(ValueError, match="float16"):
        build_model(tiny_model_config(dtype="float16"))
    no_size = tiny_model_config()
    del no_size["image_size"]          # the model config is the one place the crop side lives
    with pytest.raises(KeyError, match="image_size"):
        build_model(no_size)


def test_bfloat16_compute_keeps_float32_params_and_is_close(close):
    images = jnp.asarray(np.random.default_rng(11).normal(size=(4, 2, 32, 32, 3)), jnp.float32)
    f32 = build_model(tiny_model_config())
    bf16 = build_model(tiny_model_config(dtype="bfloat16"))
    variables = f32.init(jax.random.PRNGKey(0), images, train=False)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(
        bf16.init(jax.random.PRNGKey(0), images, train=False)))
    a = f32.apply(variables, images, train=False)["feats"]
    b = bf16.apply(variables, images, train=False)["feats"]
    assert b.dtype == jnp.float32
    close(b, a, 5e-2)


# --------------------------------------------------------------------------------------------
# Initialisation: the reference pins timm 0.5.4, whose VisionTransformer.init_weights('') draws
# cls_token, pos_embed and every Linear weight from trunc_normal_(std=.02) (cut at +-2 absolute,
# i.e. N(0, 0.02)), zeroes Linear biases, sets LayerNorms to (1, 0) and leaves the patch Conv2d
# at torch's default; the head and the text tower's MLP keep torch's default Linear init.


def _timm_trunc_normal_std(shape, seed=0):
    """Standard deviation of timm's own trunc_normal_(std=.02) on a tensor of `shape`."""
    torch.manual_seed(seed)
    t = torch.empty(shape)
    timm.layers.trunc_normal_(t, std=0.02)
    return float(t.std())


def test_vit_init_statistics_match_timm_0_5_4():
    model = build_model(tiny_model_config(image_size=64))      # width 192, 16 patches + CLS
    images = jnp.zeros((2, 2, 64, 64, 3), jnp.float32)
    params = model.init(jax.random.PRNGKey(3), images, train=False)["params"]
    vit = params["visual"]
    qkv = np.asarray(vit["blocks_0"]["attn"]["qkv"]["kernel"])        # 192 x 576 draws
    ref_std = _timm_trunc_normal_std(qkv.shape)
    assert abs(qkv.std() / ref_std - 1) < 0.02, (qkv.std(), ref_std)   # flax's 2-sigma cut: -12%
    assert np.mean(np.abs(qkv) > 0.04) == pytest.approx(0.0455, abs=0.005)   # tails beyond 2 sigma
    for name in ("proj", "qkv"):
        assert not np.any(np.asarray(vit["blocks_1"]["attn"][name]["bias"]))
    fc1 = np.asarray(vit["blocks_1"]["mlp"]["fc1"]["kernel"])
    assert abs(fc1.std() / 0.02 - 1) < 0.02
    # cls_token is trunc_normal(0.02) in 0.5.4 (newer timm: N(0, 1e-6)); 192 draws: within 20%.
    cls = np.asarray(vit["cls_token"])
    assert cls.shape == (1, 1, 192) and 0.016 < cls.std() < 0.024
    pos = np.asarray(vit["pos_embed"])
    assert abs(pos.std() / 0.02 - 1) < 0.05
    # Patch embedding: torch Conv2d default, weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1 / np.sqrt(3 * 16 * 16)
    for leaf in (vit["patch_embed"]["kernel"], vit["patch_embed"]["bias"]):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.9 * bound
    assert np.all(np.asarray(vit["norm"]["scale"]) == 1)
    assert not np.any(np.asarray(vit["norm"]["bias"]))


def test_head_and_text_mlp_biases_use_torch_default_init():
    head = ProjectionHead(MLP, OUT).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 192)))["params"]
    ref = torch.nn.Linear(192, MLP)
    for name, fan_in in (("layer1", 192), ("layer2", MLP), ("layer3", MLP)):
        bias = np.asarray(head[name]["bias"])
        bound = 1 / np.sqrt(fan_in)
        # U(-b, b) has standard deviation b / sqrt(3) = 0.58 b; zeros (the old init) have 0.
        assert np.abs(bias).max() <= bound and bias.std() > 0.35 * bound, name
    assert np.asarray(head["layer1"]["bias"]).std() == pytest.approx(
        float(ref.bias.detach().std()), rel=0.35)
    text = TextTransformer(vocab_size=64, context_length=8, width=32, depth=1, num_heads=2)
    tparams = text.init(jax.random.PRNGKey(0), jnp.zeros((2, 8), jnp.int32))["params"]
    block = tparams["resblocks_0"]
    assert np.abs(np.asarray(block["mlp"]["c_fc"]["bias"])).max() > 0.5 / np.sqrt(32)
    assert np.abs(np.asarray(block["mlp"]["c_proj"]["bias"])).max() > 0.5 / np.sqrt(128)
    # nn.MultiheadAttention zeroes its in_proj and out_proj biases.
    assert not np.any(np.asarray(block["attn"]["in_proj"]["bias"]))
    assert not np.any(np.asarray(block["attn"]["out_proj"]["bias"]))


# --------------------------------------------------------------------------------------------
# Rematerialisation (model.remat): same numbers, fewer activations kept for the backward pass.


def _tiny_loss_and_vjp(remat, add_language=False):
    from stablerep_jax import losses
    rng = np.random.default_rng(5)
    images = jnp.asarray(rng.normal(size=(4, 2, 32, 32, 3)), jnp.float32)
    labels = jnp.tile(jnp.arange(4), 2)
    config = tiny_model_config(depth=3, remat=remat, add_language=add_language, text_width=32,
                               text_depth=2, text_heads=2, context_length=8, vocab_size=64,
                               embed_dim=16)
    config["patch_size"] = 8
    model = build_model(config)
    tokens = jnp.asarray(rng.integers(1, 64, size=(4, 8)), jnp.int32) if add_language else None
    variables = model.init(jax.random.PRNGKey(0), images, tokens, train=False)

    def loss(params):
        out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                             tokens, train=True, mutable=["batch_stats"])
        value = losses.multi_positive_contrastive_loss(out["feats"], labels, 0.1)
        if add_language:
            value = value + jnp.mean(out["image_emb"] ** 2) + jnp.mean(out["text_emb"] ** 2)
        return value

    value, vjp = jax.vjp(loss, variables["params"])
    return variables["params"], value, vjp(jnp.ones_like(value))[0], vjp


@pytest.mark.parametrize("add_language", [False, True])
def test_remat_gives_the_same_loss_and_gradients_and_keeps_fewer_residuals(add_language):
    params, loss, grads, vjp = _tiny_loss_and_vjp(False, add_language)
    params_r, loss_r, grads_r, vjp_r = _tiny_loss_and_vjp(True, add_language)
    # Same parameter tree (checkpoints and the timm key map are unaffected) and same numbers.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(params_r)
    assert abs(float(loss) - float(loss_r)) < 1e-5
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        g_r = dict(jax.tree_util.tree_flatten_with_path(grads_r)[0])[path]
        np.testing.assert_allclose(g_r, g, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # What the backward pass keeps from the forward (the vjp's residuals, params aside): with
    # remat only each block's input, without it every intermediate of every block.
    param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    kept = sum(x.nbytes for x in jax.tree_util.tree_leaves(vjp)) - param_bytes
    kept_r = sum(x.nbytes for x in jax.tree_util.tree_leaves(vjp_r)) - param_bytes
    assert kept_r < 0.25 * kept, (kept_r, kept)


def test_remat_is_off_by_default(repo_root):
    from stablerep_jax import config_utils
    assert build_model(tiny_model_config()).remat is False
    config = config_utils.load_config(str(repo_root / "configs" / "stablerep.py"))
    assert config.model.remat is False


@pytest.mark.parametrize("add_language", [False, True])
def test_each_device_encodes_only_its_own_images(add_language):
    """Per-device FLOPs of the sharded forward at 4 captions per device are the same on 1 and 8
    devices (before the fix, flattening view-major split the sharded caption axis and every
    device encoded the whole global batch: 8x the FLOPs on 8 devices)."""
    config = tiny_model_config(add_language=add_language, text_width=32, text_depth=1,
                               text_heads=2, context_length=8, vocab_size=64, embed_dim=16)
    model = build_model(config)
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((2, 2, 32, 32, 3)),
        jnp.zeros((2, 8), jnp.int32) if add_language else None, train=False))
    flops = []
    for n in (1, 8):
        mesh = parallel.make_mesh(jax.devices()[:n])
        rep, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        variables = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), abstract)
        images = jax.ShapeDtypeStruct((4 * n, 2, 32, 32, 3), jnp.float32, sharding=rows)
        tokens = (jax.ShapeDtypeStruct((4 * n, 8), jnp.int32, sharding=rows)
                  if add_language else None)

        def forward(v, x, t):
            return model.apply(v, x, t, train=True, mutable=["batch_stats"])[0]

        compiled = jax.jit(forward).lower(variables, images, tokens).compile()
        flops.append(compiled.cost_analysis()["flops"])
    assert flops[1] < 1.2 * flops[0], flops
