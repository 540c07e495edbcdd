"""The host's share of the StableRep reference's augmentations, as pure TensorFlow functions for
tf.data: the crop, resize and flip of each view, and the random draws of its colour stage.

Every random choice comes from a stateless key (a `[2]` int64 tensor), so the same key gives the
same view whether the function runs eagerly or inside a `tf.data` map, on any host, after any
restart. The recipes follow the reference's torchvision chain (`main_stablerep.py`):

  strong: RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3, bilinear), ColorJitter(0.4, 0.4, 0.4,
          0.1) with p=0.8 in random order, RandomGrayscale p=0.2, GaussianBlur(sigma 0.1-2)
          p=0.5, RandomHorizontalFlip, ImageNet mean/std.
  weak:   RandomResizedCrop(scale 0.5-1) and mean/std only (the reference has no flip there).
  downsample (optional, before either recipe, p=downsample_prob): the crop is shrunk to the
          resolution it would have in the image resized to one of `down_res` (shorter side),
          then resized to the output size, i.e. the reference's "down then back up" on the crop.

A view is made in three stages, all keyed by the view's key (`decode_view_crops` draws the box
from its first half, the rest from its second, as `prepare_image` does):
  1. decode only the crop (`decode_view_crops`: JPEG through `decode_and_crop_jpeg`, other
     formats decoded whole, then cropped);
  2. here (`prepare_view`): downsample, resize and flip, rounded to uint8 as PIL's resize is,
     plus the colour stage's parameters (`ViewDraws`) packed in `NUM_PARAMS` floats;
  3. in the jitted train step on the accelerator (`device_augment.finish_views`): ColorJitter,
     grayscale, blur and normalisation, the only implementation of the colour stage.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import tensorflow as tf

# The recipe's constants, AugmentSpec and the colour-parameter layout live in the TF-free
# `recipe` module (the train step imports them without TensorFlow); re-exported here.
from stablerep_jax.data.recipe import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, LUMA, RECIPES, CROP_RATIO, CROP_ATTEMPTS, JITTER, JITTER_PROB,
    GRAYSCALE_PROB, BLUR_PROB, BLUR_SIGMA, FLIP_PROB, CONFIG_KEYS, SpecError, AugmentSpec,
    P_JITTER, P_ORDER, P_FACTORS, P_GRAY, P_BLUR, P_SIGMA, NUM_PARAMS, PARAMS_KEY)


# --------------------------------------------------------------------------------------------
# Keys


def make_key(*ints) -> tf.Tensor:
    """A stateless key from integers (Python or scalar tensors): fold each into a base key."""
    key = tf.constant([0x5EED, 0x57AB1E], tf.int64)
    for value in ints:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def split_key(key: tf.Tensor, num: int) -> list[tf.Tensor]:
    keys = tf.random.experimental.stateless_split(key, num=num)
    return [keys[i] for i in range(num)]


def _uniform(key, shape=(), minval=0.0, maxval=1.0) -> tf.Tensor:
    return tf.random.stateless_uniform(shape, seed=key, minval=minval, maxval=maxval,
                                       dtype=tf.float32)


def _apply_with_prob(key, prob: float, fn, image):
    if prob >= 1.0:
        return fn(image)
    if prob <= 0.0:
        return image
    return tf.cond(_uniform(key) < prob, lambda: fn(image), lambda: image)


# --------------------------------------------------------------------------------------------
# Geometry


def random_resized_crop_box(key, height, width, scale: Sequence[float],
                            ratio: Sequence[float] = CROP_RATIO) -> tf.Tensor:
    """torchvision's RandomResizedCrop box: [top, left, h, w] int32.

    Tries 10 (area fraction, log-uniform aspect) draws at once and keeps the first that fits;
    if none fits, a centre crop with the aspect clamped to `ratio`, as torchvision does.
    """
    k_area, k_ratio, k_top, k_left = split_key(key, 4)
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    area = h_f * w_f
    target = area * _uniform(k_area, [CROP_ATTEMPTS], scale[0], scale[1])
    aspect = tf.exp(_uniform(k_ratio, [CROP_ATTEMPTS], math.log(ratio[0]), math.log(ratio[1])))
    crop_w = tf.cast(tf.round(tf.sqrt(target * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target / aspect)), tf.int32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    fits = (crop_w > 0) & (crop_h > 0) & (crop_w <= width) & (crop_h <= height)
    top = tf.cast(tf.floor(_uniform(k_top, [CROP_ATTEMPTS]) * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
    left = tf.cast(tf.floor(_uniform(k_left, [CROP_ATTEMPTS]) * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    drawn = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])

    in_ratio = w_f / h_f
    fb_w = tf.where(in_ratio < ratio[0], width,
                    tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32), width))
    fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
    fallback = tf.stack([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w])
    return tf.where(tf.reduce_any(fits), drawn, fallback)


def resize(image, height, width) -> tf.Tensor:
    """Bilinear resize to [height, width] (float32, same value range), antialiased when
    shrinking (PIL's bilinear filter widens with the scale; TF's plain bilinear does not)."""
    in_h, in_w = tf.shape(image)[0], tf.shape(image)[1]
    shrinks = (in_h > height) | (in_w > width)
    return tf.cond(
        shrinks,
        lambda: tf.image.resize(image, [height, width], method="bilinear", antialias=True),
        lambda: tf.image.resize(image, [height, width], method="bilinear", antialias=False))


def resize_to_unit(pixels, height, width) -> tf.Tensor:
    """uint8 (or float 0-255) pixels -> float32 [height, width, 3] in [0, 1]: `resize`, scale
    and clip (float rounding can land just outside the range; torchvision's PIL path cannot)."""
    image = resize(tf.cast(pixels, tf.float32), height, width) / 255.0
    return tf.clip_by_value(image, 0.0, 1.0)


def crop(image, box) -> tf.Tensor:
    return tf.slice(image, tf.stack([box[0], box[1], 0]), tf.stack([box[2], box[3], -1]))


def downsample_crop(key, crop_image, source_short_side, down_res: Sequence[int]) -> tf.Tensor:
    """Shrinks a crop to the size it has in the source image resized to a random one of
    `down_res` (shorter side). Only shrinks: a source already that small is left alone."""
    k_res, = split_key(key, 1)
    choices = tf.constant(list(down_res), tf.float32)
    res = tf.gather(choices, tf.random.stateless_uniform([], k_res, 0, len(down_res), dtype=tf.int32))
    factor = tf.minimum(res / tf.cast(source_short_side, tf.float32), 1.0)
    shape = tf.cast(tf.shape(crop_image)[:2], tf.float32)
    new = tf.maximum(tf.cast(tf.round(shape * factor), tf.int32), 1)
    return resize(tf.cast(crop_image, tf.float32), new[0], new[1])


def flip_left_right(image):
    return tf.reverse(image, axis=[1])          # ~10x faster than a negative-stride slice


# --------------------------------------------------------------------------------------------
# The colour stage's draws and normalisation (the stage itself runs in `device_augment`)


# Per-channel arithmetic is written as an [N, 3] x [3, 3] matmul: TF's CPU kernels for
# broadcasting a [3] vector over [H, W, 3] are several times slower than a small matmul.
def _channel_matmul(image, matrix) -> tf.Tensor:
    flat = tf.reshape(image, [-1, 3])
    return tf.reshape(tf.matmul(flat, tf.constant(matrix, tf.float32)), tf.shape(image))


def jitter_draws(key, strength: Sequence[float] = JITTER) -> tuple[tf.Tensor, tf.Tensor]:
    """ColorJitter's random choices: the order of the four adjustments (int32 [4]) and their
    factors (float32 [4]: brightness, contrast, saturation uniform in 1 -+ s, hue in -+ h)."""
    b, c, s, h = strength
    k_order, k_b, k_c, k_s, k_h = split_key(key, 5)
    order = tf.argsort(_uniform(k_order, [4]))
    factors = tf.stack([_uniform(k_b, [], 1 - b, 1 + b), _uniform(k_c, [], 1 - c, 1 + c),
                        _uniform(k_s, [], 1 - s, 1 + s), _uniform(k_h, [], -h, h)])
    return order, factors


def normalize(image, dtype="float32") -> tf.Tensor:
    """(image - mean) / std per channel, for images in [0, 1]."""
    scaled = _channel_matmul(image, [[1.0 / s if i == j else 0.0 for j, s in enumerate(IMAGENET_STD)]
                                     for i in range(3)])
    offset = tf.constant([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], tf.float32)
    return tf.cast(tf.nn.bias_add(scaled, offset), tf.dtypes.as_dtype(dtype))


# --------------------------------------------------------------------------------------------
# One view's random choices, and their packed form for the device

# The colour stage's parameters of one view are packed in a float32 vector [NUM_PARAMS]
# (layout: recipe.P_*) that the pipeline ships beside the uint8 view (batch key PARAMS_KEY).


@dataclasses.dataclass(frozen=True)
class ViewDraws:
    """Every random choice after the crop box, drawn up front from the view's key (the same
    key gives the same choices on any host, eagerly or in tf.data)."""
    down_key: tf.Tensor       # the optional downsample's own key (coin and resolution)
    jitter: tf.Tensor         # bool
    order: tf.Tensor          # int32 [4]
    factors: tf.Tensor        # float32 [4]
    gray: tf.Tensor           # bool
    blur: tf.Tensor           # bool
    sigma: tf.Tensor          # float32
    flip: tf.Tensor           # bool

    @classmethod
    def draw(cls, key) -> "ViewDraws":
        k_down, k_jitter, k_jitter_p, k_gray_p, k_blur, k_blur_p, k_flip_p = split_key(key, 7)
        order, factors = jitter_draws(k_jitter)
        return cls(down_key=k_down, jitter=_uniform(k_jitter_p) < JITTER_PROB, order=order,
                   factors=factors, gray=_uniform(k_gray_p) < GRAYSCALE_PROB,
                   blur=_uniform(k_blur_p) < BLUR_PROB,
                   sigma=_uniform(k_blur, [], BLUR_SIGMA[0], BLUR_SIGMA[1]),
                   flip=_uniform(k_flip_p) < FLIP_PROB)

    def packed(self) -> tf.Tensor:
        """The colour stage's parameters, float32 [NUM_PARAMS] (layout: the P_* constants)."""
        def flag(x):
            return tf.cast(x, tf.float32)[None]
        return tf.concat([flag(self.jitter), tf.cast(self.order, tf.float32), self.factors,
                          flag(self.gray), flag(self.blur), self.sigma[None]], axis=0)


# --------------------------------------------------------------------------------------------
# Recipes


def _downsampled(draws: ViewDraws, crop_image, spec: AugmentSpec, source_short_side):
    """The crop as float32 0-255, shrunk by the optional downsample augmentation."""
    image = tf.cast(crop_image, tf.float32)
    if spec.downsample_prob > 0:
        image = _apply_with_prob(
            draws.down_key, spec.downsample_prob,
            lambda x: downsample_crop(draws.down_key, x, source_short_side, spec.down_res), image)
        image = tf.ensure_shape(image, [None, None, 3])
    return image


def prepare_crop(key, crop_image, spec: AugmentSpec, source_short_side):
    """The host's share of a view (its colour stage runs on the device): optional downsample,
    resize to `spec.size` rounded to uint8 (PIL's resize returns uint8 too), the strong
    recipe's flip (it commutes with the colour stage: per-pixel operations, the global mean and
    a symmetric blur with mirrored edges). Returns (uint8 [S, S, 3], float32 [NUM_PARAMS]);
    the weak recipe's parameters are all zero (no colour stage)."""
    draws = ViewDraws.draw(key)
    image = resize(_downsampled(draws, crop_image, spec, source_short_side), spec.size, spec.size)
    image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 255.0)), tf.uint8)
    if spec.recipe == "strong":
        image = tf.cond(draws.flip, lambda: flip_left_right(image), lambda: image)
        params = draws.packed()
    else:
        params = tf.zeros([NUM_PARAMS], tf.float32)
    return tf.ensure_shape(image, [spec.size, spec.size, 3]), params


