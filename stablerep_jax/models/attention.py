"""One attention entry point for every model: `jax.nn.dot_product_attention` in the
[batch, tokens, heads, head_dim] layout, with the implementation chosen by a config key.

- "xla": JAX's XLA path (every platform; the logits are materialised).
- "cudnn": cuDNN's fused (flash) kernel on NVIDIA GPUs, where its limits allow: bfloat16 or
  float16, head_dim a multiple of 8 and at most 128. A call outside them (e.g. the SD VAE's
  single 512-wide head) runs on the XLA path. cuDNN has no backward pass for odd sequence
  lengths (JAX raises "Unsupported sequence length"), so `pad_to` pads queries and keys to a
  multiple and hides the padded keys with `key_value_seq_lengths` (the kernel's own mask).
- "auto": the implementation measured fastest on the platform (`MEASURED_BEST`).
"""
from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "xla", "cudnn")

# platform -> the implementation `auto` resolves to. GPU: cuDNN's fused kernel, measured on an
# NVIDIA H200 (benchmarks/RESULTS.md, 2026-12-04): SD-v1.5 sampling 4.58 vs 2.46 images/s with
# XLA's, the ViT-B/16 train step 2,988 vs 2,295. TPU and CPU have one implementation behind
# jax.nn.dot_product_attention: XLA's.
MEASURED_BEST = {"gpu": "cudnn", "cuda": "cudnn", "rocm": "xla", "tpu": "xla", "cpu": "xla"}


def resolve(implementation: str, platform: Optional[str] = None) -> str:
    """"auto" -> the measured best for `platform` (default: JAX's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention={implementation!r}: choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    return MEASURED_BEST.get(platform or default_platform(), "xla")


def default_platform() -> str:
    """The platform `auto` resolves for: JAX's default backend ("cpu", "gpu", "tpu")."""
    return jax.default_backend()


def cudnn_limits(head_dim: int, dtype) -> Optional[str]:
    """None when cuDNN's fused kernel takes this head size and dtype, else the reason."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"dtype {jnp.dtype(dtype).name} (cuDNN's fused kernel needs bfloat16/float16)"
    if head_dim % 8 or head_dim > 128:
        return f"head_dim {head_dim} (cuDNN's fused kernel needs a multiple of 8, <= 128)"
    return None


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla", *,
           mask: Optional[jax.Array] = None, is_causal: bool = False,
           pad_to: int = 1) -> jax.Array:
    """Scaled dot-product attention; q [N, Lq, H, d], k/v [N, Lk, H, d] -> [N, Lq, H, d].

    `implementation` "cudnn" runs cuDNN's kernel where `cudnn_limits` allow and there is no
    `mask` (broadcastable to [N, H, Lq, Lk], True = attend), XLA otherwise. `is_causal` hides
    the keys after each query (the kernels' own causal mask, on either implementation).
    `pad_to` > 1 pads both lengths up to a multiple of it with the padded keys masked by the
    kernel's `key_value_seq_lengths` (on either implementation, so CPU tests run the same
    padding); padded keys sit after every real query, so a causal mask hides them too."""
    if isinstance(pad_to, bool) or not isinstance(pad_to, numbers.Integral) or pad_to < 1:
        raise ValueError(f"pad_to={pad_to!r}: must be an integer >= 1")
    implementation = resolve(implementation)
    use_cudnn = (implementation == "cudnn" and mask is None
                 and cudnn_limits(q.shape[-1], q.dtype) is None)
    kind = "cudnn" if use_cudnn else "xla"
    lq, lk = q.shape[1], k.shape[1]
    pq, pk = -(-lq // pad_to) * pad_to, -(-lk // pad_to) * pad_to
    if mask is not None or (pq, pk) == (lq, lk):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal,
                                            implementation=kind)
    n = q.shape[0]
    out = jax.nn.dot_product_attention(
        _pad_tokens(q, pq), _pad_tokens(k, pk), _pad_tokens(v, pk), is_causal=is_causal,
        query_seq_lengths=np.full((n,), lq, np.int32),     # constants, not traced values
        key_value_seq_lengths=np.full((n,), lk, np.int32), implementation=kind)
    return out[:, :lq]
