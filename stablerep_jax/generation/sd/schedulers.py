"""Pure-JAX DDIM, PNDM (PLMS) and DPM-Solver++ schedulers for Stable Diffusion sampling.

diffusers' Flax schedulers are gone in diffusers 0.40, so we keep our own. Each scheduler is a
frozen pytree of host-precomputed per-step tables, indexed by the loop index `i`: everything
that depends only on the step (timesteps, alphas, solver order, which past outputs to mix) is
decided on the host in float64 and stored as float32, so `step` is a few fused multiply-adds
that run unchanged with a traced `i` inside `lax.fori_loop` under `jit` / `shard_map`.

They reproduce diffusers' PyTorch schedulers (`DDIMScheduler` with eta 0, `PNDMScheduler` with
`skip_prk_steps`, `DPMSolverMultistepScheduler` with its defaults) step for step, which is what
the PyTorch StableDiffusionPipeline runs (tests/test_sd_schedulers.py checks this).

A sampler loop:

    sched = make_scheduler("pndm", scheduler_config, num_inference_steps)
    x = latents * sched.init_noise_sigma
    state = sched.init_state(x)
    def body(i, carry):
        x, state = carry
        t = sched.timesteps[i]                      # the UNet's timestep for this call
        eps = unet(sched.scale_model_input(x, i), t)   # + classifier-free guidance
        return sched.step(state, i, eps, x)
    x, _ = lax.fori_loop(0, sched.num_steps, body, (x, state))

`num_steps` is the number of model calls, which is not always `num_inference_steps`: PNDM's
PLMS warm-up evaluates one timestep twice (num_inference_steps + 1 calls when it is > 1).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("ddim", "pndm", "dpm-solver")
SPACINGS = ("leading", "linspace", "trailing")
PREDICTIONS = ("epsilon", "v_prediction")


def _pytree(cls):
    """Tables are pytree leaves (so a scheduler can be a jit argument); the rest is static."""
    fields = [f.name for f in dataclasses.fields(cls)]
    data = [n for n in fields if n not in ("init_noise_sigma", "prediction_type")]
    return jax.tree_util.register_dataclass(
        cls, data_fields=data, meta_fields=[n for n in fields if n not in data])


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _x0(prediction, c, x, m):
    """The predicted clean sample from coefficients (c0, c1) (see `_to_x0_eps`)."""
    return (x + c[1] * m) / c[0] if prediction == "epsilon" else c[0] * x + c[1] * m


class _Base:
    """What every scheduler offers the sampling loop."""
    timesteps: np.ndarray        # int32 [num_steps]: the model's timestep at loop index i
    init_noise_sigma: float

    @property
    def num_steps(self) -> int:
        """How many model calls (loop iterations) the schedule takes."""
        return int(self.timesteps.shape[0])

    def scale_model_input(self, sample, i):
        """The model's input at step i (identity for these schedulers; kept for the loop)."""
        del i
        return sample


@_pytree
@dataclasses.dataclass(frozen=True)
class DDIM(_Base):
    """Deterministic DDIM (eta 0): predict x0 and noise, then jump to the previous alpha."""
    timesteps: np.ndarray
    coef: np.ndarray             # float32 [num_steps, 6]: x0 from c0, c1 (`_x0`),
    init_noise_sigma: float      #   eps = c2 x + c3 m, prev = c4 x0 + c5 eps
    prediction_type: str

    def init_state(self, latents):
        del latents
        return ()

    def step(self, state, i, model_output, sample):
        c = _f32(self.coef)[i]
        x, m = _f32(sample), _f32(model_output)
        x0 = _x0(self.prediction_type, c, x, m)
        eps = c[2] * x + c[3] * m
        return c[4] * x0 + c[5] * eps, state