def _halves(key) -> tuple[tf.Tensor, tf.Tensor]:
    """A view key's two halves: the crop box's key and the key of everything after it."""
    k_box, k_rest = split_key(key, 2)
    return k_box, k_rest


def prepare_view(key, crop_image, spec: AugmentSpec, source_short_side):
    """The host's share of the view keyed by `key`, from its decoded crop: (uint8 [S, S, 3],
    colour parameters [NUM_PARAMS]); see `prepare_crop`."""
    return prepare_crop(_halves(key)[1], crop_image, spec, source_short_side)


# libjpeg upsamples subsampled chroma from neighbouring samples, and treats the edge of a cropped
# decode as the image's edge: the crop's border pixels then differ from a full decode's (by up
# to ~10 levels at 4:2:0). Decoding a window JPEG_MARGIN pixels wider and cutting the box out of
# it gives exactly the full decode's pixels (tests/test_augment.py checks it).
JPEG_MARGIN = 2


def _decode_jpeg_box(encoded, box, shape) -> tf.Tensor:
    """Pixels of `box` [top, left, h, w] of a JPEG, equal to those of a full decode."""
    top, left = tf.maximum(box[0] - JPEG_MARGIN, 0), tf.maximum(box[1] - JPEG_MARGIN, 0)
    bottom = tf.minimum(box[0] + box[2] + JPEG_MARGIN, shape[0])
    right = tf.minimum(box[1] + box[3] + JPEG_MARGIN, shape[1])
    window = tf.io.decode_and_crop_jpeg(encoded, tf.stack([top, left, bottom - top, right - left]),
                                        channels=3)
    return crop(window, tf.stack([box[0] - top, box[1] - left, box[2], box[3]]))


