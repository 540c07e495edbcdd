"""The Stable Diffusion VAE decoder (diffusers' `AutoencoderKL` decode path) in Flax.

Latents NHWC [B, h, w, C] (already divided by the scaling factor) -> images NHWC [B, 8h, 8w, 3]
in about [-1, 1]: `post_quant_conv` (1x1), then the decoder: `conv_in`, a mid block (ResNet,
single-head self-attention, ResNet), up blocks of `layers_per_block + 1` ResNets each with a
nearest-neighbour 2x upsampler except the last, GroupNorm, SiLU, `conv_out`.

Modules are named after diffusers' PyTorch modules, so `weights.state_dict_to_params` maps the
folder's `vae/` weights by rule; the encoder's weights are read and ignored. GroupNorm
statistics are float32 whatever the compute dtype; attention logits and softmax are float32
(`jax.nn.dot_product_attention`).
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from stablerep_jax.generation.sd import weights
from stablerep_jax.models.attention import attend

Dtype = Any
EPS = 1e-6              # every GroupNorm of diffusers' VAE decoder
DEFAULT_SCALING_FACTOR = 0.18215

# Encoder-side weights a full AutoencoderKL file holds and the decoder does not use.
_IGNORE = (r"^encoder\.", r"^quant_conv\.")
# Attention layer names of diffusers < 0.14 (and checkpoints converted then) -> today's.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(
    r"^(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_WEIGHT = re.compile(r"\.attentions\.\d+\.to_(q|k|v|out\.0)\.weight$")


class GroupNorm(nn.Module):
    """torch's GroupNorm on NHWC; statistics and the affine map in float32, so bfloat16
    activations do not lose the mean of large feature maps."""
    num_groups: int
    epsilon: float = EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.dtype)
        h = x.astype(jnp.float32).reshape(*x.shape[:-1], self.num_groups, -1)
        axes = tuple(range(1, h.ndim - 2)) + (h.ndim - 1,)
        mean = h.mean(axes, keepdims=True)
        var = jnp.square(h - mean).mean(axes, keepdims=True)
        h = ((h - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        return (h * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _conv(features: int, kernel: int, dtype: Dtype, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                   param_dtype=dtype, name=name)


def _dense(features: int, dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, param_dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding (the VAE has none)."""
    out_channels: int
    groups: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm1")(x))
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(h)
        h = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="norm2")(h))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class SpatialSelfAttention(nn.Module):
    """The mid block's attention: GroupNorm, one head as wide as the channels over all h*w
    positions, output projection, residual (diffusers' `Attention` with a group norm)."""
    groups: int
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        t = GroupNorm(self.groups, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, 1, c)
        q, k, v = (_dense(c, self.dtype, name)(t) for name in ("to_q", "to_k", "to_v"))
        out = attend(q, k, v, self.attention).reshape(b, h * w, c)
        return x + _dense(c, self.dtype, "to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """ResNet, (optional) attention, ResNet at the lowest resolution."""
    channels: int
    groups: int
    add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.attention, self.dtype,
                                     name="attentions_0")(x)
        return ResnetBlock(self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution (diffusers' Upsample2D with use_conv)."""
    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Decoder(nn.Module):
    """diffusers' `Decoder`: up blocks run over `block_out_channels` reversed (widest first)."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int = 3
    groups: int = 32
    mid_block_add_attention: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        widths = tuple(reversed(self.block_out_channels))
        x = _conv(widths[0], 3, self.dtype, "conv_in")(z)
        x = MidBlock(widths[0], self.groups, self.mid_block_add_attention, self.attention,
                     self.dtype, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = UpDecoderBlock(width, self.layers_per_block + 1, self.groups,
                               add_upsample=i < len(widths) - 1, dtype=self.dtype,
                               name=f"up_blocks_{i}")(x)
        x = nn.silu(GroupNorm(self.groups, dtype=self.dtype, name="conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


class VaeDecoder(nn.Module):
    """Latents NHWC (divided by the scaling factor) -> images NHWC in about [-1, 1]."""
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int = 4
    out_channels: int = 3
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_post_quant_conv: bool = True
    attention: str = "xla"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.dtype)
        if self.use_post_quant_conv:
            z = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv")(z)
        return Decoder(tuple(self.block_out_channels), self.layers_per_block, self.out_channels,
                       self.norm_num_groups, self.mid_block_add_attention, self.attention,
                       self.dtype, name="decoder")(z)


def _unsupported(folder: str, key: str, value, why: str) -> ValueError:
    return ValueError(f"{folder}/config.json: {key}={value!r} is not supported ({why})")


def _check_config(config: dict, folder: str) -> None:
    """Refuses configs whose decoder differs from the one built here, naming the key."""
    for i, kind in enumerate(config.get("up_block_types", ())):
        if kind != "UpDecoderBlock2D":
            raise _unsupported(folder, f"up_block_types[{i}]", kind, "only UpDecoderBlock2D")
    if len(config.get("up_block_types", config["block_out_channels"])) != len(
            config["block_out_channels"]):
        raise _unsupported(folder, "up_block_types", config["up_block_types"],
                           "needs one per block_out_channels entry")
    if config.get("act_fn", "silu") != "silu":
        raise _unsupported(folder, "act_fn", config["act_fn"], "only silu")
    for key in ("shift_factor", "latents_mean", "latents_std"):
        if config.get(key) not in (None, 0, 0.0):
            raise _unsupported(folder, key, config[key],
                               "latent normalisation beyond scaling_factor")
    groups = int(config.get("norm_num_groups", 32))
    for width in config["block_out_channels"]:
        if width % groups:
            raise _unsupported(folder, "norm_num_groups", groups,
                               f"block_out_channels {config['block_out_channels']} are not "
                               "all divisible by it")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise _unsupported(folder, "_class_name", config["_class_name"], "only AutoencoderKL")


def build_vae_decoder(config: dict, dtype=jnp.float32, attention: str = "xla",
                      folder: str = "<config>") -> VaeDecoder:
    """The decoder a diffusers `vae/config.json` describes."""
    for key in ("block_out_channels", "layers_per_block"):
        if key not in config:
            raise ValueError(f"{folder}/config.json: no {key}")
    _check_config(config, folder)
    return VaeDecoder(
        block_out_channels=tuple(int(c) for c in config["block_out_channels"]),
        layers_per_block=int(config["layers_per_block"]),
        latent_channels=int(config.get("latent_channels", 4)),
        out_channels=int(config.get("out_channels", 3)),
        norm_num_groups=int(config.get("norm_num_groups", 32)),
        mid_block_add_attention=bool(config.get("mid_block_add_attention", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
        attention=attention, dtype=dtype)


def _modern_attention_keys(state_dict: dict) -> dict:
    """Renames the old attention keys (`attentions.0.query.weight` ...) whole-segment, so no
    other key that happens to contain `.key.` changes; squeezes 1x1-conv attention weights
    [C, C, 1, 1] (from original-checkpoint conversions) to linear [C, C]."""
    out = {}
    for key, value in state_dict.items():
        m = _OLD_ATTENTION_KEY.match(key)
        if m:
            key = f"{m.group(1)}{_OLD_ATTENTION[m.group(2)]}.{m.group(3)}"
        if _ATTENTION_WEIGHT.search(key) and np.ndim(value) == 4 and value.shape[2:] == (1, 1):
            value = value[:, :, 0, 0]
        out[key] = value
    return out


def load_vae_decoder(folder: str, dtype=jnp.float32, attention: str = "xla"
                     ) -> tuple[VaeDecoder, dict, float]:
    """(module, params in `dtype`, scaling_factor) from a diffusers `vae/` folder.

    Call `module.apply({"params": params}, latents / scaling_factor)`. A config with
    `force_upcast` asked for float16 runs in float32, as diffusers upcasts such VAEs (float16
    overflows in SDXL's); bfloat16 has float32's range and is kept."""
    config = weights.read_config(folder)
    if config.get("force_upcast", False) and jnp.dtype(dtype) == jnp.dtype(jnp.float16):
        dtype = jnp.float32
    module = build_vae_decoder(config, dtype=dtype, attention=attention, folder=folder)
    channels = module.latent_channels
    abstract = weights.abstract_params(module, jnp.zeros((1, 8, 8, channels), dtype))
    state_dict, path = weights.read_state_dict(folder)
    params = weights.state_dict_to_params(_modern_attention_keys(state_dict), abstract,
                                          where=path, dtype=dtype, ignore=_IGNORE)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    scaling = config.get("scaling_factor")
    return module, params, float(DEFAULT_SCALING_FACTOR if scaling is None else scaling)
