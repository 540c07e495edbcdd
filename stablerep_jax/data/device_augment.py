"""The strong recipe's colour stage on the accelerator, inside the jitted train step: the
project's only implementation of it.

The host (`augment.prepare_view`) ships each view cropped, resized and flipped as uint8, with
the colour stage's parameters drawn from the view's stateless key (`augment.ViewDraws`; the
layout is `recipe.P_*`). Here a pure JAX function applies them to the whole batch:
ColorJitter (p=0.8, the four adjustments in the drawn order), grayscale (p=0.2), Gaussian blur
(p=0.5), then ImageNet mean/std, in float32, cast to `data.image_dtype` at the end. Resume stays
exact: the parameters are a function of the keys.

Definitions are torchvision's tensor ones: brightness scales;
contrast blends with the mean luma; saturation blends with the luma image; hue shifts H in
torchvision's RGB <-> HSV; each result clipped to [0, 1]. Luma weights are PIL's (0.299, 0.587,
0.114). The blur is a sampled Gaussian reaching ceil(3 sigma) pixels (1 to 6), mirrored at the
edges (reflect), applied separably as two matrix products. Dots run at HIGHEST precision
(float32; TPUs would otherwise take one bfloat16 pass).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from stablerep_jax.data import recipe   # not `augment`: that one needs TensorFlow

LUMA = recipe.LUMA
MAX_RADIUS = int(math.ceil(3.0 * recipe.BLUR_SIGMA[1]))


HIGHEST = jax.lax.Precision.HIGHEST     # float32 dots (TPUs default to one bfloat16 pass)


def grayscale(image: jax.Array) -> jax.Array:
    """Luma [..., H, W] of float RGB [..., H, W, 3]."""
    return image[..., 0] * LUMA[0] + image[..., 1] * LUMA[1] + image[..., 2] * LUMA[2]


def to_grayscale_rgb(image: jax.Array) -> jax.Array:
    return jnp.repeat(grayscale(image)[..., None], 3, axis=-1)


def mean_luma(image: jax.Array) -> jax.Array:
    """The mean luma of one image [H, W, 3]."""
    return jnp.mean(grayscale(image))


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
    """Blend with the image's mean luma (one image [H, W, 3])."""
    return _blend(image, mean_luma(image), factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
    return _blend(image, to_grayscale_rgb(image), factor)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
    """torchvision's RGB -> HSV (H in [0, 1)); H and S are 0 where the channels are equal."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.max(image, axis=-1)
    minc = jnp.min(image, axis=-1)
    flat = maxc == minc
    chroma = maxc - minc
    s = chroma / jnp.where(flat, 1.0, maxc)
    c = jnp.where(flat, 1.0, chroma)
    h = jnp.where(maxc == r, (g - b) / c,
                  jnp.where(maxc == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    h = jnp.mod(h / 6.0 + 1.0, 1.0)
    return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """torchvision's HSV -> RGB: the hexcone sector of H picks which of v, p, q, t each channel
    takes."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = jnp.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = jnp.mod(sector.astype(jnp.int32), 6)
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    channels = [(v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q)]
    return jnp.stack([jnp.select([sector == i for i in range(6)], list(values))
                      for values in channels], axis=-1)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0))
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
HUE = 3                                   # its index in ADJUSTMENTS and in `order`


def _linear_slots(order: jax.Array, factors: jax.Array):
    """Brightness, contrast and saturation are all clip(a x + b mean_luma + c luma) (identity:
    a=1, b=c=0, exact). ColorJitter's order becomes 3 such slots before the hue shift and 3
    after it (the unused ones identities), so the hue conversion, the costly step, runs once
    per image instead of once per possible position. Returns (a, b, c), each [6]."""
    hue_at = jnp.argmax(order == HUE)
    before, after = jnp.arange(3), hue_at + 1 + jnp.arange(3)
    used = jnp.concatenate([before < hue_at, after < 4])
    ops = order[jnp.concatenate([before, jnp.minimum(after, 3)])]
    f = factors[jnp.minimum(ops, 2)]
    a = jnp.where(used, f, 1.0)
    b = jnp.where(used & (ops == 1), 1.0 - f, 0.0)
    c = jnp.where(used & (ops == 2), 1.0 - f, 0.0)
    return a, b, c


def _linear(image, a, b, c):
    return jnp.clip(a * image + b * mean_luma(image) + c * grayscale(image)[..., None], 0.0, 1.0)