@_pytree
@dataclasses.dataclass(frozen=True)
class PNDM(_Base):
    """PNDM's pseudo linear multistep (PLMS) mode, as with `skip_prk_steps` (SD's configs).

    Step 0 takes an Euler step; step 1 (the same timestep again) redoes it from the same start
    with the mean of both model outputs; later steps mix the current output with up to three
    stored ones (Adams-Bashforth weights 2, 3, 4). The state is that ring of past outputs plus
    the starting sample step 1 returns to."""
    timesteps: np.ndarray
    mix: np.ndarray              # float32 [num_steps, 4]: weights of (output, ring[0..2])
    coef: np.ndarray             # float32 [num_steps, 4]: eps = c0 x + c1 e; prev = c2 x + c3 eps
    store: np.ndarray            # bool [num_steps]: push the output onto the ring
    redo: np.ndarray             # bool [num_steps]: restart from the sample of step 0
    init_noise_sigma: float
    prediction_type: str

    def init_state(self, latents):
        zeros = jnp.zeros_like(_f32(latents))
        return {"ring": jnp.stack([zeros] * 3), "start": zeros}

    def step(self, state, i, model_output, sample):
        w, c = _f32(self.mix)[i], _f32(self.coef)[i]
        m, ring = _f32(model_output), state["ring"]
        combined = w[0] * m + w[1] * ring[0] + w[2] * ring[1] + w[3] * ring[2]
        x = jnp.where(jnp.asarray(self.redo)[i], state["start"], _f32(sample))
        eps = c[0] * x + c[1] * combined if self.prediction_type == "v_prediction" else combined
        prev = c[2] * x + c[3] * eps
        ring = jnp.where(jnp.asarray(self.store)[i], jnp.concatenate([m[None], ring[:2]]), ring)
        start = jnp.where(i == 0, x, state["start"])
        return prev, {"ring": ring, "start": start}


@_pytree
@dataclasses.dataclass(frozen=True)
class DPMSolver(_Base):
    """Multistep DPM-Solver++ (order 2, midpoint) on the model's x0 predictions. First order
    where diffusers drops to it: the first step (no history), and the last when it ends at
    sigma 0 or the schedule is under 15 steps. The state is the previous x0 prediction."""
    timesteps: np.ndarray
    coef: np.ndarray             # float32 [num_steps, 5]: x0 from c0, c1 (`_x0`);
    init_noise_sigma: float      #   prev = c2 x + c3 x0 + c4 (x0 - previous x0)
    prediction_type: str

    def init_state(self, latents):
        return {"x0": jnp.zeros_like(_f32(latents))}

    def step(self, state, i, model_output, sample):
        c = _f32(self.coef)[i]
        x, m = _f32(sample), _f32(model_output)
        x0 = _x0(self.prediction_type, c, x, m)
        prev = c[2] * x + c[3] * x0 + c[4] * (x0 - state["x0"])
        return prev, {"x0": x0}


Scheduler = DDIM | PNDM | DPMSolver

# ---------------------------------------------------------------------------------------------
# Host-side tables


def _get(config: Mapping, key: str, default):
    value = config.get(key)
    return default if value is None else value


def _require(config: Mapping, key: str, default, allowed) -> object:
    value = _get(config, key, default)
    if value not in allowed:
        raise ValueError(f"scheduler config {key}={value!r} is not supported (use one of "
                         f"{tuple(allowed)})")
    return value