def decode_view_crops(encoded, keys, spec: AugmentSpec):
    """The crops of one encoded image for the views keyed by `keys` (uint8 [h, w, 3] each) and
    the image's shorter side. A JPEG is decoded crop by crop (`decode_and_crop_jpeg`: only the
    rows and column blocks a box covers; the box needs only the header's shape); other formats
    are decoded once and cropped. Raises (InvalidArgumentError) on undecodable bytes."""
    def boxes(shape):
        return [random_resized_crop_box(_halves(k)[0], shape[0], shape[1], spec.crop_scale)
                for k in keys]

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded, output_type=tf.int32)
        crops = [_decode_jpeg_box(encoded, box, shape) for box in boxes(shape)]
        return tuple(crops), tf.minimum(shape[0], shape[1])

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        shape = tf.shape(image)
        return tuple(crop(image, box) for box in boxes(shape)), tf.minimum(shape[0], shape[1])

    crops, short_side = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tuple(tf.ensure_shape(c, [None, None, 3]) for c in crops), short_side


def _view_crop(key, image, spec: AugmentSpec):
    """The view's crop of a decoded image and the image's shorter side."""
    shape = tf.shape(image)
    box = random_resized_crop_box(_halves(key)[0], shape[0], shape[1], spec.crop_scale)
    return crop(image, box), tf.minimum(shape[0], shape[1])


def prepare_image(key, image, spec: AugmentSpec):
    """The host's share of one training view of a decoded uint8 image [H, W, 3]: (uint8
    [S, S, 3], colour parameters [NUM_PARAMS]) for `device_augment.finish_views`."""
    crop_image, short_side = _view_crop(key, image, spec)
    return prepare_view(key, crop_image, spec, short_side)
