"""The model, loss, optimizer, checkpoints and the jitted train step import and run without
TensorFlow (the accelerator image has none): a subprocess in which `import tensorflow` fails
builds the step, runs it on an 8-device mesh, saves a train checkpoint and restores it, and
writes a local file through fileio."""
import os
import subprocess
import sys
import textwrap

from processes import without_tensorflow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_STEP_AND_CHECKPOINT = textwrap.dedent("""
    import sys
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("tensorflow imported: the hook did not take")

    import jax
    import numpy as np

    from stablerep_jax import (checkpoint, config_utils, flops, losses, optim, parallel,
                               resume, train_step, xla_flags)
    from stablerep_jax.data import device_augment, recipe
    from stablerep_jax.models import attention, encoder, heads, text, vit

    config = config_utils.load_config("configs/stablerep.py:tiny")
    config.batch_size = 8
    mesh = parallel.make_mesh()
    parts = train_step.build_training(config, mesh, total_steps=10, steps_per_epoch=0)
    state = parts.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    views = config.data.n_img
    params = np.zeros((8, views, recipe.NUM_PARAMS), np.float32)
    params[..., recipe.P_FACTORS] = 1.0
    batch = {"images": rng.integers(0, 256, (8, views, 32, 32, 3), dtype=np.uint8),
             recipe.PARAMS_KEY: params, "labels": np.arange(8, dtype=np.int32)}
    state, metrics = parts.step_fn(state, parallel.global_batch(mesh, batch))
    loss = float(metrics["loss"])
    assert int(state.step) == 1 and np.isfinite(loss), loss
    assert train_step.model_flops_per_step(config) > 0

    workdir = sys.argv[1]
    meta = resume.run_identity(config.to_json_best_effort(), [["a.tfrecord", 8]], 1)
    ckpt = checkpoint.TrainCheckpointer(workdir)
    ckpt.save(1, state, config.model.to_dict(), meta)
    ckpt.close()
    ckpt = checkpoint.TrainCheckpointer(workdir)
    assert ckpt.latest_step() == 1
    resume.check_resume(ckpt.restore_meta(1), config.to_json_best_effort(),
                        [["a.tfrecord", 8]], 1)
    restored = ckpt.restore(1, parts.abstract_state, parts.shardings)
    ckpt.close()
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    model_params, _, model_config = checkpoint.load_model(workdir)
    assert model_config["variant"] == "tiny"
    state, _ = parts.step_fn(restored, parallel.global_batch(mesh, batch))
    assert int(state.step) == 2
    # Local outputs go through fileio without TensorFlow; a URL says what it would need.
    from stablerep_jax import fileio
    path = fileio.write_json_atomic(workdir + "/out/result.json", {"loss": loss})
    assert fileio.read_json(path) == {"loss": loss} and fileio.isfile(path)
    try:
        fileio.makedirs("gs://bucket/run")
    except ModuleNotFoundError as e:
        assert "TensorFlow is not installed" in str(e), e
    else:
        raise AssertionError("a gs:// path without TensorFlow did not fail")
    hidden = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
    assert not hidden, hidden
    print("ran without tensorflow; loss", loss)
""")


def test_train_step_and_checkpoints_run_without_tensorflow(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _STEP_AND_CHECKPOINT, str(tmp_path / "run")],
                          cwd=REPO, env=without_tensorflow(dict(os.environ)),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ran without tensorflow" in proc.stdout


def test_the_hook_really_hides_tensorflow():
    """The same environment makes a TF-using module fail to import (the hook works), while
    nothing under the train step needs it."""
    proc = subprocess.run([sys.executable, "-c", "import stablerep_jax.data.pipeline"], cwd=REPO,
                          env=without_tensorflow(dict(os.environ)), capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert "No module named 'tensorflow'" in proc.stderr
