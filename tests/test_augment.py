"""Augmentations: their statistics match the reference recipe's definitions, the device's
colour operations match torchvision's and an independent TF implementation of the colour stage
(tests/tf_colour_oracle.py), the host's share of a view is the same eagerly and inside tf.data,
and a JPEG decoded crop by crop equals the crop of the decoded image."""
import io
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stablerep_jax import config_utils
from stablerep_jax.data import augment as A
from stablerep_jax.data import device_augment as D

import tf_colour_oracle
DRAWS = 3000
MEAN = np.array(A.IMAGENET_MEAN, np.float32)
STD = np.array(A.IMAGENET_STD, np.float32)


def _prepared(image: np.ndarray, spec: A.AugmentSpec, draws: int, seed: int):
    """The host's share of `draws` views of one image, in tf.data (graph mode): uint8 views
    and their colour parameters."""
    img = tf.constant(image)
    ds = tf.data.Dataset.range(draws).map(
        lambda i: A.prepare_image(A.make_key(seed, i), img, spec),
        num_parallel_calls=tf.data.AUTOTUNE).batch(draws)
    images, params = (x.numpy() for x in next(iter(ds)))
    assert images.dtype == np.uint8 and params.shape == (draws, A.NUM_PARAMS)
    return images, params


def _views(image: np.ndarray, spec: A.AugmentSpec, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """`draws` training views of one image as the train step sees them (the host's share in
    tf.data, the colour stage in `device_augment.finish_views`, jitted), un-normalised to
    [0, 1]."""
    out = jax.jit(D.finish_views, static_argnums=2)(*_prepared(image, spec, draws, seed), spec)
    return np.asarray(out, np.float32) * STD + MEAN


def _uniform_image(rgb, size=24):
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


def _gradient_image(size=24):
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    return np.broadcast_to(ramp[None, :, None], (size, size, 3)).copy()


def _binomial_tolerance(p, n):
    return 4.5 * math.sqrt(p * (1 - p) / n)


def test_crop_boxes_follow_the_random_resized_crop_definition():
    height, width = 64, 64
    boxes = tf.data.Dataset.range(DRAWS).map(
        lambda i: A.random_resized_crop_box(A.make_key(1, i), height, width, (0.08, 1.0)))
    boxes = next(iter(boxes.batch(DRAWS))).numpy()
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    area = h * w / (height * width)
    assert area.min() >= 0.07 and area.max() <= 1.0      # 0.08 up to rounding of h and w
    aspect = w / h
    assert aspect.min() >= 0.7 and aspect.max() <= 1.45  # 3/4 .. 4/3 up to rounding
    # Area fraction ~ U(0.08, 1), large boxes with a skewed aspect rejected (they do not fit):
    # 0.485 on a square image by simulation of the definition; all of the range visited.
    assert abs(area.mean() - 0.485) < 0.02
    assert np.quantile(area, 0.05) < 0.15 and np.quantile(area, 0.95) > 0.8
    # Offsets uniform: the box centre moves across the whole image.
    centre_x = (left + w / 2) / width
    assert centre_x.min() < 0.3 and centre_x.max() > 0.7


@pytest.mark.torch
def test_crop_box_statistics_match_torchvision():
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    height, width = 48, 64
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    theirs = np.array([transforms.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                       for _ in range(DRAWS)], np.float64)
    ours = tf.data.Dataset.range(DRAWS).map(
        lambda i: A.random_resized_crop_box(A.make_key(2, i), height, width, (0.08, 1.0)))
    ours = next(iter(ours.batch(DRAWS))).numpy().astype(np.float64)
    for name, stat in [("area", lambda b: b[:, 2] * b[:, 3] / (height * width)),
                       ("log aspect", lambda b: np.log(b[:, 3] / b[:, 2])),
                       ("centre y", lambda b: (b[:, 0] + b[:, 2] / 2) / height)]:
        a, b = stat(ours), stat(theirs)
        assert abs(a.mean() - b.mean()) < 0.03, name
        assert abs(a.std() - b.std()) < 0.03, name


def test_strong_recipe_rates():
    spec = A.AugmentSpec(size=16, recipe="strong")
    # Colour jitter (p=0.8) is the only step that changes a uniform grey image (brightness).
    grey = _views(_uniform_image([128, 128, 128]), spec)
    jittered = np.abs(grey.mean(axis=(1, 2, 3)) - 128 / 255) > 2e-3
    assert abs(jittered.mean() - 0.8) < _binomial_tolerance(0.8, DRAWS)
    # Grayscale (p=0.2) is the only step that makes a coloured image's channels equal.
    colour = _views(_uniform_image([200, 90, 40]), spec, seed=1)
    grey_out = np.abs(colour[..., 0] - colour[..., 2]).max(axis=(1, 2)) < 1e-3
    assert abs(grey_out.mean() - 0.2) < _binomial_tolerance(0.2, DRAWS)
    # Horizontal flip (p=0.5): a left-to-right ramp ends up right-to-left.
    ramp = _views(_gradient_image(), spec, seed=2).mean(axis=(1, 3))
    left, right = ramp[:, :3].mean(axis=1), ramp[:, -3:].mean(axis=1)
    visible = np.abs(left - right) > 1e-2          # a crop wholly clipped by brightness is flat
    flipped = (left > right)[visible]
    assert visible.mean() > 0.9
    assert abs(flipped.mean() - 0.5) < _binomial_tolerance(0.5, visible.sum())


def test_strong_recipe_blurs_half_the_views():
    spec = A.AugmentSpec(size=16, recipe="strong")
    checker = (np.indices((16, 16)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=-1)
    # A 16x16 checkerboard cropped and resized to 16 keeps sharp detail unless blurred with
    # sigma >= 0.5 (the lower part of sigma 0.1-2 barely changes it, hence a range).
    views = _views(image, spec, seed=3).mean(axis=-1)
    detail = np.abs(np.diff(views, axis=2)).mean(axis=(1, 2))
    full_scale = _views(image, A.AugmentSpec(size=16, recipe="weak"), seed=3).mean(axis=-1)
    sharp = np.median(np.abs(np.diff(full_scale, axis=2)).mean(axis=(1, 2)))
    blurred = (detail < 0.5 * sharp).mean()
    assert 0.3 < blurred < 0.55


def test_weak_recipe_only_crops():
    spec = A.AugmentSpec(size=16, recipe="weak")
    colour = _views(_uniform_image([200, 90, 40]), spec, draws=300)
    np.testing.assert_allclose(colour, np.broadcast_to(np.array([200, 90, 40]) / 255, colour.shape),
                               atol=1e-5)
    ramp = _views(_gradient_image(), spec, draws=300).mean(axis=(1, 3))
    assert (ramp[:, 0] < ramp[:, -1]).all()                       # never flipped


def test_gaussian_blur_has_the_requested_sigma():
    impulse = np.zeros((41, 41, 3), np.float32)
    impulse[20, 20] = 1.0
    xs = np.arange(41) - 20
    stds = []
    for sigma in (0.1, 0.5, 1.0, 2.0):
        out = np.asarray(jax.jit(D.gaussian_blur)(impulse, sigma))[..., 0]
        assert out.sum() == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(out, out.T, atol=1e-7)           # isotropic
        stds.append(math.sqrt((out.sum(axis=0) * xs ** 2).sum()))
    # A sampled kernel: exact for sigma >= 1, narrower below (sigma 0.1 is nearly identity).
    assert stds[2] == pytest.approx(1.0, rel=0.03) and stds[3] == pytest.approx(2.0, rel=0.03)
    assert stds[0] < 0.05 < stds[1] < stds[2]


def test_view_is_the_same_eagerly_and_in_tf_data():
    spec = A.AugmentSpec(size=24, recipe="strong", downsample_prob=0.5, down_res=(8, 16))
    image = np.random.default_rng(0).integers(0, 256, (40, 52, 3)).astype(np.uint8)
    eager = [A.prepare_image(A.make_key(9, i), tf.constant(image), spec) for i in range(6)]
    images, params = _prepared(image, spec, draws=6, seed=9)
    np.testing.assert_array_equal(np.stack([v.numpy() for v, _ in eager]), images)
    np.testing.assert_array_equal(np.stack([p.numpy() for _, p in eager]), params)
    assert len({v.tobytes() for v in images}) == 6                # keys give different views


def _detail(views):
    return np.abs(np.diff(views, axis=2)).mean()


def test_downsample_removes_detail():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[..., None], 3, axis=-1)
    plain = _views(image, A.AugmentSpec(size=64, recipe="weak"), draws=50)
    down = _views(image, A.AugmentSpec(size=64, recipe="weak", downsample_prob=1.0,
                                       down_res=(8,)), draws=50)
    assert _detail(down) < 0.2 * _detail(plain)
    assert down.shape == plain.shape == (50, 64, 64, 3)


def test_bad_spec_values_name_the_spec_field():
    """The library names its own fields; it does not know where a config keeps them."""
    cases = [(dict(recipe="medium"), "AugmentSpec.recipe='medium'"),
             (dict(size=0), "AugmentSpec.size=0"),
             (dict(downsample_prob=1.5), "AugmentSpec.downsample_prob=1.5"),
             (dict(downsample_prob=0.5, down_res=(0,)), r"AugmentSpec.down_res=\(0,\)"),
             (dict(min_crop_scale=2.0), "AugmentSpec.min_crop_scale=2.0"),
             (dict(dtype="float16"), "AugmentSpec.dtype='float16'")]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            A.AugmentSpec(**{"size": 16, **kwargs})


def test_from_config_reads_the_train_config_and_names_its_keys(repo_root):
    data = config_utils.load_config(str(repo_root / "configs" / "stablerep.py")).data
    spec = A.AugmentSpec.from_config(data)
    assert (spec.size, spec.recipe, spec.dtype) == (data.image_size, data.aug, data.image_dtype)
    assert spec.downsample_prob == (data.downsample_prob if data.downsample else 0.0)
    cases = [("aug", "medium", "data.aug='medium': choose one of"),
             ("image_size", -1, "data.image_size=-1: must be positive"),
             ("image_dtype", "float16", "data.image_dtype='float16'"),
             ("min_crop_scale", 1.5, "data.min_crop_scale=1.5")]
    for key, value, message in cases:
        bad = data.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ValueError, match=message):
            A.AugmentSpec.from_config(bad)
    bad = data.copy_and_resolve_references()
    bad.downsample, bad.downsample_prob = True, 1.5
    with pytest.raises(ValueError, match=r"probe\.downsample_prob=1\.5"):
        A.AugmentSpec.from_config(bad, section="probe")


