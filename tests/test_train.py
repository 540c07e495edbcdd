"""Training: multi-device equivalence, sharded optimizer state, exact resume, preemption, NaN
guard, learning on a tiny problem, StableRep++ mode."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from stablerep_jax import cli, config_utils, parallel, resume, train
from stablerep_jax.data import pipeline, recipe
from stablerep_jax.data.train_set import TrainSet
from stablerep_jax.metrics import read_metrics

import synthetic_records
from tiny_tokenizer import write_tiny_clip_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(train_files, **overrides):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.data.permute_window = 16
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


def _signals_run(workdir, train_files, when: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, os.path.join(REPO, "tests", "signals_train.py"),
                           str(workdir), train_files, when], cwd=REPO, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)


def test_sigterm_during_startup_exits_75_and_says_so(train_files, tmp_path):
    """The handler is installed first: a notice while the run restores, counts records or builds
    its pipeline (minutes on a pod) used to kill it silently (143)."""
    run = _signals_run(tmp_path, train_files, "startup")
    assert run.returncode == cli.EXIT_RESUME, run.stdout[-3000:]
    assert "SIGTERM during start-up, before the first step" in run.stdout
    assert "stopped by SIGTERM during start-up (nothing new to save" in run.stdout
    assert "signals_train: step=0 preempted=True" in run.stdout
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


@pytest.mark.slow
def test_second_sigterm_during_the_final_save_waits_for_it(train_files, tmp_path):
    """Two notices: the second arrives while the step-3 checkpoint is written. It used to kill
    the run mid-write (143, a half-written *.orbax-checkpoint-tmp, the steps lost); the handler
    now stays until the checkpoint manager has closed."""
    run = _signals_run(tmp_path, train_files, "final_save")
    assert run.returncode == cli.EXIT_RESUME, run.stdout[-3000:]
    assert "SIGTERM while the last checkpoint is written: finishing it first" in run.stdout
    from stablerep_jax import checkpoint
    assert checkpoint.finished_steps(str(tmp_path)) == [3]
    assert os.listdir(tmp_path / "checkpoints") == ["3"]


@pytest.mark.slow
def test_a_kill_mid_save_leaves_nothing_behind_after_the_resume(train_files, tmp_path):
    """SIGKILL while step 8 is written leaves a temporary directory of the state's size; the
    resumed run removes it (orbax's cleanup_tmp_directories) and redoes steps 7 and 8."""
    run = _signals_run(tmp_path, train_files, "kill_in_save")
    assert run.returncode == -signal.SIGKILL, run.stdout[-3000:]
    assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(tmp_path / "checkpoints"))
    result = train.train_and_evaluate(tiny_config(train_files, total_steps=8, checkpoint_every=2),
                                      str(tmp_path))
    assert result.step == 8 and not result.preempted
    assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["4", "6", "8"]
    assert [m["step"] for m in read_metrics(str(tmp_path))] == list(range(1, 9))


def _wait_for_metrics(path, lines: int, proc, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        if os.path.exists(path) and len(open(path).read().splitlines()) >= lines:
            return
        time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"no {lines} metrics lines in {path} after {timeout} s")


