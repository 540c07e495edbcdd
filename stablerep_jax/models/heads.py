"""StableRep's projection head (reference `image_mlp`) with per-view-group synchronised BatchNorm.

The reference pushes each of the m view groups through the head separately, so every group is
normalised with its own batch statistics, and SyncBatchNorm makes those statistics the global
batch's. Here the head takes all groups at once as [G, n, D] and computes the statistics with
plain means over the n axis of the *global* array: under jit with n sharded over a mesh, XLA
inserts the all-reduce, so the result equals SyncBatchNorm across all devices.

Parameter map (torch `image_mlp.*` -> Flax, see `head_key_map`):
  layerK.{weight,bias}        -> layerK/{kernel (weight.T), bias}          K = 1, 2, 3
  bnK.{weight,bias}           -> bnK/{scale, bias}                         K = 1, 2
  bnK.{running_mean,running_var} -> batch_stats bnK/{mean, var}
  bnK.num_batches_tracked     -> (not used: momentum is fixed at 0.1)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from stablerep_jax.models.vit import KeyMap, linear_entries, torch_bias_init

Dtype = Any

# torch nn.Linear's default init (the reference leaves the head at it): weight
# kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias the same range.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class GroupBatchNorm(nn.Module):
    """BatchNorm1d over [G, n, F]: each of the G groups uses its own statistics over n rows.

    Training: normalise with the group's biased variance; update the running statistics like
    torch (momentum 0.1, unbiased variance), one group after the other in order, as G separate
    torch forward passes would. Eval: use the running statistics.
    """
    momentum: float = 0.1
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
        xf = x.astype(jnp.float32)
        if train:
            n = x.shape[1]
            mean = jnp.mean(xf, axis=1)                                   # [G, F]
            var = jnp.mean(jnp.square(xf - mean[:, None]), axis=1)        # biased, two-pass
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                m, v = ra_mean.value, ra_var.value
                for g in range(x.shape[0]):
                    m = (1.0 - self.momentum) * m + self.momentum * mean[g]
                    v = (1.0 - self.momentum) * v + self.momentum * unbiased[g]
                ra_mean.value, ra_var.value = m, v
            mean, var = mean[:, None], var[:, None]
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


class ProjectionHead(nn.Module):
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear, on [G, n, D] or [n, D] input.

    A 2-D input is one group. Returns [G, n, out_dim] (or [n, out_dim]).
    """
    mlp_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        squeeze = x.ndim == 2
        if squeeze:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"ProjectionHead expects [G, n, D] or [n, D], got {x.shape}")

        def dense(x, features, name):
            return nn.Dense(features, dtype=self.dtype, kernel_init=_torch_linear_init,
                            bias_init=torch_bias_init(x.shape[-1]), name=name)(x)

        x = dense(x, self.mlp_dim, "layer1")
        x = nn.relu(GroupBatchNorm(dtype=self.dtype, name="bn1")(x, train))
        x = dense(x, self.mlp_dim, "layer2")
        x = nn.relu(GroupBatchNorm(dtype=self.dtype, name="bn2")(x, train))
        x = dense(x, self.out_dim, "layer3")
        return x[0] if squeeze else x


def head_key_map(torch_prefix: str, flax_path: tuple[str, ...]) -> KeyMap:
    """The map in this module's docstring, for a head at `torch_prefix` / `flax_path`."""
    entries: KeyMap = {}
    for k in (1, 2, 3):
        entries.update(linear_entries(f"{torch_prefix}.layer{k}", flax_path + (f"layer{k}",)))
    for k in (1, 2):
        t, f = f"{torch_prefix}.bn{k}", flax_path + (f"bn{k}",)
        entries[f"{t}.weight"] = ("params", f + ("scale",), None)
        entries[f"{t}.bias"] = ("params", f + ("bias",), None)
        entries[f"{t}.running_mean"] = ("batch_stats", f + ("mean",), None)
        entries[f"{t}.running_var"] = ("batch_stats", f + ("var",), None)
    return entries
