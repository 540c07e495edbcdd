"""Linear probe: learns separable classes, stays at chance on random labels, the side-by-side
sweep equals single-lr runs, 8 devices equal 1, every test example counts once, clear errors;
the presets run the reference protocol (views, lrs, schedule, init, best over (epoch, lr)),
features are float32 for bf16 checkpoints, outputs go to ram:// workdirs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from stablerep_jax import checkpoint, config_utils, fileio, linear_probe, parallel
from stablerep_jax import features as features_lib
from stablerep_jax.data import augment, eval_data
from stablerep_jax.metrics import read_metrics
from stablerep_jax.models.encoder import build_model

import probe_fixtures as F

CHANCE = 1.0 / 6                 # six colour classes


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return F.save_tiny_encoder(str(tmp_path_factory.mktemp("encoder")))


@pytest.fixture(scope="module")
def tinted(tmp_path_factory):
    # 6 classes x 24 train / 16 test = 144 / 96 images (both divisible by 8 devices).
    return F.write_tinted_folder(str(tmp_path_factory.mktemp("tinted") / "folder"), 24, 16)


@pytest.fixture(scope="module")
def separable_run(encoder_dir, tinted, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("probe"))
    return workdir, linear_probe.run(F.probe_config(encoder_dir, tinted), workdir)


def test_separable_classes_reach_high_accuracy(separable_run):
    """Threshold 0.9 (chance 0.167): every image carries a 50% cast of its class hue, which even
    a random encoder keeps (k-NN on the same features gets ~0.96), so only a broken probe
    (wrong labels, wrong lr scaling, padding counted as examples) falls below it; the margin
    allows ~9 of the 96 test images to be missed."""
    _, results = separable_run
    assert results["best_top1"] >= 0.9
    assert results["knn_top1"] >= 0.85
    assert results["best_top5"] >= results["best_top1"]
    assert results["num_train"] == 144 and results["num_test"] == 96


def test_results_json_metrics_and_best_head(separable_run, encoder_dir, tinted):
    workdir, results = separable_run
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["best_top1"] == results["best_top1"]
    assert set(on_disk["top1"]) == {"0.03", "0.3", "3"} and set(on_disk["top5"]) == set(on_disk["top1"])
    assert on_disk["best_top1"] == max(on_disk["top1"].values())
    assert on_disk["top1"][f"{on_disk['best_lr']:g}"] == on_disk["best_top1"]
    # lr = blr x batch / 256 with the batch actually used.
    for row in on_disk["per_lr"]:
        assert row["lr"] == pytest.approx(row["base_lr"] * on_disk["batch_size"] / 256)
    # Accuracy counts each of the 96 test images once (3 extraction batches of 40, padded).
    for value in on_disk["top1"].values():
        assert value * 96 == pytest.approx(round(value * 96))
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [m["step"] for m in lines[:30]] == list(range(1, 31))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    # Tested every 10 epochs (the preset's cadence); the best is over the whole (epoch, lr) grid.
    grid = on_disk["grid"]
    assert grid["epochs"] == [10, 20, 30] and grid["base_lrs"] == [0.03, 0.3, 3.0]
    assert [m["step"] for m in lines if "test_top1/blr=0.3" in m] == [10, 20, 30]
    assert on_disk["best_top1"] == np.max(grid["top1"])
    e, h = linear_probe.select_best(grid["top1"])
    assert (on_disk["best_epoch"], on_disk["best_lr"]) == (grid["epochs"][e], grid["base_lrs"][h])
    assert on_disk["final_top1"] == {f"{b:g}": v for b, v in zip(grid["base_lrs"], grid["top1"][-1])}
    assert on_disk["feature_dtype"] == "float32" and on_disk["mode"] == "cached_features"

    # The saved best head reproduces the reported accuracy on freshly extracted features.
    head, meta = checkpoint.load_probe_head(os.path.join(workdir, linear_probe.BEST_HEAD))
    assert meta["base_lr"] == results["best_lr"] and meta["class_names"] == sorted(meta["class_names"])
    encoder = features_lib.load_encoder(encoder_dir)
    mesh = parallel.make_mesh()
    data = eval_data.load_eval_dataset(f"folder:{tinted}")
    feats, labels, _ = features_lib.extract_features(
        features_lib.make_encode_fn(encoder.model, mesh),
        features_lib.replicate(encoder.variables, mesh),
        eval_data.eval_batches(data.test, F.IMAGE_SIZE, 40), mesh)
    top1 = np.mean(np.argmax(linear_probe.predict(head, feats, meta["use_bn"]), 1) == labels)
    assert top1 == pytest.approx(results["best_top1"])


def test_random_labels_stay_near_chance(encoder_dir, tmp_path):
    """Same kind of images, class folders drawn at random: nothing generalises. The bound is
    chance + 0.12 on 192 test images: a chance-level head has a standard deviation of 0.027
    there, so this is ~4.4 of them, room for the best of the 3 heads of the sweep."""
    folder = F.write_tinted_folder(str(tmp_path / "random"), 24, 32, shuffle_labels=True)
    results = linear_probe.run(F.probe_config(encoder_dir, folder, **{"knn.enabled": False}),
                               str(tmp_path / "work"))
    assert results["num_test"] == 192
    assert results["best_top1"] <= CHANCE + 0.12


def test_side_by_side_sweep_equals_single_lr_runs():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16)).astype(np.float32) + rng.integers(0, 2, (200, 1))
    labels = rng.integers(0, 4, 200)
    mesh = parallel.make_mesh()
    lrs = (0.01, 0.1, 1.0)
    kwargs = dict(epochs=4, batch_size=40, mesh=mesh, seed=3, use_bn=True, warmup_epochs=1.0,
                  weight_decay=1e-3)
    together, history = linear_probe.train_heads_on_features(feats, labels, 4, lrs, **kwargs)
    for i, lr in enumerate(lrs):
        alone, alone_history = linear_probe.train_heads_on_features(feats, labels, 4, (lr,), **kwargs)
        np.testing.assert_allclose(alone.kernel[0], together.kernel[i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(alone.bias[0], together.bias[i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(alone_history[:, 0], history[:, i], rtol=1e-6)
    # The heads really differ (different lrs), so the comparison is not vacuous.
    assert not np.allclose(together.kernel[0], together.kernel[2])


def test_eight_devices_equal_one_device(encoder_dir, tinted, tmp_path):
    config = F.probe_config(encoder_dir, tinted, epochs=10, use_bn=True)
    assert jax.device_count() == 8
    r8 = linear_probe.run(config, str(tmp_path / "d8"))
    r1 = linear_probe.run(config, str(tmp_path / "d1"), mesh=parallel.make_mesh(jax.devices()[:1]))
    assert (r8["devices"], r1["devices"]) == (8, 1)
    assert r8["top1"] == r1["top1"] and r8["top5"] == r1["top5"]
    np.testing.assert_allclose([p["final_train_loss"] for p in r8["per_lr"]],
                               [p["final_train_loss"] for p in r1["per_lr"]], rtol=1e-4)
    h8, _ = checkpoint.load_probe_head(str(tmp_path / "d8" / linear_probe.BEST_HEAD))
    h1, _ = checkpoint.load_probe_head(str(tmp_path / "d1" / linear_probe.BEST_HEAD))
    for key in h8:
        np.testing.assert_allclose(h8[key], h1[key], rtol=1e-4, atol=1e-5)


def test_augmented_mode_learns(encoder_dir, tinted, tmp_path):
    """The reference protocol (RandomResizedCrop + flip through the encoder every step)."""
    results = linear_probe.run(F.probe_config(encoder_dir, tinted, mode="augmented", epochs=8,
                                              **{"knn.enabled": False}), str(tmp_path))
    assert results["mode"] == "augmented"
    assert results["best_top1"] >= 0.85


def test_tfds_dataset(encoder_dir, tmp_path):
    """A TFDS dataset prepared offline goes through the same path (3 classes, 13 test images,
    a count that pads every extraction batch)."""
    name = F.prepare_tiny_tfds(str(tmp_path / "tfds"))
    config = F.probe_config(encoder_dir, "unused", epochs=20, batch_size=24, extract_batch_size=8)
    config.dataset, config.data_dir = name, str(tmp_path / "tfds")
    results = linear_probe.run(config, str(tmp_path / "work"))
    assert results["num_classes"] == 3 and results["num_test"] == 13
    assert results["best_top1"] >= 0.9
    assert all(v * 13 == pytest.approx(round(v * 13)) for v in results["top1"].values())


def test_folder_training_epochs_are_global_permutations_for_any_host_count(tinted):
    """An epoch of the augmented mode reads the folder (sorted by class) in a permutation of the
    whole split, as the reference's sampler: batches mix the classes even with a shuffle buffer
    of 1, and two hosts' halves of each global batch are exactly the one-host batch."""
    data = eval_data.load_eval_dataset(f"folder:{tinted}")

    def indices(process_index, process_count, epoch=0):
        return [(b["index"], b["label"]) for b in eval_data.train_batches(
            data.train, 16, 48, 5, epoch, 1, process_index, process_count)]

    one, halves = indices(0, 1), [indices(p, 2) for p in (0, 1)]
    assert len(one) == 3 and all(len(idx) == 48 for idx, _ in one)
    for step, (idx, labels) in enumerate(one):
        np.testing.assert_array_equal(idx, np.concatenate([h[step][0] for h in halves]))
        assert len(set(labels.tolist())) >= 4          # 6 classes; file order would give 2
    seen = np.concatenate([idx for idx, _ in one])
    assert len(set(seen.tolist())) == 144
    assert not np.array_equal(seen, np.concatenate([idx for idx, _ in indices(0, 1, epoch=1)]))