@pytest.mark.slow
def test_sigterm_through_the_command_line_exits_75_and_a_rerun_resumes(train_files, tmp_path):
    """`python -m stablerep_jax.train`, SIGTERM mid-run: a checkpoint, exit code 75 (resume),
    a log that says so; the same command resumes (here up to stop_at_step) and exits 0."""
    command = [sys.executable, "-m", "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
               f"--config.data.train_files={train_files}", "--config.total_steps=1000",
               "--config.checkpoint_every=1000", f"--workdir={tmp_path}"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=env)
    _wait_for_metrics(tmp_path / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == cli.EXIT_RESUME == 75, output[-3000:]
    assert "stopped early by SIGTERM" in output and "finished at step" not in output
    stopped = read_metrics(str(tmp_path))[-1]["step"]
    assert os.listdir(tmp_path / "checkpoints") == [str(stopped)]

    rerun = subprocess.run(command + [f"--config.stop_at_step={stopped + 2}"], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert "resumed from" in rerun.stdout
    assert [m["step"] for m in read_metrics(str(tmp_path))] == list(range(1, stopped + 3))


@pytest.mark.slow
def test_nan_loss_stops_with_a_clear_message(train_files, tmp_path, monkeypatch):
    def poison_at_4(step, batch):
        if step == 4:     # a NaN blur sigma: NaN views reach the model (uint8 cannot hold NaN)
            params = batch[recipe.PARAMS_KEY].copy()
            params[..., recipe.P_BLUR], params[..., recipe.P_SIGMA] = 1.0, np.nan
            batch = dict(batch, **{recipe.PARAMS_KEY: params})
        return batch

    _wrap_iterator(monkeypatch, poison_at_4)
    config = tiny_config(train_files, total_steps=10, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 4.*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    from stablerep_jax import checkpoint
    params, _, _ = checkpoint.load_model(str(tmp_path))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


@pytest.mark.slow
def test_update_to_non_finite_params_saves_nothing_non_finite(train_files, tmp_path):
    """lr 1e39 (inf in float32): each update turns the params non-finite while the loss, computed
    before it on finite params, stays finite. Such a state is never saved, and the error names
    the last checkpoint whose params are all finite."""
    from stablerep_jax import checkpoint
    config = tiny_config(train_files, total_steps=6, checkpoint_every=1, keep_checkpoints=10)
    config.optim.lr = 1e39
    with pytest.raises(FloatingPointError, match=r"non-finite parameters or optimizer state "
                                                 r"\(loss [0-9.]+\) at step 1;.*no checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "fresh"))
    assert not os.listdir(tmp_path / "fresh" / "checkpoints")

    # Two good steps, then the same blow-up on resume (the lr change allowed explicitly).
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(tiny_config(train_files, total_steps=6, checkpoint_every=1,
                                         keep_checkpoints=10, stop_at_step=2), workdir)
    with pytest.raises(FloatingPointError, match=r"non-finite parameters.*at step 3;.*"
                                                 r"all-finite parameters is step 2"):
        train.train_and_evaluate(config, workdir, allow_changes="optim.lr")
    steps = sorted(int(p) for p in os.listdir(tmp_path / "resumed" / "checkpoints"))
    assert steps == [1, 2]
    for step in steps:
        params, _, _ = checkpoint.load_model(workdir, step=step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def _count_train_step_compiles():
    """A list that grows by one per XLA compilation of the train step (JAX's own events)."""
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and \
                "train_step" in str(kwargs.get("fun_name", "")):
            compiles.append(kwargs["fun_name"])
    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiles, listener


@pytest.mark.slow
def test_resume_drops_metrics_past_the_restored_step(train_files, tmp_path, monkeypatch):
    """A run killed after step 6 (checkpoint at 4) resumes from 4: steps 5 and 6 are logged once.
    The resumed run compiles its train step exactly once."""
    def crash_at_7(step, batch):
        if step == 7:
            raise RuntimeError("simulated kill")
        return batch

    _wrap_iterator(monkeypatch, crash_at_7)
    config = tiny_config(train_files, total_steps=8, checkpoint_every=4)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train.train_and_evaluate(config, str(tmp_path))
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    monkeypatch.undo()
    compiles, listener = _count_train_step_compiles()
    try:
        train.train_and_evaluate(tiny_config(train_files, total_steps=8, checkpoint_every=4),
                                 str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert [m["step"] for m in read_metrics(str(tmp_path))] == list(range(1, 9))
    assert len(compiles) == 1, compiles


@pytest.mark.slow
def test_resume_with_other_settings_stops_and_names_each(train_files, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(train_files), data)
    files = str(data / "*.tfrecord")
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(files, total_steps=4, stop_at_step=2), workdir)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()

    changed = tiny_config(files, total_steps=5, batch_size=16, seed=3, **{
        "model.depth": 3, "optim.warmup_steps": 1, "data.n_img": 3})
    with pytest.raises(resume.ResumeMismatch) as error:
        train.train_and_evaluate(changed, workdir)
    message = str(error.value)
    for line in ("batch_size: 8 -> 16", "seed: 0 -> 3", "total_steps: 4 -> 5",
                 "model.depth: 2 -> 3", "optim.warmup_steps: 2 -> 1", "data.n_img: 2 -> 3"):
        assert line in message, message
    assert "stop_at_step" not in message          # bookkeeping keys may change
    assert "--resume_allow_changes=" in message

    # A shard added to the glob since the run started changes the data stream too.
    first = sorted(p for p in os.listdir(data) if p.endswith(".tfrecord"))[0]
    shutil.copy(data / first, data / "train-extra.tfrecord")
    with pytest.raises(resume.ResumeMismatch, match=r"data.files.*1 shard\(s\) added: "
                                                    r"train-extra.tfrecord"):
        train.train_and_evaluate(tiny_config(files, total_steps=4), workdir)
    # Nothing was written by the refused runs.
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]
    # Allowed explicitly, the run goes on from step 2.
    result = train.train_and_evaluate(tiny_config(files, total_steps=4), workdir,
                                      allow_changes="data.files")
    assert result.step == 4


@pytest.mark.slow
def test_metrics_and_tensorboard_go_to_a_url_workdir(train_files, tmp_path, ram_dir):
    """ram:// stands in for gs://: metrics.jsonl and TensorBoard through tf.io.gfile, nothing
    in a local folder named 'ram:' (orbax cannot write ram://, so checkpoints stay local)."""
    monkey_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        train.train_and_evaluate(tiny_config(train_files, total_steps=3), ram_dir,
                                 checkpoint_workdir=str(tmp_path / "ckpt"))
    finally:
        os.chdir(monkey_cwd)
    assert [m["step"] for m in read_metrics(ram_dir)] == [1, 2, 3]
    assert tf.io.gfile.listdir(f"{ram_dir}/tensorboard")
    assert not os.path.exists(tmp_path / "ram:")
    assert os.listdir(tmp_path / "ckpt" / "checkpoints") == ["3"]


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
    # Achieved model TFLOP/s per chip, from the model's FLOP count (flops.py), not XLA's.
    per_chip = train.model_flops_per_step(config) / jax.device_count()
    assert metrics[-1]["tflops_per_sec"] == pytest.approx(
        per_chip / metrics[-1]["step_time"] / 1e12, rel=1e-6)
    assert "mfu" not in metrics[-1]           # a CPU has no data-sheet peak
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
        TrainSet.resolve(str(tmp_path / "none-*.tfrecord"))
    with pytest.raises(ValueError, match="preemption_check_every=0"):
        config = tiny_config("x")
        config.preemption_check_every = 0
        train.check_config(config)
    with pytest.raises(ValueError, match=r"keep_checkpoints=0: must be >= 1 .* or -1"):
        train.check_config(tiny_config("x", keep_checkpoints=0))
    train.check_config(tiny_config("x", keep_checkpoints=-1))    # keeps every checkpoint
    with pytest.raises(ValueError, match=r"total_steps=-5: must be > 0 \(the run's length in "
                                         r"steps; 0: set by epochs\)"):
        train.check_config(tiny_config("x", total_steps=-5))
    with pytest.raises(ValueError, match=r"stop_at_step=-1: must be > 0"):
        train.check_config(tiny_config("x", stop_at_step=-1))
    for bad in (0, -8):
        with pytest.raises(ValueError, match=rf"batch_size={bad} \(captions per global batch\): "
                                             r"must be positive, a multiple of the 8 devices"):
            train.check_config(tiny_config("x", batch_size=bad))


def test_train_set_counts_from_manifests_and_reads_only_unlisted_shards(train_files, tmp_path):
    """Counts come from manifest.json; a shard no manifest lists is counted by reading it."""
    source = os.path.dirname(train_files)
    dataset = TrainSet.resolve(train_files)
    assert dataset.num_records == 32
    bare = tmp_path / "bare"
    bare.mkdir()
    first = sorted(f for f in os.listdir(source) if f.endswith(".tfrecord"))[0]
    shutil.copy(os.path.join(source, first), bare / first)
    want = dict(dataset.fingerprint())[first]
    assert TrainSet.resolve(str(bare / "*.tfrecord")).counts == (want,)
    shutil.copy(os.path.join(source, "manifest.json"), bare / "manifest.json")
    with open(bare / "extra.tfrecord", "wb") as f:
        f.write(b"not a TFRecord file")
    with pytest.raises(ValueError, match="extra.tfrecord: cannot be read as a TFRecord"):
        TrainSet.resolve(str(bare / "*.tfrecord"))


def test_train_set_reads_manifests_on_other_filesystems(train_files, ram_dir):
    """ram:// stands in for gs://: both go through tf.io.gfile, never os.path."""
    source = os.path.dirname(train_files)
    tf.io.gfile.makedirs(ram_dir)
    for name in os.listdir(source):
        tf.io.gfile.copy(os.path.join(source, name), f"{ram_dir}/{name}")
    assert TrainSet.resolve(f"{ram_dir}/*.tfrecord").num_records == 32


@pytest.mark.slow
def test_train_resolves_the_data_set_once(train_files, tmp_path, monkeypatch):
    """One glob of data.train_files per run: the schedule, the resume check (the fingerprint in
    the checkpoint) and the input pipeline share one TrainSet."""
    globs = []
    real_glob = tf.io.gfile.glob

    def glob(pattern):
        globs.append(pattern)
        return real_glob(pattern)
    monkeypatch.setattr(tf.io.gfile, "glob", glob)
    result = train.train_and_evaluate(tiny_config(train_files, total_steps=2), str(tmp_path))
    assert result.step == 2 and globs.count(train_files) == 1
    from stablerep_jax import checkpoint
    meta = checkpoint.TrainCheckpointer(str(tmp_path)).restore_meta(2)
    assert meta[resume.META_DATA_FILES] == TrainSet.resolve(train_files).fingerprint()


@pytest.mark.slow
def test_knn_monitor_logs_accuracy_during_training(train_files, tmp_path):
    from stablerep_jax.demo import toy_world
    folder = str(tmp_path / "knn_folder")
    toy_world.write_toy_probe_folder(folder, attribute="color", train_per_class=4,
                                     test_per_class=2, image_size=40, seed=0)
    config = tiny_config(train_files, total_steps=4, checkpoint_every=4)
    config.knn.every = 2
    config.knn.dataset = f"folder:{folder}"
    train.train_and_evaluate(config, str(tmp_path / "run"))
    knn_rows = [m for m in read_metrics(str(tmp_path / "run")) if "knn_top1" in m]
    assert [m["step"] for m in knn_rows] == [2, 4]
    # What the monitor logged at step 4 is the k-NN job's result on the step-4 checkpoint.
    from stablerep_jax import knn
    from probe_fixtures import probe_config
    job = knn.run(probe_config(str(tmp_path / "run"), folder, checkpoint_step=4,
                               **{"knn.k": config.knn.k}), str(tmp_path / "knn_job"))
    assert job["num_test"] == 12
    assert knn_rows[1]["knn_top1"] == job["knn_top1"]
    assert knn_rows[1]["knn_top5"] == job["knn_top5"]


# --------------------------------------------------------------------------------------------
# Resume checks and metrics.jsonl, without training


def _meta(config, files=(("a.tfrecord", 8),), processes=1):
    return resume.run_identity(config.to_json_best_effort(), [list(f) for f in files], processes)


def test_check_resume_names_each_change_and_honours_allowed_keys():
    old = tiny_config("d/*.tfrecord")
    new = tiny_config("other/*.tfrecord", **{"optim.blr": 5e-4, "log_every": 7})
    saved = _meta(old)
    with pytest.raises(resume.ResumeMismatch) as error:
        resume.check_resume(saved, new.to_json_best_effort(), [["a.tfrecord", 8]], 1)
    message = str(error.value)
    assert 'data.train_files: "d/*.tfrecord" -> "other/*.tfrecord"' in message
    assert "optim.blr: 0.001 -> 0.0005" in message
    assert "log_every" not in message
    assert "--resume_allow_changes=data.train_files,optim.blr" in message
    resume.check_resume(saved, new.to_json_best_effort(), [["a.tfrecord", 8]], 1,
                        allowed=resume.parse_allowed("data.train_files, optim"))


def test_check_resume_detects_new_shards_recounts_and_host_count():
    config = tiny_config("d/*.tfrecord")
    saved = _meta(config, files=[("a.tfrecord", 8), ("b.tfrecord", 8)], processes=2)
    same = config.to_json_best_effort()
    resume.check_resume(saved, same, [["a.tfrecord", 8], ["b.tfrecord", 8]], 2)
    with pytest.raises(resume.ResumeMismatch, match=r"1 shard\(s\) added: c.tfrecord"):
        resume.check_resume(saved, same, [["a.tfrecord", 8], ["b.tfrecord", 8],
                                          ["c.tfrecord", 3]], 2)
    with pytest.raises(resume.ResumeMismatch, match=r"b.tfrecord: 8 -> 9 records"):
        resume.check_resume(saved, same, [["a.tfrecord", 8], ["b.tfrecord", 9]], 2)
    with pytest.raises(resume.ResumeMismatch, match=r"process_count .*: 2 -> 4"):
        resume.check_resume(saved, same, [["a.tfrecord", 8], ["b.tfrecord", 8]], 4)
    resume.check_resume(saved, same, [["a.tfrecord", 8]], 4, allowed=("data.files", "process_count"))
    # A checkpoint of another layout, without the entries these checks read: one error.
    with pytest.raises(resume.ResumeMismatch, match=r"the checkpoint records no train_config, "
                       r"data_files, process_count in its meta \(it has: step\).*new --workdir"):
        resume.check_resume({"step": 3}, same, [], 7)


def test_metric_writer_drops_rows_past_the_restored_step(tmp_path):
    from stablerep_jax.metrics import MetricWriter
    writer = MetricWriter(str(tmp_path), tensorboard=False, enabled=True)
    for step in range(1, 7):
        writer.write(step, {"loss": float(step)})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')                   # a line cut short by kill -9
    writer = MetricWriter(str(tmp_path), tensorboard=False, enabled=True, keep_through_step=4)
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    writer.write(5, {"loss": 0.5})
    writer.close()
    assert [m["step"] for m in read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5]
    assert [name for name in os.listdir(tmp_path) if name != "metrics.jsonl"] == []   # no temp


def test_metric_writer_on_a_url(ram_dir):
    from stablerep_jax.metrics import MetricWriter
    writer = MetricWriter(ram_dir, enabled=True, keep_through_step=0)
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 0.5})
    writer.close()
    writer = MetricWriter(ram_dir, enabled=True, keep_through_step=1)
    writer.write(2, {"loss": 0.25})
    writer.close()
    assert read_metrics(ram_dir) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.25}]
    assert tf.io.gfile.listdir(f"{ram_dir}/tensorboard")


