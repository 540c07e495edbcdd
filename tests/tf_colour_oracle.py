"""A second, independent implementation of the strong recipe's colour stage, in TensorFlow, for
tests only: `finish_views` takes what the input pipeline ships (uint8 views and their packed
parameters, layout `recipe.P_*`) and returns what `device_augment.finish_views` should.

The package has one colour stage (`stablerep_jax.data.device_augment`, jitted in the train
step); this one is written the other way round (TF ops, per-channel matmuls, a depthwise
convolution for the blur, TF's own RGB <-> HSV for the hue), so a slip in either shows as a
difference. Definitions follow torchvision's (contrast and saturation blend with the luma image
/ its mean, each result clipped to [0, 1]); TF's hue conversion differs from torchvision's by up
to 2e-3.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

from stablerep_jax.data import recipe


def _channel_matmul(image, matrix) -> tf.Tensor:
    flat = tf.reshape(image, [-1, 3])
    return tf.reshape(tf.matmul(flat, tf.constant(matrix, tf.float32)), tf.shape(image))


def grayscale(image) -> tf.Tensor:
    """Luma, [H, W]."""
    return tf.tensordot(image, tf.constant(recipe.LUMA, tf.float32), 1)


def to_grayscale_rgb(image) -> tf.Tensor:
    return _channel_matmul(image, [[w] * 3 for w in recipe.LUMA])


def adjust_brightness(image, factor):
    return tf.clip_by_value(image * factor, 0.0, 1.0)


def adjust_contrast(image, factor):
    mean = tf.reduce_mean(grayscale(image))
    return tf.clip_by_value(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image, factor):
    return tf.clip_by_value(factor * image + (1.0 - factor) * to_grayscale_rgb(image), 0.0, 1.0)


def adjust_hue(image, delta):
    return tf.clip_by_value(tf.image.adjust_hue(image, delta), 0.0, 1.0)


def apply_jitter(image, order, factors) -> tf.Tensor:
    """The four ColorJitter adjustments in `order` (indices into brightness, contrast,
    saturation, hue) with `factors` in that same fixed layout."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    for i in range(4):
        branches = [(lambda op=op, j=j, x=image: op(x, factors[j])) for j, op in enumerate(ops)]
        image = tf.switch_case(order[i], branches)
    return image


def gaussian_blur(image, sigma, max_sigma: float = recipe.BLUR_SIGMA[1]) -> tf.Tensor:
    """Separable Gaussian blur with reflect padding; the kernel reaches ceil(3 sigma) pixels
    (1 to ceil(3 max_sigma))."""
    max_radius = int(math.ceil(3.0 * max_sigma))
    radius = tf.clip_by_value(tf.cast(tf.math.ceil(3.0 * sigma), tf.int32), 1, max_radius)
    x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    kernel = tf.exp(-0.5 * tf.square(x / sigma))
    kernel /= tf.reduce_sum(kernel)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    pad_h = tf.minimum(radius, height - 1)
    pad_w = tf.minimum(radius, width - 1)
    padded = tf.pad(image, [[pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    padded = tf.pad(padded, [[radius - pad_h] * 2, [radius - pad_w] * 2, [0, 0]], mode="SYMMETRIC")
    k_v = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])
    k_h = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])
    out = tf.nn.depthwise_conv2d(padded[None], k_v, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, k_h, [1, 1, 1, 1], "VALID")
    return tf.reshape(out[0], tf.shape(image))


def colour_stage(image, params) -> tf.Tensor:
    """ColorJitter, grayscale and blur of one float image in [0, 1] as `params` [NUM_PARAMS]
    say, in the reference's order."""
    params = tf.convert_to_tensor(params, tf.float32)
    on = params > 0.5
    order = tf.cast(params[recipe.P_ORDER], tf.int32)
    factors = params[recipe.P_FACTORS]
    image = tf.cond(on[recipe.P_JITTER], lambda: apply_jitter(image, order, factors),
                    lambda: image)
    image = tf.cond(on[recipe.P_GRAY], lambda: to_grayscale_rgb(image), lambda: image)
    sigma = tf.maximum(params[recipe.P_SIGMA], recipe.BLUR_SIGMA[0])
    return tf.cond(on[recipe.P_BLUR], lambda: gaussian_blur(image, sigma), lambda: image)


def finish_views(images: np.ndarray, params: np.ndarray, spec: recipe.AugmentSpec) -> np.ndarray:
    """uint8 views [N, S, S, 3] and their parameters [N, NUM_PARAMS] -> float32 normalised
    views, as `device_augment.finish_views` computes them."""
    mean = np.array(recipe.IMAGENET_MEAN, np.float32)
    std = np.array(recipe.IMAGENET_STD, np.float32)
    out = []
    for view, p in zip(images, params):
        image = tf.constant(view, tf.float32) / 255.0
        if spec.recipe == "strong":
            image = colour_stage(image, p)
        out.append((image.numpy() - mean) / std)
    return np.stack(out).astype(np.float32)
