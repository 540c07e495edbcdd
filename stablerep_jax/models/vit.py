"""Vision Transformer with timm's `vit_*_patch16_224` math and a one-to-one parameter map.

Released StableRep checkpoints are timm ViTs, so this module reproduces timm exactly (pre-norm
blocks, LayerNorm eps 1e-6, fused qkv, exact erf GELU, CLS token after the final norm) and names
its parameters so that every timm tensor has exactly one Flax counterpart:

  timm state dict key                      Flax params path                      transform
  cls_token            [1, 1, D]           cls_token                             -
  pos_embed            [1, 1 + T, D]       pos_embed                             -
  patch_embed.proj.weight [D, 3, p, p]     patch_embed/kernel [p, p, 3, D]       (2, 3, 1, 0)
  patch_embed.proj.bias                    patch_embed/bias                      -
  blocks.i.norm1.{weight,bias}             blocks_i/norm1/{scale,bias}           -
  blocks.i.attn.qkv.{weight,bias}          blocks_i/attn/qkv/{kernel,bias}       weight.T
  blocks.i.attn.proj.{weight,bias}         blocks_i/attn/proj/{kernel,bias}      weight.T
  blocks.i.norm2.{weight,bias}             blocks_i/norm2/{scale,bias}           -
  blocks.i.mlp.fc1.{weight,bias}           blocks_i/mlp/fc1/{kernel,bias}        weight.T
  blocks.i.mlp.fc2.{weight,bias}           blocks_i/mlp/fc2/{kernel,bias}        weight.T
  norm.{weight,bias}                       norm/{scale,bias}                     -

`timm_key_map(depth)` returns this table as data for the importer.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from stablerep_jax.models import attention as attention_lib

# (width, depth, heads) of timm's vit_{variant}_patch16_224.
VIT_VARIANTS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

Dtype = Any


def timm_trunc_normal(std: float = 0.02) -> nn.initializers.Initializer:
    """timm's `trunc_normal_(t, std=std)`: N(0, std) cut at -2 and 2 *absolute* (timm's a, b).

    With std 0.02 the cut sits at 100 sigma, so this is N(0, 0.02). flax's `truncated_normal`
    cuts at 2 sigma instead, which leaves a standard deviation of 0.0176, not 0.02.
    """
    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, dtype)
    return init


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """torch's default nn.Linear / nn.Conv2d bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


# timm 0.5.4 (the reference's pin) `VisionTransformer.init_weights('')`: trunc_normal(0.02) for
# pos_embed, cls_token and every Linear weight, zero Linear biases, LayerNorm (1, 0), and the
# patch-embedding Conv2d left at torch's default init.
_trunc_normal_02 = timm_trunc_normal(0.02)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: Optional[jax.Array] = None) -> jax.Array:
    """Scaled dot-product attention, [N, L, H, d] inputs; softmax in float32 for bf16 compute.

    `mask` (broadcastable to [N, H, L, L], True = attend) blocks positions, e.g. causal text.
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * jnp.asarray(scale, q.dtype), k,
                        preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhd->nqhd", weights, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: Optional[jax.Array] = None,
                          implementation: Optional[str] = None) -> jax.Array:
    """`attention` through `jax.nn.dot_product_attention` (same [N, L, H, d] layout and mask).

    `implementation` None lets JAX choose (JAX 0.10 always picks its XLA path, the same math as
    `attention` with the scale applied to the logits); "cudnn" asks for cuDNN's fused (flash)
    attention kernel, which exists only on NVIDIA GPUs and for bfloat16/float16 inputs.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


# model.attention -> the `attention.attend` implementation every block calls (None: our own
# einsum `attention`, the reference math). "dot_product" is the older name of "xla"; "auto"
# resolves per platform (`attention.MEASURED_BEST`: cuDNN on NVIDIA GPUs, XLA elsewhere) and
# falls back to XLA where cuDNN's limits (bf16/fp16, head_dim) do not allow it.
ATTENTION_IMPLEMENTATIONS: dict[str, Optional[str]] = {
    "einsum": None,
    "dot_product": "xla",
    "xla": "xla",
    "cudnn": "cudnn",
    "auto": "auto",
}