def test_tfds_training_epochs_are_seeded_and_cover_the_split(tmp_path):
    """TFDS training views (files in a seeded order, shuffle buffer): an epoch covers every
    example once, the same (seed, epoch) gives the same batches, another epoch others."""
    name = F.prepare_tiny_tfds(str(tmp_path / "tfds"))
    data = eval_data.load_eval_dataset(name, str(tmp_path / "tfds"))

    def epoch(e):
        return list(eval_data.train_batches(data.train, 16, 8, 3, e, 1000))

    first, again, other = epoch(0), epoch(0), epoch(1)
    assert len(first) == 3
    assert sorted(np.concatenate([b["label"] for b in first]).tolist()) == [0] * 8 + [1] * 8 + [2] * 8
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_eval_batches_pad_with_masked_blanks(tinted):
    data = eval_data.load_eval_dataset(f"folder:{tinted}")
    seen = []
    for index in range(3):                         # three hosts, global batch 24
        batches = list(eval_data.eval_batches(data.test, 16, 24, index, 3))
        assert len(batches) == eval_data.num_eval_batches(data.test, 24, 3)
        for b in batches:
            assert b["image"].shape == (8, 16, 16, 3)
            assert np.all(b["index"][~b["mask"]] == -1)
            assert np.all(b["image"][~b["mask"]] == 0)
            seen.extend(b["index"][b["mask"]].tolist())
    assert sorted(seen) == list(range(96))         # every example once, none repeated