def color_jitter(image: jax.Array, order: jax.Array, factors: jax.Array) -> jax.Array:
    """The four adjustments of one image in `order` (int [4], indices into ADJUSTMENTS) with
    `factors` [4] in ADJUSTMENTS' layout."""
    a, b, c = _linear_slots(order, factors)
    for slot in range(3):
        image = _linear(image, a[slot], b[slot], c[slot])
    image = adjust_hue(image, factors[HUE])
    for slot in range(3, 6):
        image = _linear(image, a[slot], b[slot], c[slot])
    return image


def _reflect_blur_matrix(sigma, size: int) -> jax.Array:
    """[size, size]: a 1-D Gaussian blur with reflect padding as one matrix (row i holds the
    taps of output i, the mirrored ones folded back inside)."""
    taps = jnp.arange(-MAX_RADIUS, MAX_RADIUS + 1)
    radius = jnp.clip(jnp.ceil(3.0 * sigma), 1.0, float(MAX_RADIUS))
    t = taps.astype(jnp.float32)
    weights = jnp.where(jnp.abs(t) <= radius, jnp.exp(-0.5 * jnp.square(t / sigma)), 0.0)
    weights = weights / jnp.sum(weights)
    period = 2 * max(size - 1, 1)
    source = jnp.mod(jnp.arange(size)[:, None] + taps[None, :], period)
    source = jnp.where(source > size - 1, period - source, source)      # [size, taps]
    return jnp.sum(jax.nn.one_hot(source, size, dtype=jnp.float32) * weights[None, :, None],
                   axis=1)


def gaussian_blur(image: jax.Array, sigma) -> jax.Array:
    """Separable Gaussian blur of one image [H, W, 3]: taps out to ceil(3 sigma) (1 to
    MAX_RADIUS), normalised, reflect padding, as two float32 matrix products (faster than
    shifted sums on CPUs, and accelerators run them on their matrix units). Equals
    torchvision's `gaussian_blur` with 2 ceil(3 sigma) + 1 taps (tests/test_augment.py)."""
    rows = _reflect_blur_matrix(sigma, image.shape[0])
    cols = _reflect_blur_matrix(sigma, image.shape[1])
    out = jnp.einsum("ij,jwc->iwc", rows, image, precision=HIGHEST)
    return jnp.einsum("wv,ivc->iwc", cols, out, precision=HIGHEST)


def colour_stage(image: jax.Array, params: jax.Array) -> jax.Array:
    """One float image [H, W, 3] in [0, 1] through the strong recipe's jitter, grayscale and
    blur, as `params` [NUM_PARAMS] (from `augment.ViewDraws.packed`) say."""
    on = params > 0.5
    jittered = color_jitter(image, params[recipe.P_ORDER].astype(jnp.int32),
                            params[recipe.P_FACTORS])
    image = jnp.where(on[recipe.P_JITTER], jittered, image)
    image = jnp.where(on[recipe.P_GRAY], to_grayscale_rgb(image), image)
    sigma = jnp.maximum(params[recipe.P_SIGMA], recipe.BLUR_SIGMA[0])   # >0 when unused
    return jnp.where(on[recipe.P_BLUR], gaussian_blur(image, sigma), image)


def normalize(image: jax.Array, dtype="float32") -> jax.Array:
    mean = jnp.asarray(recipe.IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(recipe.IMAGENET_STD, jnp.float32)
    return ((image - mean) / std).astype(jnp.dtype(dtype))


def finish_views(images: jax.Array, params: jax.Array, spec: recipe.AugmentSpec) -> jax.Array:
    """uint8 views [..., S, S, 3] and their parameters [..., NUM_PARAMS] -> the model's input,
    normalised, in `spec.dtype`. The weak recipe only normalises (it has no colour stage)."""
    shape = images.shape
    flat = images.reshape((-1,) + shape[-3:]).astype(jnp.float32) / 255.0
    if spec.recipe == "strong":
        flat = jax.vmap(colour_stage)(flat, params.reshape(-1, recipe.NUM_PARAMS))
    return normalize(flat, spec.dtype).reshape(shape)


def model_images(batch: dict, data_config) -> jax.Array:
    """The step's input images: the input pipeline's uint8 views through `finish_views` with
    their `recipe.PARAMS_KEY` parameters and `data_config`'s recipe. A batch without those
    parameters (synthetic model input in tests and benchmarks) is taken as already finished."""
    if recipe.PARAMS_KEY not in batch:
        return batch["images"]
    spec = recipe.AugmentSpec.from_config(data_config)
    return finish_views(batch["images"], batch[recipe.PARAMS_KEY], spec)