def test_a_run_saved_with_another_config_layout_is_refused_naming_each_key():
    """No upgrade path for saved configs: a key the checkpoint has and this version does not,
    or the other way round, is a change like any other, and the error says which side lacks
    it (here a run saved while the crop size was data.image_size alone and the colour stage
    had its data.augment_on_device switch)."""
    config = tiny_config("d/*.tfrecord")
    saved = json.loads(config.to_json_best_effort())
    del saved["model"]["image_size"]
    saved["data"]["augment_on_device"] = True
    identity = resume.run_identity(json.dumps(saved), [["a.tfrecord", 8]], 1)
    with pytest.raises(resume.ResumeMismatch) as error:
        resume.check_resume(identity, config.to_json_best_effort(), [["a.tfrecord", 8]], 1)
    message = str(error.value)
    assert ("data.augment_on_device: true -> <absent> (not a key of this version's config)"
            in message)
    assert "model.image_size: <absent> -> 32 (the checkpoint's config has no such key)" in message
    assert "--resume_allow_changes=data.augment_on_device,model.image_size" in message


def test_resume_with_fewer_kept_checkpoints_warns_that_older_ones_go(caplog):
    """keep_checkpoints may change on resume, but not silently: a smaller value deletes the
    older checkpoints at the next save, and the log says so."""
    saved = _meta(tiny_config("d/*.tfrecord", keep_checkpoints=10))
    caplog.set_level("INFO")
    resume.check_resume(saved, tiny_config("d/*.tfrecord", keep_checkpoints=2).to_json_best_effort(),
                        [["a.tfrecord", 8]], 1)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("keep_checkpoints 10 -> 2: the next save deletes all but the newest 2" in w
               for w in warnings), warnings


def test_a_convert_output_as_workdir_is_named_not_a_key_error(train_files, tmp_path):
    from stablerep_jax import checkpoint
    checkpoint.save_model(tmp_path, 0, {"w": np.ones(3, np.float32)}, {}, {"image_size": 32})
    with pytest.raises(ValueError, match=r"checkpoints/0 is not a train checkpoint.*"
                                         rf"--config.init_from={tmp_path} and a new"):
        train.train_and_evaluate(tiny_config(train_files, total_steps=2), str(tmp_path))