def check_attention(name: str, dtype: Dtype, pad_to: int = 1) -> None:
    """Raises a ValueError naming model.attention for an unknown name or a dtype cuDNN lacks,
    and naming model.attention_pad_to for a pad multiple below 1."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}; choose one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if name == "cudnn" and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16),
                                                    jnp.dtype(jnp.float16)):
        raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 (cuDNN's fused "
                         f"attention has no {jnp.dtype(dtype).name} kernel); use 'auto', "
                         f"'einsum' or 'xla' for {jnp.dtype(dtype).name}")
    if isinstance(pad_to, bool) or not isinstance(pad_to, numbers.Integral) or pad_to < 1:
        raise ValueError(f"model.attention_pad_to={pad_to!r}: must be an integer >= 1 (the "
                         "token count is padded up to a multiple of it; 1 pads nothing)")


def attend(name: str, q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = False,
           pad_to: int = 1) -> jax.Array:
    """Attention of [N, L, H, d] inputs with the kernel `name` (a key of
    ATTENTION_IMPLEMENTATIONS). `causal` hides each token's successors (the text tower).
    `pad_to` pads the tokens to a multiple of it, the padded keys masked (cuDNN has no backward
    pass for odd lengths such as the ViT's 197); einsum never pads."""
    implementation = ATTENTION_IMPLEMENTATIONS[name]
    if implementation is None:
        length = q.shape[1]
        mask = jnp.tril(jnp.ones((length, length), dtype=bool))[None, None] if causal else None
        return attention(q, k, v, mask)
    return attention_lib.attend(q, k, v, implementation, is_causal=causal, pad_to=pad_to)


def token_dense(x: jax.Array, features: int, dtype: Dtype, name: str) -> jax.Array:
    """`nn.Dense` (timm's Linear init) over the last axis of tokens [..., W], applied to them as
    one [tokens, W] matrix. The same math as on the [N, L, W] array, but XLA's CPU backend
    computes the kernel gradient of the 3-D form (two contracting axes) about 2x slower (the
    demo's 4-block ViT-Tiny training step at 48 px on 2 CPU cores: 438 ms -> 266 ms)."""
    y = nn.Dense(features, dtype=dtype, kernel_init=_trunc_normal_02, name=name)(
        x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], features)


