"""CLIP-style text tower of StableRep++ (reference `StableRepMM.py`, `encode_text`).

Token embedding + learned positions -> `depth` pre-norm residual attention blocks with a causal
mask and QuickGELU -> ln_final -> the feature at each sequence's end token (`tokens.argmax(-1)`,
the EOT id is the largest in CLIP's vocabulary).

Parameter map (reference torch keys -> Flax `text/...`, see `text_key_map`):
  token_embedding.weight                      token_embedding/embedding
  positional_embedding [L, W]                 positional_embedding
  transformer.resblocks.i.ln_1.{weight,bias}  resblocks_i/ln_1/{scale,bias}
  transformer.resblocks.i.attn.in_proj_weight resblocks_i/attn/in_proj/kernel   (weight.T)
  transformer.resblocks.i.attn.in_proj_bias   resblocks_i/attn/in_proj/bias
  transformer.resblocks.i.attn.out_proj.*     resblocks_i/attn/out_proj/{kernel (.T),bias}
  transformer.resblocks.i.ln_2.{weight,bias}  resblocks_i/ln_2/{scale,bias}
  transformer.resblocks.i.mlp.c_fc.*          resblocks_i/mlp/c_fc/{kernel (.T),bias}
  transformer.resblocks.i.mlp.c_proj.*        resblocks_i/mlp/c_proj/{kernel (.T),bias}
  ln_final.{weight,bias}                      ln_final/{scale,bias}
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from stablerep_jax.models.vit import (KeyMap, attend, check_attention, layer_norm_entries,
                                      linear_entries, torch_bias_init)

Dtype = Any


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # torch LayerNorm defaults (eps 1e-5), computed in float32 as the reference's subclass does.
    return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, name=name)


class CausalSelfAttention(nn.Module):
    """torch nn.MultiheadAttention (fused in_proj, out_proj) with a causal mask."""
    num_heads: int
    depth: int                  # of the whole tower, for CLIP's output-projection init scale
    dtype: Dtype = jnp.float32
    attention: str = "einsum"   # model.attention (vit.ATTENTION_IMPLEMENTATIONS), causal here
    pad_to: int = 1             # model.attention_pad_to

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"text width {width} is not divisible by text heads {self.num_heads}")
        attn_std = width ** -0.5
        proj_std = attn_std * (2 * self.depth) ** -0.5
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="in_proj",
                       kernel_init=nn.initializers.normal(attn_std))(x)
        qkv = qkv.reshape(n, length, 3, self.num_heads, width // self.num_heads)
        out = attend(self.attention, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True,
                     pad_to=self.pad_to)
        return nn.Dense(width, dtype=self.dtype, name="out_proj",
                        kernel_init=nn.initializers.normal(proj_std))(out.reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block laid out as resblocks_i/{ln_1, attn, ln_2, mlp/{c_fc, c_proj}}."""
    num_heads: int
    depth: int
    dtype: Dtype = jnp.float32
    attention: str = "einsum"
    attention_pad_to: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.num_heads, self.depth, self.dtype, self.attention,
                                    self.attention_pad_to, name="attn")(
            _layer_norm("ln_1", self.dtype)(x))
        return x + _TextMlp(self.depth, self.dtype, name="mlp")(_layer_norm("ln_2", self.dtype)(x))


class _TextMlp(nn.Module):
    """c_fc -> QuickGELU -> c_proj, CLIP's weight init scales, torch's default Linear biases
    (the reference re-initialises only the weights; nn.MultiheadAttention zeroes its biases)."""
    depth: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        h = nn.Dense(4 * width, dtype=self.dtype, name="c_fc",
                     kernel_init=nn.initializers.normal((2 * width) ** -0.5),
                     bias_init=torch_bias_init(width))(x)
        proj_std = width ** -0.5 * (2 * self.depth) ** -0.5
        return nn.Dense(width, dtype=self.dtype, name="c_proj",
                        kernel_init=nn.initializers.normal(proj_std),
                        bias_init=torch_bias_init(4 * width))(quick_gelu(h))


class TextTransformer(nn.Module):
    """`__call__(tokens [B, L] int) -> [B, width]`, L <= context_length."""
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    depth: int = 12
    num_heads: int = 8
    dtype: Dtype = jnp.float32
    remat: bool = False   # recompute each block's activations in the backward pass
    attention: str = "einsum"   # model.attention, as the ViT's (with a causal mask)
    attention_pad_to: int = 1   # model.attention_pad_to (77 tokens are odd as well)

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"text tokens must be [B, L<={self.context_length}], "
                             f"got {tokens.shape}")
        check_attention(self.attention, self.dtype, self.attention_pad_to)
        length = tokens.shape[1]
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding",
                     embedding_init=nn.initializers.normal(0.02))(tokens)
        pos = self.param("positional_embedding", nn.initializers.normal(0.01),
                         (self.context_length, self.width))
        x = x + pos[:length].astype(self.dtype)
        block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
        for i in range(self.depth):
            x = block(self.num_heads, self.depth, self.dtype, self.attention,
                      self.attention_pad_to, name=f"resblocks_{i}")(x)
        x = _layer_norm("ln_final", self.dtype)(x)
        return x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]


def text_key_map(depth: int, torch_prefix: str = "",
                 flax_path: tuple[str, ...] = ("text",)) -> KeyMap:
    """The map in this module's docstring (reference keys sit at the model's top level)."""
    p = torch_prefix
    entries: KeyMap = {
        f"{p}token_embedding.weight":
            ("params", flax_path + ("token_embedding", "embedding"), None),
        f"{p}positional_embedding": ("params", flax_path + ("positional_embedding",), None),
    }
    for i in range(depth):
        t, f = f"{p}transformer.resblocks.{i}", flax_path + (f"resblocks_{i}",)
        entries.update(layer_norm_entries(f"{t}.ln_1", f + ("ln_1",)))
        entries[f"{t}.attn.in_proj_weight"] = ("params", f + ("attn", "in_proj", "kernel"), "T")
        entries[f"{t}.attn.in_proj_bias"] = ("params", f + ("attn", "in_proj", "bias"), None)
        entries.update(linear_entries(f"{t}.attn.out_proj", f + ("attn", "out_proj")))
        entries.update(layer_norm_entries(f"{t}.ln_2", f + ("ln_2",)))
        entries.update(linear_entries(f"{t}.mlp.c_fc", f + ("mlp", "c_fc")))
        entries.update(linear_entries(f"{t}.mlp.c_proj", f + ("mlp", "c_proj")))
    entries.update(layer_norm_entries(f"{p}ln_final", flax_path + ("ln_final",)))
    return entries
