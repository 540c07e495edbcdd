"""The full StableRep / StableRep++ model: ViT + projection head (+ text tower and projections).

Mirrors the reference `VisionEncoder` / `VisionTextEncoder`: the ViT runs once on all views of
all captions; its CLS features are split into view groups, and each group goes through the head
with its own (global-batch) BatchNorm statistics. Outputs are laid out view-major (every
caption's view 0, then every caption's view 1, ...), the reference's `torch.cat(augs, 0)` order,
so the caller expands labels with `jnp.tile(labels, V)`.

Flax tree: `visual` (ViT), `image_mlp` (head); with language also `text`, `image_projection` and
`text_projection` (matrices for vl_projection "linear", heads for "mlp") and the scalar
`logit_scale` (log of the multiplier, as the reference stores it).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from stablerep_jax.models.heads import ProjectionHead
from stablerep_jax.models.text import TextTransformer
from stablerep_jax.models.vit import VIT_VARIANTS, VisionTransformer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# Fields of the model config that only StableRep++ reads; defaults are the reference's.
_LANGUAGE_DEFAULTS = {
    "text_width": 512, "text_depth": 12, "text_heads": 8, "context_length": 77,
    "vocab_size": 49408, "vl_projection": "linear", "embed_dim": 512,
    "logit_scale_init": 1.0 / 0.07,
}


class StableRepModel(nn.Module):
    """StableRep (image only) or StableRep++ (`add_language`) encoder; see the module docstring."""
    width: int
    depth: int
    num_heads: int
    patch_size: int = 16
    image_size: int = 224
    mlp_dim: int = 4096
    emb_dim: int = 256
    add_language: bool = False
    text_width: int = 512
    text_depth: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    vl_projection: str = "linear"
    embed_dim: int = 512
    logit_scale_init: float = 1.0 / 0.07
    dtype: Any = jnp.float32
    remat: bool = False      # rematerialise every transformer block (image and text towers)
    attention: str = "einsum"   # both towers' attention kernel (vit.ATTENTION_IMPLEMENTATIONS)
    attention_pad_to: int = 1   # pad tokens to a multiple of this for the kernel (not einsum)

    def setup(self):
        self.visual = VisionTransformer(self.width, self.depth, self.num_heads, self.patch_size,
                                        self.image_size, dtype=self.dtype, remat=self.remat,
                                        attention=self.attention,
                                        attention_pad_to=self.attention_pad_to)
        self.image_mlp = ProjectionHead(self.mlp_dim, self.emb_dim, self.dtype)
        if not self.add_language:
            return
        self.text = TextTransformer(self.vocab_size, self.context_length, self.text_width,
                                    self.text_depth, self.text_heads, self.dtype,
                                    remat=self.remat, attention=self.attention,
                                    attention_pad_to=self.attention_pad_to)
        if self.vl_projection == "linear":
            self.image_projection = self.param(
                "image_projection", nn.initializers.normal(self.width ** -0.5),
                (self.width, self.embed_dim))
            self.text_projection = self.param(
                "text_projection", nn.initializers.normal(self.text_width ** -0.5),
                (self.text_width, self.embed_dim))
        elif self.vl_projection == "mlp":
            # The reference's mlp projections end at the head's output width (ssl_emb_dim).
            self.image_projection = ProjectionHead(self.mlp_dim, self.emb_dim, self.dtype)
            self.text_projection = ProjectionHead(self.mlp_dim, self.emb_dim, self.dtype)
        else:
            raise ValueError(f"model.vl_projection must be 'linear' or 'mlp', got "
                             f"{self.vl_projection!r}")
        self.logit_scale = self.param(
            "logit_scale", lambda _: jnp.asarray(math.log(self.logit_scale_init), jnp.float32))

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images [N, H, W, 3] -> CLS features [N, width] (frozen features for linear probes)."""
        return self.visual(images)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """tokens [B, L] -> text-tower features [B, text_width] (before text_projection)."""
        if not self.add_language:
            raise ValueError("this model has no text tower (model.add_language is False)")
        return self.text(tokens)

    def __call__(self, images: jax.Array, tokens: Optional[jax.Array] = None,
                 train: bool = True) -> dict:
        if images.ndim != 5:
            raise ValueError(f"StableRepModel expects images [B, V, H, W, 3], got {images.shape}")
        b, v = images.shape[:2]
        # The ViT runs caption-major ([B, V] -> [B * V]: the caption axis, sharded over the mesh,
        # stays the leading one, so each device encodes only its own images); only the small
        # feature tensor is then regrouped view-major. Flattening view-major first would split
        # the sharded axis and make every device encode the whole global batch.
        flat = images.reshape((b * v,) + images.shape[2:])
        groups = jnp.swapaxes(self.visual(flat).reshape(b, v, self.width), 0, 1)   # [V, B, W]
        feats = self.image_mlp(groups, train).reshape(v * b, self.emb_dim)
        out = {"feats": feats.astype(jnp.float32)}
        if not self.add_language:
            return out
        if tokens is None:
            raise ValueError("a StableRep++ model (add_language) needs text tokens [B, L]")
        if tokens.shape[0] != b:
            raise ValueError(f"{tokens.shape[0]} token rows for {b} captions of images")
        text = self.text(tokens)
        if self.vl_projection == "linear":
            image_emb = (groups @ self.image_projection.astype(self.dtype)).reshape(v * b, -1)
            text_emb = text @ self.text_projection.astype(self.dtype)
        else:
            image_emb = self.image_projection(groups, train).reshape(v * b, -1)
            text_emb = self.text_projection(text, train)
        out.update(image_emb=image_emb.astype(jnp.float32), text_emb=text_emb.astype(jnp.float32),
                   logit_scale=jnp.exp(self.logit_scale))
        return out