class Attention(nn.Module):
    """timm `Attention`: fused qkv projection (with bias), heads, output projection."""
    num_heads: int
    dtype: Dtype = jnp.float32
    implementation: str = "einsum"   # a key of ATTENTION_IMPLEMENTATIONS
    pad_to: int = 1                  # model.attention_pad_to (not for einsum)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, length, width = x.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        qkv = token_dense(x, 3 * width, self.dtype, "qkv")
        # timm reshapes qkv to [N, L, 3, heads, head_dim]: q, k, v are contiguous thirds.
        qkv = qkv.reshape(n, length, 3, self.num_heads, width // self.num_heads)
        out = attend(self.implementation, qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                     pad_to=self.pad_to)
        out = out.reshape(n, length, width)
        return token_dense(out, width, self.dtype, "proj")


class Mlp(nn.Module):
    """timm `Mlp`: fc1 -> exact (erf) GELU -> fc2."""
    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = token_dense(x, self.hidden, self.dtype, "fc1")
        x = nn.gelu(x, approximate=False)   # flax defaults to the tanh approximation; timm is erf
        return token_dense(x, width, self.dtype, "fc2")


def _layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
    # Two-pass variance as in torch; statistics in float32 whatever the compute dtype.
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


class Block(nn.Module):
    """timm pre-norm `Block` (no layer scale, no drop path)."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    attention: str = "einsum"
    attention_pad_to: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        attn = Attention(self.num_heads, self.dtype, self.attention, self.attention_pad_to,
                         name="attn")
        x = x + attn(_layer_norm("norm1", self.dtype)(x))
        hidden = int(width * self.mlp_ratio)
        return x + Mlp(hidden, self.dtype, name="mlp")(_layer_norm("norm2", self.dtype)(x))


class VisionTransformer(nn.Module):
    """ViT whose `__call__(images [N, H, W, 3]) -> [N, width]` is timm's pooled CLS feature.

    Images are NHWC floats, already normalised; H = W = `image_size` (the learned position
    embedding is sized for it).
    """
    width: int
    depth: int
    num_heads: int
    patch_size: int = 16
    image_size: int = 224
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    remat: bool = False   # recompute each block's activations in the backward pass (less memory)
    attention: str = "einsum"   # model.attention: a key of ATTENTION_IMPLEMENTATIONS
    attention_pad_to: int = 1   # model.attention_pad_to: pad the tokens to a multiple of it

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"VisionTransformer expects images [N, {self.image_size}, "
                             f"{self.image_size}, 3] (NHWC), got {images.shape}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size "
                             f"{self.patch_size}")
        check_attention(self.attention, self.dtype, self.attention_pad_to)
        fan_in = 3 * self.patch_size * self.patch_size
        x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                    strides=(self.patch_size, self.patch_size), padding="VALID",
                    dtype=self.dtype, kernel_init=_patch_embed_init,
                    bias_init=torch_bias_init(fan_in), name="patch_embed")(
                        images.astype(self.dtype))
        n = x.shape[0]
        x = x.reshape(n, -1, self.width)          # row-major patches, as timm's flatten(2)
        num_tokens = x.shape[1] + 1
        cls = self.param("cls_token", _trunc_normal_02, (1, 1, self.width))
        pos = self.param("pos_embed", _trunc_normal_02, (1, num_tokens, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)).astype(self.dtype), x],
                            axis=1)
        x = x + pos.astype(self.dtype)
        block = nn.remat(Block) if self.remat else Block   # same parameter tree either way
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                      self.attention_pad_to, name=f"blocks_{i}")(x)
        x = _layer_norm("norm", self.dtype)(x)
        return x[:, 0]


def _patch_embed_init(key, shape, dtype=jnp.float32):
    """torch's default Conv2d init (kaiming uniform, a=sqrt(5)), which timm keeps."""
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# --------------------------------------------------------------------------------------------
# The timm <-> Flax parameter map, as data.

# A key map: torch key -> (collection, flax path, transform name). Transforms are applied by the
# importer: "T" transposes a linear weight, "conv" turns OIHW into HWIO, None keeps the array.
KeyMap = dict[str, tuple[str, tuple[str, ...], Optional[str]]]

TRANSFORMS: dict[Optional[str], Callable[[np.ndarray], np.ndarray]] = {
    None: lambda a: a,
    "T": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
}


def linear_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> KeyMap:
    """torch nn.Linear `prefix.{weight,bias}` -> Flax Dense `path/{kernel,bias}`."""
    return {f"{torch_prefix}.weight": ("params", flax_path + ("kernel",), "T"),
            f"{torch_prefix}.bias": ("params", flax_path + ("bias",), None)}


def layer_norm_entries(torch_prefix: str, flax_path: tuple[str, ...]) -> KeyMap:
    """torch LayerNorm `prefix.{weight,bias}` -> Flax LayerNorm `path/{scale,bias}`."""
    return {f"{torch_prefix}.weight": ("params", flax_path + ("scale",), None),
            f"{torch_prefix}.bias": ("params", flax_path + ("bias",), None)}


def timm_key_map(depth: int) -> KeyMap:
    """The table in this module's docstring for a ViT of `depth` blocks."""
    entries: KeyMap = {
        "cls_token": ("params", ("cls_token",), None),
        "pos_embed": ("params", ("pos_embed",), None),
        "patch_embed.proj.weight": ("params", ("patch_embed", "kernel"), "conv"),
        "patch_embed.proj.bias": ("params", ("patch_embed", "bias"), None),
    }
    for i in range(depth):
        t, f = f"blocks.{i}", (f"blocks_{i}",)
        entries.update(layer_norm_entries(f"{t}.norm1", f + ("norm1",)))
        entries.update(linear_entries(f"{t}.attn.qkv", f + ("attn", "qkv")))
        entries.update(linear_entries(f"{t}.attn.proj", f + ("attn", "proj")))
        entries.update(layer_norm_entries(f"{t}.norm2", f + ("norm2",)))
        entries.update(linear_entries(f"{t}.mlp.fc1", f + ("mlp", "fc1")))
        entries.update(linear_entries(f"{t}.mlp.fc2", f + ("mlp", "fc2")))
    entries.update(layer_norm_entries("norm", ("norm",)))
    return entries


def infer_vit_shape(state_dict: dict, prefix: str = "") -> dict:
    """Reads width, depth, patch size and image size off a timm ViT state dict's shapes.

    Returns {"width", "depth", "patch_size", "image_size", "variant"} ("variant" is None when the
    width matches no known variant). Raises KeyError naming a key the inference needs.
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        if prefix + key not in state_dict:
            raise KeyError(f"not a timm ViT state dict: no {prefix + key!r}")
    width = int(np.shape(state_dict[prefix + "cls_token"])[-1])
    patch_size = int(np.shape(state_dict[prefix + "patch_embed.proj.weight"])[-1])
    tokens = int(np.shape(state_dict[prefix + "pos_embed"])[1]) - 1
    side = int(round(tokens ** 0.5))
    if side * side != tokens:
        raise ValueError(f"{prefix}pos_embed holds {tokens} patch positions, not a square grid")
    depth = 0
    while f"{prefix}blocks.{depth}.attn.qkv.weight" in state_dict:
        depth += 1
    variant = next((name for name, (w, _, _) in VIT_VARIANTS.items() if w == width), None)
    return {"width": width, "depth": depth, "patch_size": patch_size,
            "image_size": side * patch_size, "variant": variant}