def _alphas_cumprod(config: Mapping) -> np.ndarray:
    """float64 [num_train_timesteps]: the training noise schedule's cumulative alphas."""
    n = int(_get(config, "num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
        if betas.shape != (n,):
            raise ValueError(f"scheduler config trained_betas has shape {betas.shape}, "
                             f"expected ({n},)")
    else:
        schedule = _require(config, "beta_schedule", "linear", ("linear", "scaled_linear"))
        start, end = float(_get(config, "beta_start", 1e-4)), float(_get(config, "beta_end", 0.02))
        if schedule == "linear":
            betas = np.linspace(start, end, n)
        else:
            betas = np.linspace(start ** 0.5, end ** 0.5, n) ** 2
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler config rescale_betas_zero_snr=True is not supported")
    if config.get("thresholding"):
        raise ValueError("scheduler config thresholding=True is not supported")
    return np.cumprod(1.0 - betas)


def _spaced(spacing: str, num_train: int, n: int, offset: int) -> np.ndarray:
    """n descending training timesteps, spaced as diffusers' DDIM / PNDM space them."""
    if spacing == "leading":
        return np.arange(n)[::-1] * (num_train // n) + offset
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    return np.round(np.arange(num_train, 0, -num_train / n)).astype(np.int64) - 1


def _ab(alphas_cumprod: np.ndarray, t: int, final: float) -> float:
    """alpha-bar at timestep t; below 0 the schedule's end (the jump to the clean sample)."""
    _check_range([t], len(alphas_cumprod))
    return float(alphas_cumprod[t]) if t >= 0 else final


def _check_range(timesteps, num_train: int) -> None:
    if max(timesteps) >= num_train:
        raise ValueError(f"timestep {max(timesteps)} lies past the model's num_train_timesteps "
                         f"{num_train}: use fewer num_inference_steps")


def _to_x0_eps(prediction: str, a: float) -> tuple[float, float, float, float]:
    """(c0, c1, c2, c3) for alpha-bar a: eps = c2 x + c3 m and x0 = c0 x + c1 m, or for epsilon
    prediction x0 = (x + c1 m) / c0, the form diffusers rounds in."""
    sa, sb = math.sqrt(a), math.sqrt(1 - a)
    if prediction == "epsilon":
        return sa, -sb, 0.0, 1.0
    return sa, -sb, sb, sa


def _ddim(config, n, prediction, alphas_cumprod, final):
    num_train = len(alphas_cumprod)
    spacing = _require(config, "timestep_spacing", "leading", SPACINGS)
    timesteps = _spaced(spacing, num_train, n, config["steps_offset"])
    rows = []
    for t in timesteps:
        a, a_prev = _ab(alphas_cumprod, t, 1.0), _ab(alphas_cumprod, t - num_train // n, final)
        rows.append(_to_x0_eps(prediction, a) + (math.sqrt(a_prev), math.sqrt(1 - a_prev)))
    return DDIM(timesteps.astype(np.int32), np.asarray(rows, np.float32), 1.0, prediction)


_PLMS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
         4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _pndm(config, n, prediction, alphas_cumprod, final):
    if not _get(config, "skip_prk_steps", False):
        raise ValueError("scheduler config skip_prk_steps=False is not supported (only PNDM's "
                         "PLMS mode, as in Stable Diffusion's configs)")
    num_train = len(alphas_cumprod)
    ratio = num_train // n
    spacing = _require(config, "timestep_spacing", "leading", SPACINGS)
    ts = list(_spaced(spacing, num_train, n, config["steps_offset"]))
    timesteps = ts[:1] + ts[1:2] + ts[1:]       # the second timestep twice (once if n == 1)
    mix, coef, store, redo = [], [], [], []
    for i, t in enumerate(timesteps):
        if i == 1:      # redo step 0 towards timestep t with the mean output of both calls
            weights, (t, prev) = (0.5, 0.5), (t + ratio, t)
        else:
            stored = min(max(i - 1, 0), 3)    # outputs on the ring (step 1's is never stored)
            weights, prev = _PLMS[stored + 1], t - ratio
        a, a_prev = _ab(alphas_cumprod, t, 1.0), _ab(alphas_cumprod, prev, final)
        denom = a * math.sqrt(1 - a_prev) + math.sqrt(a * (1 - a) * a_prev)
        _, _, c0, c1 = _to_x0_eps("v_prediction", a)
        coef.append((c0, c1, math.sqrt(a_prev / a), -(a_prev - a) / denom))
        mix.append(weights + (0.0,) * (4 - len(weights)))
        store.append(i != 1)
        redo.append(i == 1)
    return PNDM(np.asarray(timesteps, np.int32), np.asarray(mix, np.float32),
                np.asarray(coef, np.float32), np.asarray(store), np.asarray(redo), 1.0,
                prediction)


def _dpm_timesteps(config, n, alphas_cumprod) -> np.ndarray:
    num_train = len(alphas_cumprod)
    # diffusers' default spacing for this class differs from DDIM's and PNDM's.
    spacing = _require(config, "timestep_spacing", "linspace", SPACINGS)
    lambdas = 0.5 * np.log(alphas_cumprod / (1 - alphas_cumprod))
    clip = float(_get(config, "lambda_min_clipped", -math.inf))
    last = num_train - int(np.searchsorted(lambdas[::-1], clip))
    if spacing == "leading":
        ts = np.arange(n + 1)[::-1] * (last // (n + 1)) + config["steps_offset"]
    elif spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1].astype(np.int64)
    else:
        return np.arange(last, 0, -num_train / n).round().astype(np.int64) - 1
    return ts[:-1]


def _dpm(config, n, prediction, alphas_cumprod, final):
    del final
    for key, default, allowed in (("algorithm_type", "dpmsolver++", ("dpmsolver++",)),
                                  ("solver_order", 2, (2,)),
                                  ("solver_type", "midpoint", ("midpoint",)),
                                  ("variance_type", None, (None,)),
                                  ("final_sigmas_type", "zero", ("zero", "sigma_min"))):
        _require(config, key, default, allowed)
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
        if config.get(key):
            raise ValueError(f"scheduler config {key}=True is not supported")
    timesteps = _dpm_timesteps(config, n, alphas_cumprod)
    _check_range(timesteps, len(alphas_cumprod))
    steps = len(timesteps)
    # Noise levels sigma = sqrt((1 - a) / a) of the timesteps, then the end: 0 or the smallest.
    sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)
    final_sigma = 0.0 if config.get("final_sigmas_type", "zero") in (None, "zero") else sigmas[0]
    sigmas = np.append(sigmas[timesteps], final_sigma)
    alpha = 1 / np.sqrt(sigmas ** 2 + 1)
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigmas * alpha)        # +inf at sigma 0
    last_first_order = (_get(config, "euler_at_final", False) or final_sigma == 0
                        or (_get(config, "lower_order_final", True) and steps < 15))
    rows = []
    for i in range(steps):
        a_s, a_t = alpha[i], alpha[i + 1]
        s, t = sigmas[i] * a_s, sigmas[i + 1] * a_t       # the noise's scale in the sample
        # x_t = (sigma_t / sigma_s) x - alpha_t (e^-h - 1) D0 - 0.5 alpha_t (e^-h - 1) D1
        h = lam[i + 1] - lam[i]
        b = -a_t * np.expm1(-h) if np.isfinite(h) else a_t
        second = i > 0 and not (i == steps - 1 and last_first_order)
        d1 = 0.5 * b * h / (lam[i] - lam[i - 1]) if second else 0.0   # 0.5 b / r0
        c0, c1, _, _ = _to_x0_eps(prediction, a_s ** 2)
        rows.append((c0, c1, t / s, b, d1))
    return DPMSolver(timesteps.astype(np.int32), np.asarray(rows, np.float32), 1.0, prediction)


def make_scheduler(name: str, config: Mapping, num_inference_steps: int) -> Scheduler:
    """The named scheduler ("ddim", "pndm", "dpm-solver") for a model's scheduler config
    (`scheduler/scheduler_config.json`), set to `num_inference_steps`.

    As diffusers' PyTorch StableDiffusionPipeline does for SD v1 configs (the reference images
    came from it), `steps_offset` is forced to 1 and the predicted sample is never clipped.
    Config keys a scheduler does not know are ignored; values it cannot honour raise."""
    builders = {"ddim": _ddim, "pndm": _pndm, "dpm-solver": _dpm}
    if name not in builders:
        raise ValueError(f"scheduler {name!r}: choose one of {NAMES}")
    config = dict(config, steps_offset=1, clip_sample=False)
    alphas_cumprod = _alphas_cumprod(config)
    num_train = len(alphas_cumprod)
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(f"num_inference_steps={num_inference_steps}: must be in "
                         f"[1, {num_train}] (the model's num_train_timesteps)")
    prediction = _require(config, "prediction_type", "epsilon", PREDICTIONS)
    final = 1.0 if _get(config, "set_alpha_to_one", name == "ddim") else float(alphas_cumprod[0])
    return builders[name](config, num_inference_steps, prediction, alphas_cumprod, final)
