"""Training: multi-device equivalence, sharded optimizer state, exact resume, preemption, NaN
guard, learning on a tiny problem, StableRep++ mode."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest
import tensorflow as tf

from stablerep_jax import config_utils, parallel, train
from stablerep_jax.data import pipeline
from stablerep_jax.metrics import read_metrics

import synthetic_records
from tiny_tokenizer import write_tiny_clip_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(train_files, **overrides):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.data.shuffle_buffer = 16
    for key, value in overrides.items():
        config_utils.apply_overrides(config, {key: value})
    return config


@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    return synthetic_records.write_dataset(str(tmp_path_factory.mktemp("records")),
                                           num_captions=32, images_per_caption=4, size=40)


def _random_batch(config, seed=0):
    rng = np.random.default_rng(seed)
    n_views = train.views_per_caption(config)
    size = config.data.image_size
    return {
        "images": rng.normal(size=(config.batch_size, n_views, size, size, 3)).astype(np.float32),
        "labels": np.arange(config.batch_size, dtype=np.int32),
    }


def _one_step(config, devices, batch):
    """Gradients at init, then two steps (the first has lr 0 in warmup), on `devices`."""
    mesh = parallel.make_mesh(devices)
    parts = train.build_training(config, mesh, total_steps=10, steps_per_epoch=0)
    state = parts.init(jax.random.PRNGKey(0))
    global_batch = jax.device_put(batch, parallel.batch_sharded(mesh))
    loss_fn = train.make_loss_fn(parts.model, config)
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, state.batch_stats, global_batch, 0.1)[0]))(
        state.params)
    for _ in range(2):
        state, metrics = parts.step_fn(state, global_batch)
    return jax.device_get(state.params), float(metrics["loss"]), jax.device_get(grads), state


def test_eight_devices_equal_one_device():
    config = tiny_config("unused", **{"optim.warmup_steps": 1})
    batch = _random_batch(config)
    params_1, loss_1, grads_1, _ = _one_step(config, jax.devices()[:1], batch)
    params_8, loss_8, grads_8, _ = _one_step(config, jax.devices(), batch)
    assert abs(loss_8 - loss_1) / abs(loss_1) < 1e-5
    # Relative to the largest gradient anywhere: some leaves are zero up to float noise.
    scale = max(np.max(np.abs(g)) for g in jax.tree_util.tree_leaves(grads_1))
    diffs = jax.tree_util.tree_map(lambda a, b: np.max(np.abs(a - b)), grads_8, grads_1)
    assert max(jax.tree_util.tree_leaves(diffs)) / scale < 1e-5
    # Adam maps a gradient that is zero in exact arithmetic (biases before BatchNorm, the key
    # bias of attention) to +-lr from float noise, so parameters are compared where the
    # gradient carries signal: |g| above 1e-4 of the largest gradient (noise is ~1e-6 of it).
    def masked_err(p8, p1, g1):
        keep = np.abs(g1) > 1e-4 * scale
        if not keep.any():
            return 0.0
        return np.max(np.abs(p8 - p1)[keep]) / max(np.max(np.abs(p1)), 1e-12)
    errs = jax.tree_util.tree_map(masked_err, params_8, params_1, grads_1)
    assert max(jax.tree_util.tree_leaves(errs)) < 1e-5


def test_optimizer_state_is_sharded_over_devices():
    config = tiny_config("unused")
    config.model.mlp_dim = 256          # leaves large enough to be sharded 8 ways
    *_, state = _one_step(config, jax.devices(), _random_batch(config))
    total = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state))
    replicated_small = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state.opt_state)
                           if leaf.sharding.is_fully_replicated)
    per_device = parallel.per_device_bytes(state.opt_state)
    assert per_device <= total / 8 + replicated_small
    assert replicated_small < 0.05 * total, "most of the moments must be sharded"


def _params_of_latest(workdir):
    from stablerep_jax import checkpoint
    params, _, _ = checkpoint.load_model(workdir)
    return params


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(train_files, tmp_path):
    straight = tiny_config(train_files, total_steps=6, checkpoint_every=100)
    result = train.train_and_evaluate(straight, str(tmp_path / "straight"))
    assert result.step == 6

    first = tiny_config(train_files, total_steps=6, checkpoint_every=100, stop_at_step=3)
    assert train.train_and_evaluate(first, str(tmp_path / "resumed")).step == 3
    second = tiny_config(train_files, total_steps=6, checkpoint_every=100)
    assert train.train_and_evaluate(second, str(tmp_path / "resumed")).step == 6

    a = _params_of_latest(str(tmp_path / "straight"))
    b = _params_of_latest(str(tmp_path / "resumed"))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))   # bitwise on CPU
    losses_straight = [m["loss"] for m in read_metrics(str(tmp_path / "straight"))]
    losses_resumed = [m["loss"] for m in read_metrics(str(tmp_path / "resumed"))]
    assert losses_resumed == losses_straight


def _wrap_iterator(monkeypatch, on_step):
    """Wraps the data iterator so a test can act (send SIGTERM, poison a batch) at a step."""
    real = pipeline.make_train_iterator

    def fake(*args, **kwargs):
        it = real(*args, **kwargs)
        step = kwargs.get("start_step", 0)

        class Wrapped:
            def __iter__(self):
                return self

            def __next__(self):
                nonlocal step
                batch = next(it)
                step += 1
                return on_step(step, batch)

            @property
            def dropped(self):
                return getattr(it, "dropped", 0)
        return Wrapped()

    monkeypatch.setattr(pipeline, "make_train_iterator", fake)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(train_files, tmp_path, monkeypatch):
    def sigterm_at_3(step, batch):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    _wrap_iterator(monkeypatch, sigterm_at_3)
    config = tiny_config(train_files, total_steps=8, checkpoint_every=100)
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result.preempted and result.step == 3
    monkeypatch.undo()
    resumed = train.train_and_evaluate(tiny_config(train_files, total_steps=8,
                                                   checkpoint_every=100), str(tmp_path))
    assert resumed.step == 8 and not resumed.preempted


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(train_files, tmp_path, monkeypatch):
    def poison_at_4(step, batch):
        if step == 4:
            batch = dict(batch, images=np.full_like(batch["images"], np.nan))
        return batch

    _wrap_iterator(monkeypatch, poison_at_4)
    config = tiny_config(train_files, total_steps=10, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4.*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    from stablerep_jax import checkpoint
    params, _, _ = checkpoint.load_model(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_tiny_run_lowers_the_loss_and_logs(train_files, tmp_path):
    config = tiny_config(train_files, total_steps=40, checkpoint_every=40)
    config.optim.blr = 3e-3
    train.train_and_evaluate(config, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert [m["step"] for m in metrics] == list(range(1, 41))
    first = np.mean([m["loss"] for m in metrics[:5]])
    last = np.mean([m["loss"] for m in metrics[-5:]])
    assert last < first - 0.1, (first, last)
    for key in ("lr", "temperature", "images_per_sec", "step_time", "grad_norm"):
        assert key in metrics[-1]
    assert os.path.isdir(tmp_path / "tensorboard")


@pytest.mark.slow
def test_stablerep_pp_runs_and_clamps_logit_scale(train_files, tmp_path):
    tokenizer = write_tiny_clip_tokenizer(str(tmp_path / "tokenizer"))
    config = tiny_config(train_files, total_steps=3, checkpoint_every=3)
    config.model.add_language = True
    config.model.vocab_size = 600
    config.data.tokenizer = tokenizer
    config.model.logit_scale_init = 150.0      # above the clamp: must come back to 100
    train.train_and_evaluate(config, str(tmp_path))
    metrics = read_metrics(str(tmp_path))
    assert all(np.isfinite(m["img_txt_loss"]) for m in metrics)
    params = _params_of_latest(str(tmp_path))
    assert float(params["logit_scale"]) <= np.log(100.0) + 1e-6


def test_bad_configs_fail_before_touching_data(tmp_path):
    with pytest.raises(ValueError, match="train_files"):
        train.check_config(tiny_config(None))
    with pytest.raises(ValueError, match="not divisible"):
        train.check_config(tiny_config("x", batch_size=6))
    with pytest.raises(FileNotFoundError, match="matches no file"):
        train.count_captions(tiny_config(str(tmp_path / "none-*.tfrecord"), total_steps=0))
    with pytest.raises(ValueError, match="preemption_check_every=0"):
        config = tiny_config("x")
        config.preemption_check_every = 0
        train.check_config(config)


def test_count_captions_needs_every_shard_in_a_manifest(train_files, tmp_path):
    """Sizing epochs reads manifests only (never terabytes of shards), wherever they live."""
    source = os.path.dirname(train_files)
    assert train.count_captions(tiny_config(train_files, total_steps=0)) == 32

    bare = tmp_path / "bare"
    bare.mkdir()
    first = sorted(f for f in os.listdir(source) if f.endswith(".tfrecord"))[0]
    shutil.copy(os.path.join(source, first), bare / first)
    with pytest.raises(FileNotFoundError, match="has no manifest.json.*num_captions"):
        train.count_captions(tiny_config(str(bare / "*.tfrecord"), total_steps=0))

    shutil.copy(os.path.join(source, "manifest.json"), bare / "manifest.json")
    shutil.copy(bare / first, bare / "extra.tfrecord")
    with pytest.raises(FileNotFoundError, match="extra.tfrecord is not listed in"):
        train.count_captions(tiny_config(str(bare / "*.tfrecord"), total_steps=0))


def test_count_captions_reads_manifests_on_other_filesystems(train_files, ram_dir):
    """ram:// stands in for gs://: both go through tf.io.gfile, never os.path."""
    source = os.path.dirname(train_files)
    tf.io.gfile.makedirs(ram_dir)
    for name in os.listdir(source):
        tf.io.gfile.copy(os.path.join(source, name), f"{ram_dir}/{name}")
    assert train.count_captions(tiny_config(f"{ram_dir}/*.tfrecord", total_steps=0)) == 32


@pytest.mark.slow
def test_knn_monitor_logs_accuracy_during_training(train_files, tmp_path):
    from stablerep_jax.generation import toy_world
    folder = str(tmp_path / "knn_folder")
    toy_world.write_toy_probe_folder(folder, attribute="color", train_per_class=4,
                                     test_per_class=2, image_size=40, seed=0)
    config = tiny_config(train_files, total_steps=4, checkpoint_every=4)
    config.knn.every = 2
    config.knn.dataset = f"folder:{folder}"
    train.train_and_evaluate(config, str(tmp_path / "run"))
    knn_rows = [m for m in read_metrics(str(tmp_path / "run")) if "knn_top1" in m]
    assert [m["step"] for m in knn_rows] == [2, 4]
    assert all(0.0 <= m["knn_top1"] <= 1.0 for m in knn_rows)