def test_resize_to_unit_scales_and_clips():
    pixels = tf.constant(np.random.default_rng(3).integers(0, 256, (30, 20, 3)).astype(np.uint8))
    out = A.resize_to_unit(pixels, 12, 16).numpy()
    assert out.shape == (12, 16, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, A.resize(tf.cast(pixels, tf.float32), 12, 16).numpy() / 255,
                               atol=1e-6)
    assert A.resize_to_unit(tf.fill([4, 4, 3], 300.0), 8, 8).numpy().max() == 1.0


# --------------------------------------------------------------------------------------------
# The colour stage on the device (JAX) and the crop-only decode


@pytest.mark.torch
def test_device_colour_operations_match_torchvision():
    torch = pytest.importorskip("torch")
    F = pytest.importorskip("torchvision.transforms.functional")
    rng = np.random.default_rng(0)
    image = rng.random((20, 24, 3)).astype(np.float32)
    chw = torch.from_numpy(image.transpose(2, 0, 1).copy())

    def theirs(out):
        return out.numpy().transpose(1, 2, 0)

    # Luma weights: PIL's 0.299 (ours) vs 0.2989 (torchvision's tensor path): < 1e-4 apart.
    cases = [(D.adjust_brightness, F.adjust_brightness, 1.3, 1e-6),
             (D.adjust_contrast, F.adjust_contrast, 0.7, 1e-4),
             (D.adjust_saturation, F.adjust_saturation, 1.35, 1e-4),
             (D.adjust_hue, F.adjust_hue, 0.08, 1e-5),
             (D.adjust_hue, F.adjust_hue, -0.1, 1e-5)]
    for ours, reference, factor, tol in cases:
        got = np.asarray(jax.jit(ours)(image, factor))
        np.testing.assert_allclose(got, theirs(reference(chw, factor)), atol=tol,
                                   err_msg=f"{ours.__name__}({factor})")
    np.testing.assert_allclose(np.asarray(D.to_grayscale_rgb(image)),
                               theirs(F.rgb_to_grayscale(chw, 3)), atol=1e-4)
    # Blur: torchvision's kernel of 2 ceil(3 sigma) + 1 taps, reflect padding.
    for sigma in (0.1, 0.6, 1.3, 2.0):
        size = 2 * min(max(math.ceil(3 * sigma), 1), D.MAX_RADIUS) + 1
        np.testing.assert_allclose(np.asarray(jax.jit(D.gaussian_blur)(image, sigma)),
                                   theirs(F.gaussian_blur(chw, [size, size], [sigma, sigma])),
                                   atol=1e-6, err_msg=f"blur sigma {sigma}")
    # ColorJitter's random order: the adjustments in the drawn order, as torchvision applies them.
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    factors = np.array([1.2, 0.75, 1.3, -0.06], np.float32)
    jitter = jax.jit(D.color_jitter)
    for order in itertools.permutations(range(4)):
        want = chw
        for i in order:
            want = ops[i](want, float(factors[i]))
        got = jitter(image, jnp.array(order), factors)
        np.testing.assert_allclose(np.asarray(got), theirs(want), atol=2e-4, err_msg=str(order))


