"""Stable Diffusion's denoising UNet (diffusers' `UNet2DConditionModel`, SD 1.x and 2.x) in
Flax linen, NHWC throughout, loading diffusers' PyTorch weights.

Every submodule is named like the PyTorch attribute it mirrors (`down_blocks_0/resnets_1/conv1`,
`.../transformer_blocks_0/attn1/to_out_0`, `.../ff/net_0/proj`), so `weights.py` maps the
weights by its name rule; a config this code cannot reproduce exactly raises a ValueError
naming the key, instead of loading weights into the wrong graph.

Numerics follow diffusers: GroupNorm/LayerNorm statistics in float32 (two-pass variance), the
eps of each norm as diffusers sets it, exact-erf GEGLU, the sinusoidal timestep embedding of
`get_timestep_embedding`. Activations and matmuls run in the module's `dtype`.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from stablerep_jax.generation.sd import weights
from stablerep_jax.models.attention import attend

DOWN_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}   # type -> has attention
UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
TRANSFORMER_NORM_EPS = 1e-6     # Transformer2DModel's GroupNorm (diffusers hard-codes it)
LAYER_NORM_EPS = 1e-5           # BasicTransformerBlock's LayerNorms

# Config keys whose effect we do not implement: the only values we accept (diffusers'
# defaults, or values that mean the same graph). Anything else is a different model.
FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    "attention_type": ("default",),
    "cross_attention_norm": (None,),
}
# Keys that change nothing at inference (or only matter with a key FIXED above).
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
           "sample_size", "dropout", "addition_embed_type_num_heads"}
USED = {"in_channels", "out_channels", "center_input_sample", "flip_sin_to_cos", "freq_shift",
        "down_block_types", "up_block_types", "only_cross_attention", "block_out_channels",
        "layers_per_block", "downsample_padding", "mid_block_scale_factor", "norm_num_groups",
        "norm_eps", "cross_attention_dim", "transformer_layers_per_block",
        "attention_head_dim", "num_attention_heads", "use_linear_projection",
        "upcast_attention", "conv_in_kernel", "conv_out_kernel"}


def _group_norm(groups: int, eps: float, dtype, name: str) -> nn.GroupNorm:
    # Two-pass variance like torch: the one-pass E[x^2]-E[x]^2 loses digits on large means.
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False,
                        name=name)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1,
          padding: Optional[int] = None) -> nn.Conv:
    pad = (kernel - 1) // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
    """diffusers' `get_timestep_embedding`, in float32 in the same order of operations, so the
    embedding of t = 999 matches to float32 rounding."""
    half = dim // 2
    exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
                / (half - freq_shift))
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source rows of torch's `interpolate(mode="nearest")`: floor(i * in/out) in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    idx = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int32)
    return np.minimum(idx, size_in - 1)


def upsample_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC nearest-neighbour resize to `size`; the common 2x case is a broadcast, not a
    gather."""
    b, h, w, c = x.shape
    if tuple(size) == (2 * h, 2 * w):
        return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
            b, 2 * h, 2 * w, c)
    x = jnp.take(x, _nearest_index(h, size[0]), axis=1)
    return jnp.take(x, _nearest_index(w, size[1]), axis=2)


