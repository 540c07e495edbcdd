"""The Stable Diffusion text encoder (transformers' PyTorch `CLIPTextModel`) in Flax.

Token ids [B, L] -> last_hidden_state [B, L, hidden] after the final LayerNorm, which is what
Stable Diffusion conditions its UNet on: token + learned position embeddings, pre-norm
transformer layers with a causal mask, `quick_gelu` (SD 1.x) or `gelu` (SD 2.x) MLPs.

Modules are named after transformers' (`text_model/encoder/layers_N/self_attn/q_proj`), so
`weights.state_dict_to_params` maps the folder's `text_encoder/` weights by rule. LayerNorm
statistics are float32 whatever the compute dtype; attention logits and softmax are float32
(`jax.nn.dot_product_attention`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from stablerep_jax.generation.sd import weights
from stablerep_jax.models.attention import attend

Dtype = Any
# transformers < 5 saves a CLIPTextModel's keys under `text_model.` (so do SD hub folders);
# transformers 5 saves them without it (and strips it when loading). Both load.
PREFIX = "text_model."
# Buffers a CLIPTextModel state dict may hold that are not parameters.
_IGNORE = (r"^(text_model\.)?embeddings\.position_ids$",)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the function (exact erf GELU for "gelu", as torch's default).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class LayerNorm(nn.Module):
    """torch's LayerNorm; statistics (two-pass variance) and the affine map in float32."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (width,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (width,), self.dtype)
        h = x.astype(jnp.float32)
        mean = h.mean(-1, keepdims=True)
        var = jnp.square(h - mean).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=dtype, name=name)


class SelfAttention(nn.Module):
    num_heads: int
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, length, width = x.shape
        shape = (b, length, self.num_heads, width // self.num_heads)
        q, k, v = (_dense(width, self.dtype, name)(x).reshape(shape)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = attend(q, k, v, self.attention, mask=mask).reshape(b, length, width)
        return _dense(width, self.dtype, "out_proj")(out)


class Mlp(nn.Module):
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.hidden_act](_dense(self.intermediate_size, self.dtype, "fc1")(x))
        return _dense(x.shape[-1], self.dtype, "fc2")(h)


class EncoderLayer(nn.Module):
    """Pre-norm: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        h = LayerNorm(self.layer_norm_eps, self.dtype, name="layer_norm1")(x)
        x = x + SelfAttention(self.num_heads, self.attention, self.dtype, name="self_attn")(
            h, mask)
        h = LayerNorm(self.layer_norm_eps, self.dtype, name="layer_norm2")(x)
        return x + Mlp(self.intermediate_size, self.hidden_act, self.dtype, name="mlp")(h)


class Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_position_embeddings: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        tokens = self._embed(self.vocab_size, "token_embedding")(ids)
        positions = self._embed(self.max_position_embeddings, "position_embedding")(
            jnp.arange(ids.shape[1]))
        return tokens + positions[None]

    def _embed(self, rows: int, name: str) -> nn.Embed:
        return nn.Embed(rows, self.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
                        name=name)


class Encoder(nn.Module):
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        for i in range(self.num_hidden_layers):
            x = EncoderLayer(self.num_attention_heads, self.intermediate_size, self.hidden_act,
                             self.layer_norm_eps, self.attention, self.dtype,
                             name=f"layers_{i}")(x, mask)
        return x


class ClipTextEncoder(nn.Module):
    """transformers' `CLIPTextTransformer` (the `text_model.` of a CLIPTextModel state dict)
    without the pooled output SD does not use: token ids [B, L] -> last_hidden_state."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        length = ids.shape[1]
        if length > self.max_position_embeddings:
            raise ValueError(f"{length} tokens; the text encoder has "
                             f"{self.max_position_embeddings} positions")
        x = Embeddings(self.vocab_size, self.hidden_size, self.max_position_embeddings,
                       self.dtype, name="embeddings")(ids)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        x = Encoder(self.num_hidden_layers, self.num_attention_heads, self.intermediate_size,
                    self.hidden_act, self.layer_norm_eps, self.attention, self.dtype,
                    name="encoder")(x, causal)
        return LayerNorm(self.layer_norm_eps, self.dtype, name="final_layer_norm")(x)


def _text_config(config: dict) -> dict:
    """A CLIPTextConfig dict; a full CLIPConfig (text + vision) holds it under text_config."""
    return config["text_config"] if "text_config" in config else config


def build_clip_text(config: dict, dtype=jnp.float32, attention: str = "xla",
                    folder: str = "<config>") -> ClipTextEncoder:
    """The text encoder a transformers `text_encoder/config.json` describes."""
    config = _text_config(config)
    where = f"{folder}/config.json"
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads"):
        if key not in config:
            raise ValueError(f"{where}: no {key}")
    act = config.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (choose one of "
                         f"{sorted(ACTIVATIONS)})")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ValueError(f"{where}: hidden_size={config['hidden_size']!r} is not divisible by "
                         f"num_attention_heads={config['num_attention_heads']!r}")
    return ClipTextEncoder(
        vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 77)),
        hidden_act=act, layer_norm_eps=float(config.get("layer_norm_eps", 1e-5)),
        attention=attention, dtype=dtype)


def load_clip_text(folder: str, dtype=jnp.float32, attention: str = "xla"
                   ) -> tuple[ClipTextEncoder, dict]:
    """(module, params in `dtype`) from a transformers `CLIPTextModel` folder (SD's
    `text_encoder/`); call `module.apply({"params": params}, ids)` with int ids [B, L]."""
    module = build_clip_text(weights.read_config(folder), dtype=dtype, attention=attention,
                             folder=folder)
    abstract = weights.abstract_params(module, jnp.zeros((1, 2), jnp.int32))
    state_dict, path = weights.read_state_dict(folder)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state_dict) else ""
    params = weights.state_dict_to_params(state_dict, abstract, where=path, dtype=dtype,
                                          prefix=prefix, ignore=_IGNORE)
    return module, jax.tree_util.tree_map(jnp.asarray, params)