def test_device_colour_stage_equals_the_tf_oracle_for_drawn_parameters():
    """Views and parameters as the host draws them from their keys, finished by the device's
    colour stage and by an independent TF implementation (tests/tf_colour_oracle.py): the same
    views up to the colour operations' implementations (TF's hue conversion differs from
    torchvision's by up to 2e-3). Both branches of every coin are compared."""
    spec = A.AugmentSpec(size=24, recipe="strong")
    image = np.random.default_rng(4).integers(0, 256, (40, 52, 3)).astype(np.uint8)
    images, params = _prepared(image, spec, draws=40, seed=11)
    device = np.asarray(jax.jit(D.finish_views, static_argnums=2)(images, params, spec))
    oracle = tf_colour_oracle.finish_views(images, params, spec)
    np.testing.assert_allclose(device * STD, oracle * STD, atol=3e-3)
    on = params > 0.5
    for flag, name in [(A.P_JITTER, "jitter"), (A.P_GRAY, "gray"), (A.P_BLUR, "blur")]:
        assert 0 < on[:, flag].mean() < 1, name                  # both branches compared
    assert sorted(params[0, A.P_ORDER].tolist()) == [0, 1, 2, 3]


def test_device_view_follows_the_dtype_and_weak_has_no_colour_stage():
    image = tf.constant(_gradient_image())
    weak = A.AugmentSpec(size=16, recipe="weak", dtype="bfloat16")
    view, params = A.prepare_image(A.make_key(0), image, weak)
    assert view.dtype == tf.uint8 and not params.numpy().any()
    out = D.finish_views(view.numpy()[None], params.numpy()[None], weak)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 16, 3)
    normalised = (view.numpy() / 255.0 - MEAN) / STD             # the weak recipe: mean/std only
    np.testing.assert_allclose(np.asarray(out[0], np.float32), normalised, atol=0.02)


def _encoded(image: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 90}),                # 4:2:0
                                        ("JPEG", {"quality": 95, "subsampling": 0}),
                                        ("PNG", {})])
def test_decoded_crop_equals_decode_then_crop(fmt, kwargs):
    rng = np.random.default_rng(5)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (6, 7, 3), np.uint8)).resize(
        (71, 53), Image.BICUBIC), np.float32)
    image = np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)
    encoded = tf.constant(_encoded(image, fmt, **kwargs))
    spec = A.AugmentSpec(size=16, recipe="strong")
    keys = [A.make_key(7, i) for i in range(30)]
    crops, short_side = A.decode_view_crops(encoded, keys, spec)
    decoded = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    assert int(short_side) == 53
    for key, got in zip(keys, crops):
        box = A.random_resized_crop_box(A.split_key(key, 2)[0], 53, 71, spec.crop_scale)
        np.testing.assert_array_equal(got.numpy(), A.crop(decoded, box).numpy())
    with pytest.raises(tf.errors.InvalidArgumentError):
        A.decode_view_crops(tf.constant(encoded.numpy()[:len(encoded.numpy()) // 2]), keys, spec)