class ResnetBlock(nn.Module):
    """ResnetBlock2D (time_embedding_norm "default"): the time embedding is added between the
    two convolutions; a 1x1 `conv_shortcut` when the channel count changes."""
    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + t[:, None, None, :]
        h = nn.silu(_group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Attention(nn.Module):
    """diffusers' `Attention` as SD uses it: q/k/v without bias, `to_out_0` with bias.

    Projections are reshaped straight to [B, T, heads, head_dim] (torch splits the inner dim
    head-major the same way). `upcast` runs the attention in float32 (SD 2.x's
    `upcast_attention`, against float16 overflow in the logits)."""
    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        context = x if context is None else context
        b, t, dim = x.shape
        inner = self.heads * self.head_dim

        def project(name, source):
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(source)
            return y.reshape(b, source.shape[1], self.heads, self.head_dim)

        q, k, v = project("to_q", x), project("to_k", context), project("to_v", context)
        if self.upcast:
            q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        out = attend(q, k, v, self.attention).astype(self.dtype).reshape(b, t, inner)
        return nn.Dense(dim, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """One projection to 2x the width, split into value and gate; exact (erf) GELU like torch's
    default."""
    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2,
                                axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """net = [GEGLU, Dropout, Linear]: `net_0/proj` and `net_2` (4x width)."""
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(dim, dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """BasicTransformerBlock: pre-LayerNorm self-attention, cross-attention, GEGLU MLP."""
    heads: int
    head_dim: int
    upcast: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, use_fast_variance=False,
                            name=name)

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        attn = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast,
                    dtype=self.dtype, attention=self.attention)
        x = x + Attention(**attn, name="attn1")(self._norm("norm1")(x))
        x = x + Attention(**attn, name="attn2")(self._norm("norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(self._norm("norm3")(x))


class Transformer2D(nn.Module):
    """Transformer2DModel on continuous input: GroupNorm, proj_in (1x1 conv, or Linear for
    SD 2.x's `use_linear_projection`), transformer blocks over the H*W tokens, proj_out, plus
    the input. NHWC -> [B, H*W, C] is torch's permute(0, 2, 3, 1).reshape: the same token
    order."""
    heads: int
    head_dim: int
    layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = _group_norm(self.groups, TRANSFORMER_NORM_EPS, self.dtype, "norm")(x)
        if self.use_linear_projection:
            y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
        else:
            y = _conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
        for i in range(self.layers):
            y = TransformerBlock(self.heads, self.head_dim, self.upcast, self.dtype,
                                 self.attention, name=f"transformer_blocks_{i}")(y, context)
        if self.use_linear_projection:
            y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
        else:
            y = _conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
        return y + x


class Downsample(nn.Module):
    """Downsample2D with a conv: stride 2, symmetric `padding`; padding 0 means diffusers' pad
    of one row/column at the bottom/right, then a valid conv."""
    channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample(nn.Module):
    """Upsample2D with a conv: nearest resize to `size` (2x, or the skip's size when the latent
    is not a multiple of the UNet's factor, like diffusers' `upsample_size`), then a 3x3 conv."""
    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        return _conv(self.channels, 3, self.dtype, "conv")(upsample_nearest(x, size))


class _BlockOptions(nn.Module):
    """Fields every down/mid/up block shares."""
    out_channels: int
    layers: int = 1
    cross_attention: bool = True
    heads: int = 8
    transformer_layers: int = 1
    groups: int = 32
    eps: float = 1e-5
    use_linear_projection: bool = False
    upcast: bool = False
    dtype: Any = jnp.float32
    attention: str = "xla"

    def resnet(self, name: str, scale: float = 1.0) -> ResnetBlock:
        return ResnetBlock(self.out_channels, self.groups, self.eps, scale, self.dtype,
                           name=name)

    def transformer(self, name: str) -> Transformer2D:
        return Transformer2D(self.heads, self.out_channels // self.heads,
                             self.transformer_layers, self.groups, self.use_linear_projection,
                             self.upcast, self.dtype, self.attention, name=name)


class DownBlock(_BlockOptions):
    """CrossAttnDownBlock2D / DownBlock2D: returns the output and every skip it leaves."""
    add_downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x, temb, context):
        skips = []
        for i in range(self.layers):
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, self.downsample_padding, self.dtype,
                           name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class MidBlock(_BlockOptions):
    """UNetMidBlock2DCrossAttn: resnet, then (attention, resnet) per layer."""
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context):
        x = self.resnet("resnets_0", self.output_scale_factor)(x, temb)
        for i in range(self.layers):
            x = self.transformer(f"attentions_{i}")(x, context)
            x = self.resnet(f"resnets_{i + 1}", self.output_scale_factor)(x, temb)
        return x


class UpBlock(_BlockOptions):
    """CrossAttnUpBlock2D / UpBlock2D: each resnet takes the last remaining skip concatenated
    after the channels (torch.cat([h, skip], dim=1))."""
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x, skips, temb, context, upsample_size=None):
        skips = list(skips)
        for i in range(self.layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = self.resnet(f"resnets_{i}")(x, temb)
            if self.cross_attention:
                x = self.transformer(f"attentions_{i}")(x, context)
        if self.add_upsample:
            size = upsample_size or (2 * x.shape[1], 2 * x.shape[2])
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x, size)
        return x


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2."""
    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class UNet(nn.Module):
    """UNet2DConditionModel: (noisy latents NHWC [B, H, W, C], timesteps [B] or scalar,
    text embeddings [B, L, D]) -> the noise prediction, NHWC, in `dtype`.

    Per-block tuples are in down-block order (diffusers' config order); the up path reverses
    them as diffusers does. Build it from a diffusers config with `unet_from_config`."""
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_cross_attention: tuple[bool, ...] = (True, True, True, False)
    up_cross_attention: tuple[bool, ...] = (False, True, True, True)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    heads: tuple[int, ...] = (8, 8, 8, 8)
    transformer_layers: tuple[int, ...] = (1, 1, 1, 1)
    in_channels: int = 4
    out_channels: int = 4
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: Any = jnp.float32
    attention: str = "xla"

    def _block(self, cls, i: int, name: str, **kwargs):
        return cls(out_channels=self.block_out_channels[i], heads=self.heads[i],
                   transformer_layers=self.transformer_layers[i], groups=self.norm_num_groups,
                   eps=self.norm_eps, use_linear_projection=self.use_linear_projection,
                   upcast=self.upcast_attention, dtype=self.dtype, attention=self.attention,
                   name=name, **kwargs)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array
                 ) -> jax.Array:
        n_blocks = len(self.block_out_channels)
        x = sample.astype(self.dtype)
        if self.center_input_sample:
            x = 2 * x - 1
        context = encoder_hidden_states.astype(self.dtype)
        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(t, self.block_out_channels[0], self.flip_sin_to_cos,
                                  self.freq_shift).astype(self.dtype)
        temb = TimestepEmbedding(4 * self.block_out_channels[0], self.dtype,
                                 name="time_embedding")(temb)

        x = _conv(self.block_out_channels[0], self.conv_in_kernel, self.dtype, "conv_in")(x)
        skips = [x]
        for i in range(n_blocks):
            x, block_skips = self._block(
                DownBlock, i, f"down_blocks_{i}", layers=self.layers_per_block[i],
                cross_attention=self.down_cross_attention[i],
                add_downsample=i < n_blocks - 1,
                downsample_padding=self.downsample_padding)(x, temb, context)
            skips += block_skips

        x = self._block(MidBlock, n_blocks - 1, "mid_block", layers=1,
                        output_scale_factor=self.mid_block_scale_factor)(x, temb, context)

        for j in range(n_blocks):
            i = n_blocks - 1 - j                       # the down block this one mirrors
            n = self.layers_per_block[i] + 1
            block_skips, skips = skips[-n:], skips[:-n]
            last = j == n_blocks - 1
            size = None if last else tuple(skips[-1].shape[1:3])
            x = self._block(UpBlock, i, f"up_blocks_{j}", layers=n,
                            cross_attention=self.up_cross_attention[j],
                            add_upsample=not last)(x, block_skips, temb, context, size)

        x = nn.silu(_group_norm(self.norm_num_groups, self.norm_eps, self.dtype,
                                "conv_norm_out")(x))
        return _conv(self.out_channels, self.conv_out_kernel, self.dtype, "conv_out")(x)


def _per_block(config: dict, key: str, n: int, where: str) -> tuple:
    """A config value that is one value for all blocks or a list with one per block."""
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{where}: {key}={value!r} has {len(value)} entries for {n} "
                             "blocks")
        return tuple(value)
    return (value,) * n


def _same(value, allowed) -> bool:
    """Equal and both bool or both not (so 0 is not False and True is not 1)."""
    return value == allowed and isinstance(value, bool) == isinstance(allowed, bool)


def _check_keys(config: dict, where: str) -> None:
    for key, value in config.items():
        if key in FIXED:
            if not any(_same(value, allowed) for allowed in FIXED[key]):
                raise ValueError(f"{where}: {key}={value!r} is not supported by our Flax UNet "
                                 f"(supported: {' / '.join(map(repr, FIXED[key]))})")
        elif key not in USED and key not in IGNORED and value not in (None, False):
            raise ValueError(f"{where}: unknown UNet config key {key}={value!r} (this UNet "
                             "implements SD 1.x / 2.x UNet2DConditionModel configs)")
    name = config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ValueError(f"{where}: _class_name={name!r} is not supported (only "
                         "UNet2DConditionModel)")


def _block_kinds(types, table: dict, key: str, where: str) -> tuple[bool, ...]:
    for t in types:
        if t not in table:
            raise ValueError(f"{where}: {key} has {t!r}; supported block types: "
                             f"{', '.join(table)}")
    return tuple(table[t] for t in types)


def _only_false(value, key: str, where: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(v is not False for v in values):
        raise ValueError(f"{where}: {key}={value!r} is not supported (only false)")


def unet_from_config(config: dict, dtype=jnp.float32, attention: str = "xla", *,
                     where: str = "unet config") -> UNet:
    """Our UNet for a diffusers `unet/config.json` dict; ValueError (naming `where`, the key and
    the value) for anything SD 1.x / 2.x UNets do not use.

    diffusers' legacy naming: with `num_attention_heads` unset, `attention_head_dim` is the
    number of heads per block; the head size is then channels // heads."""
    config = dict(config)
    _check_keys(config, where)
    defaults = dict(in_channels=4, out_channels=4, center_input_sample=False,
                    flip_sin_to_cos=True, freq_shift=0, only_cross_attention=False,
                    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    downsample_padding=1, mid_block_scale_factor=1, norm_num_groups=32,
                    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
                    attention_head_dim=8, num_attention_heads=None,
                    use_linear_projection=False, upcast_attention=False, conv_in_kernel=3,
                    conv_out_kernel=3,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    c = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    n = len(c["block_out_channels"])
    down = _block_kinds(c["down_block_types"], DOWN_BLOCKS, "down_block_types", where)
    up = _block_kinds(c["up_block_types"], UP_BLOCKS, "up_block_types", where)
    if len(down) != n or len(up) != n:
        raise ValueError(f"{where}: {n} block_out_channels but {len(down)} down_block_types "
                         f"and {len(up)} up_block_types")
    _only_false(c["only_cross_attention"], "only_cross_attention", where)
    if c["norm_num_groups"] is None:
        raise ValueError(f"{where}: norm_num_groups=None is not supported")
    heads = _per_block(c, "num_attention_heads" if c["num_attention_heads"] is not None
                       else "attention_head_dim", n, where)
    cross_dims = set(_per_block(c, "cross_attention_dim", n, where))
    if len(cross_dims) != 1:
        raise ValueError(f"{where}: cross_attention_dim={c['cross_attention_dim']!r}: blocks "
                         "with different text widths are not supported")
    transformer_layers = _per_block(c, "transformer_layers_per_block", n, where)
    if not all(isinstance(v, int) for v in transformer_layers):
        raise ValueError(f"{where}: transformer_layers_per_block="
                         f"{c['transformer_layers_per_block']!r} is not supported (ints only)")
    return UNet(
        block_out_channels=tuple(c["block_out_channels"]), down_cross_attention=down,
        up_cross_attention=up,
        layers_per_block=tuple(int(v) for v in _per_block(c, "layers_per_block", n, where)),
        heads=tuple(int(h) for h in heads), transformer_layers=transformer_layers,
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        cross_attention_dim=int(cross_dims.pop()), norm_num_groups=int(c["norm_num_groups"]),
        norm_eps=float(c["norm_eps"]), use_linear_projection=bool(c["use_linear_projection"]),
        upcast_attention=bool(c["upcast_attention"]),
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]),
        downsample_padding=int(c["downsample_padding"]),
        mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        center_input_sample=bool(c["center_input_sample"]),
        conv_in_kernel=int(c["conv_in_kernel"]), conv_out_kernel=int(c["conv_out_kernel"]),
        dtype=dtype, attention=attention)