# --------------------------------------------------------------------------------------------
# Clear errors


def test_missing_checkpoint_fails_clearly(tinted, tmp_path):
    missing = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        linear_probe.run(F.probe_config(missing, tinted), str(tmp_path / "w"))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no model checkpoint in .*empty_run"):
        linear_probe.run(F.probe_config(str(empty), tinted), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "results.json").exists()


def test_unknown_dataset_fails_clearly(encoder_dir, tmp_path):
    config = F.probe_config(encoder_dir, "x")
    config.dataset = "cifar_10"
    with pytest.raises(ValueError, match="unknown dataset 'cifar_10'.*Did you mean.*cifar10"):
        linear_probe.run(config, str(tmp_path))
    config.dataset = "folder:"
    with pytest.raises(ValueError, match="needs a path"):
        linear_probe.run(config, str(tmp_path))
    config.dataset = "cifar10"
    config.data_dir = str(tmp_path / "no_tfds_here")
    with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared"):
        linear_probe.run(config, str(tmp_path))


def test_empty_or_missing_folder_fails_clearly(encoder_dir, tmp_path):
    for label in ("a", "b"):
        (tmp_path / "empty" / "train" / label).mkdir(parents=True)
        (tmp_path / "empty" / "test" / label).mkdir(parents=True)
    with pytest.raises(ValueError, match="empty/train' holds no images"):
        linear_probe.run(F.probe_config(encoder_dir, str(tmp_path / "empty")), str(tmp_path / "w"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        linear_probe.run(F.probe_config(encoder_dir, str(tmp_path / "nope")), str(tmp_path / "w"))
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test split"):
        linear_probe.run(F.probe_config(encoder_dir, str(tmp_path / "only_train")),
                         str(tmp_path / "w"))


def test_bad_settings_fail_clearly(encoder_dir, tinted, tmp_path):
    with pytest.raises(ValueError, match="image_size=64.*32x32"):
        linear_probe.run(F.probe_config(encoder_dir, tinted, image_size=64), str(tmp_path))
    with pytest.raises(ValueError, match="mode='fast'"):
        linear_probe.run(F.probe_config(encoder_dir, tinted, mode="fast"), str(tmp_path))
    with pytest.raises(ValueError, match="base_lrs"):
        linear_probe.run(F.probe_config(encoder_dir, tinted, base_lrs=(0.1, -1.0)), str(tmp_path))
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        linear_probe.run(F.probe_config(encoder_dir, tinted, batch_size=12), str(tmp_path))
    config = F.probe_config(encoder_dir, tinted)
    config.checkpoint = None
    with pytest.raises(ValueError, match="set --config.checkpoint"):
        linear_probe.run(config, str(tmp_path))


# --------------------------------------------------------------------------------------------
# The reference protocol (StableRep/main_linear.py)

# main_linear.py's --base_lrs default, copied by hand from the reference.
REFERENCE_BASE_LRS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]


@pytest.mark.parametrize("preset", ["imagenet2012", "cifar10", "folder"])
def test_presets_run_the_reference_protocol(preset):
    c = config_utils.load_config(os.path.join(F.REPO, "configs", "linear_probe.py") + f":{preset}")
    assert c.mode == "augmented"
    assert list(c.base_lrs) == REFERENCE_BASE_LRS and 0.3 in c.base_lrs
    assert (c.batch_size, c.epochs, c.eval_every) == (1024, 90, 10)
    assert (c.momentum, c.weight_decay, c.warmup_epochs, c.use_bn) == (0.9, 0.0, 0.0, False)
    assert linear_probe.eval_epochs(c.epochs, c.eval_every) == tuple(range(10, 91, 10))


def test_probe_views_use_the_reference_parameters():
    """main_linear.py: RandomResizedCrop(224) (torchvision defaults), RandomHorizontalFlip(),
    Resize(256) + CenterCrop(224); checked without torchvision (the tests below compare with it)."""
    assert eval_data.TRAIN_CROP_SCALE == (0.08, 1.0)
    assert eval_data.TRAIN_CROP_RATIO == pytest.approx((3 / 4, 4 / 3))
    assert eval_data.FLIP_PROB == 0.5 and eval_data.EVAL_RESIZE == (256, 224)
    assert eval_data.eval_resize_size(224) == 256 and eval_data.eval_resize_size(32) == 36


def test_eval_epochs_always_include_the_last():
    assert linear_probe.eval_epochs(25, 10) == (10, 20, 25)
    assert linear_probe.eval_epochs(30, 0) == (30,)
    assert linear_probe.eval_epochs(5, 10) == (5,)


def test_lr_schedule_is_the_references_per_step_cosine():
    """CosineAnnealingLR(T_max = epochs x steps, eta_min 0), stepped after every update."""
    hp = linear_probe.make_hparams((0.3,), epochs=3, steps_per_epoch=4)
    total = 12
    for step in range(total + 1):
        want = 0.5 * (1 + np.cos(np.pi * step / total))
        assert float(linear_probe.lr_factor(hp, step)) == pytest.approx(want, abs=1e-6)


def test_heads_start_like_the_reference():
    """nn.Linear weight.normal_(0, 0.01), bias zero: a plain normal (a truncated one at 2 sd
    would never draw beyond 0.02 and has sd 0.0088)."""
    state = linear_probe.init_heads(0, 3, 256, 200)
    kernel = np.asarray(state.kernel)
    assert np.all(kernel[0] == kernel[2]) and np.all(np.asarray(state.bias) == 0)
    assert np.std(kernel[0]) == pytest.approx(0.01, rel=0.02)
    assert np.mean(np.abs(kernel[0]) > 0.02) == pytest.approx(0.0455, abs=0.005)


def test_select_best_over_epoch_and_lr_like_the_reference():
    grid = [[0.10, 0.50, 0.30],     # epoch 10: lr 1 at 0.50
            [0.20, 0.45, 0.50],     # epoch 20: lr 2 ties 0.50 later -> the earlier one wins
            [0.30, 0.40, 0.49]]     # epoch 30
    assert linear_probe.select_best(grid) == (0, 1)
    assert linear_probe.select_best([[0.1, 0.2], [0.3, 0.3]]) == (1, 0)
    with pytest.raises(ValueError, match="grid"):
        linear_probe.select_best([])


def test_best_lr_peaking_before_the_last_epoch_is_reported_and_saved():
    """fit_heads + summarize on a scripted sweep: the best lr peaks at the first evaluation and
    then overfits; results name that (epoch, lr) and the kept head is the one from that epoch."""
    mesh = parallel.make_mesh()
    table = {2: [0.20, 0.70, 0.40], 4: [0.30, 0.60, 0.50], 5: [0.35, 0.55, 0.52]}

    def run_epoch(state, epoch):           # the kernel records the epoch it was trained to
        return state.replace(kernel=state.kernel * 0 + (epoch + 1)), np.full(3, 1.0 / (epoch + 1))

    def evaluate(state):
        epoch = int(np.asarray(state.kernel)[0, 0, 0])
        return np.asarray(table[epoch]), np.ones(3)

    state = jax.device_put(linear_probe.init_heads(0, 3, 4, 2), parallel.replicated(mesh))
    logged = []
    fit = linear_probe.fit_heads(state, run_epoch, 5, evaluate, linear_probe.eval_epochs(5, 2),
                                 lambda *args: logged.append(args))
    assert [e.epoch for e in fit.evaluations] == [2, 4, 5]
    assert [a[0] for a in logged] == [1, 2, 3, 4, 5] and logged[1][2].epoch == 2
    assert np.all(fit.best_head["kernel"] == 2)          # the head as it was after epoch 2
    results = linear_probe.summarize(fit, (0.01, 0.1, 1.0), (0.04, 0.4, 4.0))
    assert (results["best_top1"], results["best_lr"], results["best_epoch"]) == (0.7, 0.1, 2)
    assert results["top1"] == {"0.01": 0.35, "0.1": 0.7, "1": 0.52}
    assert results["final_top1"] == {"0.01": 0.35, "0.1": 0.55, "1": 0.52}
    assert [r["best_epoch"] for r in results["per_lr"]] == [5, 2, 5]
    assert results["grid"]["epochs"] == [2, 4, 5]
    assert results["grid"]["top1"] == [table[2], table[4], table[5]]
    assert results["per_lr"][0]["final_train_loss"] == pytest.approx(0.2)


def _denormalize(image):
    return np.asarray(image) * np.array(augment.IMAGENET_STD) + np.array(augment.IMAGENET_MEAN)


def _smooth_image(height, width):
    """A smooth RGB pattern: resampling differences stay within a level, layout errors don't."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([128 + 100 * np.sin(x / 7.0 + c) * np.cos(y / 5.0 - c) for c in range(3)],
                    -1).astype(np.uint8)


@pytest.mark.parametrize("shape", [(45, 61), (61, 45), (40, 40), (300, 200)])
def test_eval_view_matches_torchvision(shape):
    """Resize(size x 256/224) + CenterCrop(size) on a PIL image, as main_linear.py."""
    T = pytest.importorskip("torchvision.transforms")
    from PIL import Image
    image = _smooth_image(*shape)
    for size in (32, 224):
        resize = eval_data.eval_resize_size(size)
        want = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor()])(
            Image.fromarray(image)).permute(1, 2, 0).numpy()
        got = _denormalize(eval_data.eval_view(tf.constant(image), size))
        assert got.shape == want.shape == (size, size, 3)
        assert np.max(np.abs(got - want)) * 255 < 1.5          # within rounding to a level
    assert eval_data.eval_resize_size(224) == 256


def test_train_view_matches_torchvision_for_its_box_and_flip():
    """Each view is torchvision's resized_crop (bilinear) of the box it drew, then hflip."""
    T = pytest.importorskip("torchvision.transforms")
    from torchvision.transforms import functional as TF
    from PIL import Image
    image = _smooth_image(45, 61)
    flips = []
    for i in range(6):
        key = augment.make_key(7, i)
        box, flip = eval_data.train_view_params(key, 45, 61)
        top, left, h, w = (int(v) for v in box)
        want = TF.resized_crop(Image.fromarray(image), top, left, h, w, [32, 32],
                               T.InterpolationMode.BILINEAR)
        want = np.asarray(TF.hflip(want) if bool(flip) else want) / 255.0
        got = _denormalize(eval_data.train_view(tf.constant(image), 32, key))
        assert np.max(np.abs(got - want)) * 255 < 1.5
        flips.append(bool(flip))
    assert len(set(flips)) == 2


def test_train_view_boxes_follow_torchvision_random_resized_crop():
    """2000 boxes of ours vs torchvision's RandomResizedCrop.get_params (scale 0.08-1, ratio
    3/4-4/3) on a 60x90 image: same area and aspect distributions (quantiles within 0.03 and
    0.06; standard errors ~0.01) and a fair flip coin."""
    T = pytest.importorskip("torchvision.transforms")
    import torch
    torch.manual_seed(0)
    from PIL import Image
    pil = Image.fromarray(np.zeros((60, 90, 3), np.uint8))
    ref = np.array([T.RandomResizedCrop.get_params(pil, [0.08, 1.0], [3 / 4, 4 / 3])
                    for _ in range(2000)])[:, 2:].astype(float)       # (h, w)
    ours, flips = [], []
    for i in range(2000):
        box, flip = eval_data.train_view_params(augment.make_key(3, i), 60, 90)
        ours.append(np.asarray(box)[2:])
        flips.append(bool(flip))
    ours = np.array(ours, float)
    q = [0.1, 0.25, 0.5, 0.75, 0.9]
    area = lambda hw: hw[:, 0] * hw[:, 1] / (60 * 90)              # noqa: E731
    log_aspect = lambda hw: np.log(hw[:, 1] / hw[:, 0])            # noqa: E731
    np.testing.assert_allclose(np.quantile(area(ours), q), np.quantile(area(ref), q), atol=0.03)
    np.testing.assert_allclose(np.quantile(log_aspect(ours), q), np.quantile(log_aspect(ref), q),
                               atol=0.06)
    assert area(ours).min() >= 0.07 and area(ours).max() <= 1.0
    assert abs(np.mean(flips) - 0.5) < 0.04


def test_features_are_float32_for_a_bf16_checkpoint(tmp_path):
    """A run trained in bf16 records dtype bfloat16; the probe still computes in float32: the
    features equal a float32-config encoder's on the same params and differ from bf16's."""
    bf16_dir = F.save_tiny_encoder(str(tmp_path / "bf16"), dtype="bfloat16")
    encoder = features_lib.load_encoder(bf16_dir)
    assert encoder.trained_dtype == "bfloat16" and encoder.model.dtype == jnp.float32
    images = np.random.default_rng(0).normal(size=(8, F.IMAGE_SIZE, F.IMAGE_SIZE, 3))
    images = images.astype(np.float32)
    mesh = parallel.make_mesh()
    variables = features_lib.replicate(encoder.variables, mesh)
    ours = np.asarray(features_lib.make_encode_fn(encoder.model, mesh)(variables, images))
    fp32 = build_model({**F.MODEL_CONFIG, "dtype": "float32"})
    bf16 = build_model({**F.MODEL_CONFIG, "dtype": "bfloat16"})
    want = np.asarray(features_lib.make_encode_fn(fp32, mesh)(variables, images))
    low = np.asarray(features_lib.make_encode_fn(bf16, mesh)(variables, images))
    np.testing.assert_array_equal(ours, want)
    assert np.max(np.abs(low - want)) > 1e-3 * np.max(np.abs(want))


def test_ram_workdir(encoder_dir, tinted, ram_dir, tmp_path):
    """Every output of the job goes through fileio: a ram:// workdir (the gs:// code path)."""
    # The probe's resume checkpoints are orbax's, which writes local paths and gs:// (not ram://).
    ckpt = str(tmp_path / "ckpt")
    results = linear_probe.run(F.probe_config(encoder_dir, tinted, epochs=4, eval_every=2),
                               ram_dir, checkpoint_workdir=ckpt)
    assert fileio.read_json(f"{ram_dir}/results.json") == json.loads(json.dumps(results))
    head, meta = checkpoint.load_probe_head(f"{ram_dir}/{linear_probe.BEST_HEAD}")
    assert meta["epoch"] == results["best_epoch"] and head["kernel"].shape == (192, 6)
    assert not [p for p in tf.io.gfile.listdir(ram_dir) if p.endswith(fileio.TMP_SUFFIX)]
    # A rerun in the same workdir finds the last epoch saved and logs no step twice.
    linear_probe.run(F.probe_config(encoder_dir, tinted, epochs=4, eval_every=2), ram_dir,
                     checkpoint_workdir=ckpt)
    assert [m["step"] for m in read_metrics(ram_dir)] == [1, 2, 3, 4]
    assert not os.path.exists("ram:")


def _printed_results(output: str) -> dict:
    return {line.split(" ", 2)[1]: json.loads(line.split(" ", 2)[2])
            for line in output.splitlines() if line.startswith("RESULTS ")}


@pytest.mark.slow
def test_two_processes_write_once_and_match_one(encoder_dir, tinted, tmp_path):
    """Two jax.distributed processes (4 devices each): only process 0 writes (results.json,
    best_head.npz, metrics, knn_results.json), both report the same results, and in both modes
    (the same global batches and crops) they equal a single 8-device process."""
    from processes import run_processes
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_probe.py")
    two = run_processes(script, 2, encoder_dir, tinted, tmp_path / "two",
                        "cached_features,augmented")
    one = run_processes(script, 1, encoder_dir, tinted, tmp_path / "one",
                        "cached_features,augmented")
    for mode in ("cached_features", "augmented"):
        p0, p1 = tmp_path / "two" / mode / "p0", tmp_path / "two" / mode / "p1"
        assert {"results.json", linear_probe.BEST_HEAD, "metrics.jsonl",
                "knn_results.json"} <= set(os.listdir(p0))
        assert not p1.exists() or not os.listdir(p1), os.listdir(p1)
        assert _printed_results(two[0])[mode] == _printed_results(two[1])[mode]
    for mode in ("cached_features", "augmented"):
        r2, r1 = _printed_results(two[0])[mode], _printed_results(one[0])[mode]
        assert (r2["devices"], r1["devices"]) == (8, 8)
        assert r2["grid"]["top1"] == r1["grid"]["top1"] and r2["knn_top1"] == r1["knn_top1"]
        np.testing.assert_allclose([p["final_train_loss"] for p in r2["per_lr"]],
                                   [p["final_train_loss"] for p in r1["per_lr"]], rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Preemption and resume


def _sigterm_at_epoch(monkeypatch, epoch: int) -> None:
    """One SIGTERM to this process as the metrics of `epoch` are logged."""
    import signal
    from stablerep_jax import metrics
    real_write = metrics.MetricWriter.write

    def write(self, step, scalars):
        real_write(self, step, scalars)
        if step == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(metrics.MetricWriter, "write", write)


def _without_seconds(results: dict) -> dict:
    return {k: v for k, v in results.items() if k != "seconds"}


def _same_best_head(workdir, other) -> None:
    mine, mine_meta = checkpoint.load_probe_head(os.path.join(workdir, linear_probe.BEST_HEAD))
    theirs, their_meta = checkpoint.load_probe_head(os.path.join(other, linear_probe.BEST_HEAD))
    assert mine_meta == their_meta and mine.keys() == theirs.keys()
    for key in mine:
        np.testing.assert_array_equal(mine[key], theirs[key])


def test_sigterm_saves_the_epoch_and_the_rerun_gives_the_same_results(
        separable_run, encoder_dir, tinted, tmp_path, monkeypatch):
    """The probe had no resume: a 90-epoch probe on spot machines started over. A notice now
    ends it after the epoch it is training (cached features: one compiled scan): the heads, their
    momentum and the progress are saved, the job says it was preempted (exit 75) and leaves
    results.json to the rerun, which resumes from that epoch to the very results (every
    accuracy, loss and the best head) of the uninterrupted run."""
    straight_dir, straight = separable_run
    _sigterm_at_epoch(monkeypatch, 15)        # not an evaluated epoch (10, 20, 30)
    work = tmp_path / "work"
    config = F.probe_config(encoder_dir, tinted)
    assert linear_probe.run_until_preempted(config, str(work)) == (None, True)
    assert os.listdir(work / checkpoint.PROBE_CHECKPOINTS_SUBDIR) == ["15"]
    assert not (work / linear_probe.RESULTS).exists()
    assert [m["step"] for m in read_metrics(str(work))] == list(range(1, 16))
    monkeypatch.undo()

    resumed, preempted = linear_probe.run_until_preempted(config, str(work))
    assert not preempted
    assert _without_seconds(resumed) == _without_seconds(straight)
    assert _without_seconds(fileio.read_json(str(work / linear_probe.RESULTS))) == \
        _without_seconds(fileio.read_json(os.path.join(straight_dir, linear_probe.RESULTS)))
    assert read_metrics(str(work)) == read_metrics(straight_dir)
    _same_best_head(str(work), straight_dir)
    assert os.listdir(work / checkpoint.PROBE_CHECKPOINTS_SUBDIR) == ["30"]

    # A rerun with settings the saved heads were not trained with is refused, naming them.
    with pytest.raises(ValueError, match=r"other settings \(epochs: 30 -> 40; eval_every: "
                                         r"10 -> 5\): pass a new --workdir"):
        linear_probe.run(F.probe_config(encoder_dir, tinted, epochs=40, eval_every=5), str(work))


def test_a_notice_mid_epoch_drops_an_augmented_epoch_and_the_rerun_matches(
        encoder_dir, tinted, tmp_path, monkeypatch):
    """The reference protocol's epochs (fresh crops through the encoder, minutes on ImageNet)
    are dropped, not finished: the notice stops it before the next step, the heads as after the
    last finished epoch (3, not an evaluated one) are saved, and the rerun redoes epoch 4 to
    the results of an uninterrupted run."""
    import signal
    config = F.probe_config(encoder_dir, tinted, mode="augmented", epochs=4, eval_every=2,
                            **{"knn.enabled": False})
    straight = linear_probe.run(config, str(tmp_path / "straight"))
    real_batches = eval_data.train_batches

    def batches(*args, **kwargs):            # 144 images, batch 48: 3 steps per epoch
        for i, batch in enumerate(real_batches(*args, **kwargs)):
            if args[4] == 3 and i == 1:      # epoch 4 (0-based 3), as its second batch comes
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    monkeypatch.setattr(eval_data, "train_batches", batches)
    work = tmp_path / "work"
    assert linear_probe.run_until_preempted(config, str(work)) == (None, True)
    assert os.listdir(work / checkpoint.PROBE_CHECKPOINTS_SUBDIR) == ["3"]
    assert [m["step"] for m in read_metrics(str(work))] == [1, 2, 3]
    monkeypatch.undo()
    resumed = linear_probe.run(config, str(work))
    assert _without_seconds(resumed) == _without_seconds(straight)
    _same_best_head(str(work), str(tmp_path / "straight"))


@pytest.mark.slow
def test_sigterm_through_the_command_line_exits_75_and_the_rerun_completes(
        encoder_dir, tinted, tmp_path):
    """`python -m stablerep_jax.linear_probe` with SIGTERM after epoch 2: exit code 75 (what
    launchers requeue on), epoch 2 saved; the rerun's results equal an uninterrupted run's."""
    import subprocess
    import sys
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, os.path.join(F.REPO, "tests", "signals_eval.py"), "linear_probe",
         "epoch:2", "--config=configs/linear_probe.py:folder", f"--config.checkpoint={encoder_dir}",
         f"--config.dataset=folder:{tinted}", "--config.mode=cached_features",
         "--config.epochs=4", "--config.eval_every=3", "--config.batch_size=48",
         "--config.extract_batch_size=40", "--config.base_lrs=(0.03,0.3,3.0)",
         f"--workdir={work}"],
        cwd=F.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 75, run.stdout[-3000:]
    assert "stopped after epoch 2 of 4" in run.stdout
    assert "stopped early to be resumed (exit code 75)" in run.stdout
    assert os.listdir(work / checkpoint.PROBE_CHECKPOINTS_SUBDIR) == ["2"]
    assert not (work / linear_probe.RESULTS).exists()
    config = F.probe_config(encoder_dir, tinted, epochs=4, eval_every=3)
    resumed = linear_probe.run(config, str(work))
    straight = linear_probe.run(config, str(tmp_path / "straight"))
    assert _without_seconds(resumed) == _without_seconds(straight)
