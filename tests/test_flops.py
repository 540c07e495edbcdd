"""Model FLOPs counted from the model's shapes (stablerep_jax.flops) agree with XLA's own count
of the compiled program on the CPU, where its cost analysis sees every matmul: within 5% for the
forward pass and for the whole train step (3 x forward), on a ViT-S with head and on a ViT-Ti
with head and text tower. XLA's count is the larger one: it adds the elementwise work."""
import os

import jax
import jax.numpy as jnp
import pytest

from stablerep_jax import config_utils, flops, parallel, train_step
from stablerep_jax.models.encoder import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant: str, language: bool):
    """2 blocks at 224 px (197 tokens: attention is ~8% of the ViT's matmuls), 2 captions x
    2 views, finished float32 views (the colour stage is not model work)."""
    c = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    c.model.variant, c.model.depth, c.model.image_size, c.model.patch_size = variant, 2, 224, 16
    c.model.mlp_dim, c.model.emb_dim = 1024, 128
    c.model.attention = "einsum"
    c.batch_size, c.data.n_img = 2, 2
    c.model.add_language = language
    c.model.text_width = c.model.embed_dim = 256
    c.model.text_depth, c.model.text_heads = 2, 4
    return c


def _abstract_inputs(config):
    b, v, s = config.batch_size, config.data.n_img, config.model.image_size
    images = jax.ShapeDtypeStruct((b, v, s, s, 3), jnp.float32)
    tokens = (jax.ShapeDtypeStruct((b, config.model.context_length), jnp.int32)
              if config.model.add_language else None)
    return images, tokens


@pytest.mark.parametrize("variant,language", [("small", False), ("tiny", True)])
def test_model_flops_match_xla_cost_analysis_on_cpu(variant, language):
    config = _config(variant, language)
    b, v = config.batch_size, config.data.n_img
    model = build_model(config.model)
    images, tokens = _abstract_inputs(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    parts = train_step.build_training(config, mesh, total_steps=10, steps_per_epoch=0)
    variables = {"params": parts.abstract_state.params,
                 "batch_stats": parts.abstract_state.batch_stats}
    forward = jax.jit(lambda var, x, t: model.apply(var, x, t, train=True,
                                                    mutable=["batch_stats"]))
    xla_forward = train_step.compiled_flops(forward.lower(variables, images, tokens).compile())
    ours = flops.forward_flops(config.model, b, v, loss=False)
    assert (ours["text"] > 0) == language and ours["vit"] > 0 and ours["head"] > 0
    assert 1.0 <= xla_forward / sum(ours.values()) < 1.05, (xla_forward, ours)

    batch = {"images": images, "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if tokens is not None:
        batch["tokens"] = tokens
    xla_step = train_step.compiled_flops(parts.step_fn.lower(parts.abstract_state,
                                                             batch).compile())
    step = train_step.model_flops_per_step(config)
    assert step == 3 * sum(flops.forward_flops(config.model, b, v).values())
    assert abs(xla_step / step - 1) < 0.05, (xla_step, step)


def test_vit_b16_counts_and_what_is_left_out():
    """ViT-B/16 at 224 px: 35.1 GFLOP forward per image (the issue's count), 105.5 per training
    image at 43 x 6; remat and attention padding change nothing; the loss grows with the
    batch, the rest does not."""
    base = dict(variant="base", image_size=224, mlp_dim=4096, emb_dim=256)
    assert flops.vit_forward(768, 12, 16, 224) / 1e9 == pytest.approx(35.126, abs=1e-3)
    per_image = flops.train_flops_per_image(base, 43, 6)
    assert per_image / 1e9 == pytest.approx(105.50, abs=0.01)
    assert flops.train_flops_per_image({**base, "remat": True, "attention": "cudnn",
                                        "attention_pad_to": 64}, 43, 6) == per_image
    parts = flops.forward_flops(base, 43, 6)
    assert parts["loss"] == 2 * 258 * 256 * 258 and parts["text"] == parts["projection"] == 0
    assert flops.train_flops_per_image(base, 86, 6) > per_image        # only the loss grows
    pp = dict(base, add_language=True)
    text = flops.forward_flops(pp, 43, 6)
    assert text["text"] == 43 * 12 * flops.transformer_block(77, 512, 2048)
    assert text["projection"] == 2 * 258 * 768 * 512 + 2 * 43 * 512 * 512


def test_utilisation_and_published_peaks():
    u = flops.utilisation(flops_per_step=4e12, seconds_per_step=0.5, chips=2,
                          peak_flops_per_chip=8e12)
    assert u == dict(tflops_per_sec_per_chip=4.0, mfu=0.5)
    assert flops.utilisation(1e12, 1.0, 1, 0.0)["mfu"] is None
    assert flops.published_peak_flops("NVIDIA H200") == 989e12
    assert flops.published_peak_flops("cpu") == 0.0