def example_inputs(unet: UNet, batch: int = 1, size: Optional[int] = None,
                   tokens: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zero inputs of the right shapes (e.g. for `init` or `eval_shape`); the latent side
    defaults to the smallest multiple of the UNet's downsampling factor."""
    size = size or 2 ** (len(unet.block_out_channels) - 1)
    return (jnp.zeros((batch, size, size, unet.in_channels), jnp.float32),
            jnp.zeros((batch,), jnp.int32),
            jnp.zeros((batch, tokens, unet.cross_attention_dim), jnp.float32))


def load_unet(folder: str, dtype=jnp.float32, attention: str = "xla") -> tuple[UNet, dict]:
    """(module, params) from a diffusers `unet/` folder (config.json + safetensors or .bin);
    params are `dtype` jax arrays. KeyError names any weight the config does not explain."""
    config = weights.read_config(folder)
    unet = unet_from_config(config, dtype, attention,
                            where=os.path.join(folder, "config.json"))
    state, path = weights.read_state_dict(folder)
    shapes = weights.abstract_params(unet, *example_inputs(unet))
    params = weights.state_dict_to_params(state, shapes, where=path, dtype=dtype)
    del state          # the numpy params alone from here: SD's UNet is 3.4 GB in float32
    return unet, _to_device(params)


def _to_device(tree: dict) -> dict:
    """numpy -> jax arrays leaf by leaf, dropping each numpy leaf as it goes (peak memory one
    copy plus one leaf, not two copies)."""
    out = {}
    for key in list(tree):
        value = tree.pop(key)
        out[key] = _to_device(value) if isinstance(value, dict) else jnp.asarray(value)
    return out