def _get(config: Mapping, key: str, default=None):
    try:
        return config[key]
    except (KeyError, AttributeError):
        if default is None:
            raise KeyError(f"model config has no field {key!r}") from None
        return default


def build_model(model_config: Mapping) -> StableRepModel:
    """Builds the model from the train config's `model` ConfigDict, or its dict form as a
    checkpoint stores it (`image_size` included: the ViT's position embedding depends on it).

    Resolves `variant` to (width, depth, heads), applies `depth` > 0 as an override, maps
    the `dtype` string to a compute dtype (params stay float32) and reads `remat` (default off),
    `attention` (default einsum, as checkpoints written before the key) and `attention_pad_to`.
    """
    variant = _get(model_config, "variant")
    if variant not in VIT_VARIANTS:
        raise ValueError(f"model.variant={variant!r}; choose one of {', '.join(VIT_VARIANTS)}")
    width, depth, heads = VIT_VARIANTS[variant]
    if int(_get(model_config, "depth", 0)) > 0:
        depth = int(model_config["depth"])
    dtype_name = _get(model_config, "dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype={dtype_name!r}; choose one of {', '.join(DTYPES)}")
    add_language = bool(_get(model_config, "add_language", False))
    language = {k: _get(model_config, k, d) for k, d in _LANGUAGE_DEFAULTS.items()}
    return StableRepModel(
        width=width, depth=depth, num_heads=heads,
        patch_size=int(_get(model_config, "patch_size", 16)),
        image_size=int(_get(model_config, "image_size")),
        mlp_dim=int(_get(model_config, "mlp_dim")), emb_dim=int(_get(model_config, "emb_dim")),
        add_language=add_language,
        text_width=int(language["text_width"]), text_depth=int(language["text_depth"]),
        text_heads=int(language["text_heads"]), context_length=int(language["context_length"]),
        vocab_size=int(language["vocab_size"]), vl_projection=str(language["vl_projection"]),
        embed_dim=int(language["embed_dim"]), logit_scale_init=float(language["logit_scale_init"]),
        dtype=DTYPES[dtype_name], remat=bool(_get(model_config, "remat", False)),
        attention=str(_get(model_config, "attention", "einsum")),
        attention_pad_to=_get(model_config, "attention_pad_to", 1))
