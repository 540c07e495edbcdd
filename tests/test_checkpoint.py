"""checkpoint: one layout (WORKDIR/checkpoints/<step>), read through the orbax manager's public
API. Train-style and convert-style saves load alike; a step a kill left unfinished is never read;
missing paths and steps fail with messages naming them; the probe head round-trips on any
filesystem."""
import os
import subprocess
import sys
import textwrap

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf
from etils import epath

from stablerep_jax import checkpoint, fileio, parallel

MODEL_CONFIG = {"variant": "tiny", "depth": 1, "image_size": 32, "down_res": (64, 128)}
SAVED_CONFIG = {"variant": "tiny", "depth": 1, "image_size": 32, "down_res": [64, 128]}


@flax.struct.dataclass
class State:
    """The fields `TrainCheckpointer` reads and writes (train's TrainState has these too)."""
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: dict


def params_of(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": rng.normal(size=(8, 4)).astype(np.float32),
                      "bias": rng.normal(size=(8,)).astype(np.float32)}}


STATS = {"bn": {"mean": np.arange(3, dtype=np.float32), "var": np.ones(3, np.float32)}}


def assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        assert isinstance(g, np.ndarray)
        np.testing.assert_array_equal(g, w)


def train_save(workdir, step: int, params: dict, keep: int = 3) -> None:
    """Writes `step` as `train` does: sharded device arrays, async, with opt_state and meta."""
    mesh = parallel.make_mesh()
    on_devices = jax.device_put(params, parallel.batch_sharded(mesh))
    state = State(step=np.int32(step), params=on_devices, batch_stats=STATS,
                  opt_state={"mu": jax.tree_util.tree_map(np.zeros_like, params)})
    ckpt = checkpoint.TrainCheckpointer(workdir, keep=keep)
    try:
        ckpt.save(step, state, MODEL_CONFIG, {"config": {"seed": 0}})
    finally:
        ckpt.close()


def test_train_and_convert_saves_load_alike(tmp_path):
    train_save(tmp_path / "run", 4, params_of(1))
    checkpoint.save_model(tmp_path / "converted", 0, params_of(2), {}, MODEL_CONFIG)

    for path, step in ((tmp_path / "run", None), (tmp_path / "run" / "checkpoints", None),
                       (tmp_path / "run" / "checkpoints" / "4", None), (tmp_path / "run", 4)):
        params, stats, config = checkpoint.load_model(path, step)
        assert_trees_equal(params, params_of(1))
        assert_trees_equal(stats, STATS)
        assert config == SAVED_CONFIG
    params, stats, config = checkpoint.load_model(os.fspath(tmp_path / "converted"))
    assert_trees_equal(params, params_of(2))
    assert stats == {} and config == SAVED_CONFIG
    assert checkpoint.resolve_step_dir(tmp_path / "converted") == \
        checkpoint.checkpoints_dir(tmp_path / "converted") / "0"

    # The train checkpointer reads its own step back into device shardings, meta included.
    mesh = parallel.make_mesh()
    abstract = State(step=np.int32(0), params=params_of(9), batch_stats=STATS,
                     opt_state={"mu": params_of(9)})
    shardings = jax.tree_util.tree_map(lambda _: parallel.replicated(mesh), abstract)
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "run")
    try:
        assert ckpt.latest_step() == 4
        assert ckpt.restore_meta(4) == {"config": {"seed": 0}, "step": 4}
        state = ckpt.restore(4, abstract, shardings)
    finally:
        ckpt.close()
    assert int(state.step) == 4
    assert_trees_equal(jax.tree_util.tree_map(np.asarray, state.params), params_of(1))


def test_reading_writes_nothing(tmp_path):
    """Readers are read-only: a probe may read a run's checkpoints while it trains."""
    train_save(tmp_path, 2, params_of(1))

    def listing():
        return sorted(os.path.relpath(os.path.join(d, f), tmp_path)
                      for d, _, files in os.walk(tmp_path) for f in files + [""])

    before = listing()
    checkpoint.load_model(tmp_path)
    checkpoint.resolve_step_dir(tmp_path, 2)
    assert listing() == before


KILLED_SAVE = textwrap.dedent("""
    import os, sys
    import numpy as np
    import orbax.checkpoint as ocp
    from stablerep_jax import checkpoint
    manager = ocp.CheckpointManager(
        checkpoint.checkpoints_dir(sys.argv[1]),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True))
    big = {"dense": {"kernel": np.ones((4096, 4096), np.float32)}}   # 64 MB: still writing
    manager.save(2, args=ocp.args.Composite(
        **checkpoint.model_save_args(big, {}, {"image_size": 32})))
    os._exit(0)                                    # killed before the write finished
""")


def test_unfinished_step_is_never_returned(tmp_path):
    checkpoint.save_model(tmp_path, 1, params_of(1), STATS, MODEL_CONFIG)
    subprocess.run([sys.executable, "-c", KILLED_SAVE, os.fspath(tmp_path)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if n != "1"]
    assert leftovers and all(n.startswith("2") and n != "2" for n in leftovers), leftovers

    assert checkpoint.finished_steps(tmp_path) == [1]
    params, _, _ = checkpoint.load_model(tmp_path)
    assert_trees_equal(params, params_of(1))
    with pytest.raises(FileNotFoundError, match=r"no step 2 in .*checkpoints; finished steps "
                                                r"there: \[1\]"):
        checkpoint.load_model(tmp_path, step=2)
    ckpt = checkpoint.TrainCheckpointer(tmp_path)
    try:
        assert ckpt.latest_step() == 1
    finally:
        ckpt.close()


def test_missing_checkpoints_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint path .*nowhere does not exist"):
        checkpoint.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint in .*empty"):
        checkpoint.load_model(tmp_path / "empty")
    (tmp_path / "empty" / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint in .*empty"):
        checkpoint.resolve_step_dir(tmp_path / "empty" / "checkpoints")
    assert checkpoint.finished_steps(tmp_path / "nowhere") == []
    # Another manager's checkpoints (no model items) are not taken for a model.
    with ocp.CheckpointManager(checkpoint.checkpoints_dir(tmp_path / "other")) as manager:
        manager.save(3, args=ocp.args.Composite(meta=ocp.args.JsonSave({"step": 3})))
    with pytest.raises(FileNotFoundError, match=r"checkpoints/3 has no params or model_config "
                                                r"item \(items there: \['meta'\]\)"):
        checkpoint.load_model(tmp_path / "other")


def test_missing_step_lists_the_steps_there(tmp_path):
    for step in (1, 5):
        checkpoint.save_model(tmp_path, step, params_of(step), {}, MODEL_CONFIG)
    assert checkpoint.finished_steps(tmp_path) == [1, 5]
    with pytest.raises(FileNotFoundError, match=r"no step 3 .*finished steps there: \[1, 5\]"):
        checkpoint.load_model(tmp_path, step=3)
    # A step directory that is not there is answered the same way, not "does not exist".
    with pytest.raises(FileNotFoundError, match=r"no step 3 .*\[1, 5\]"):
        checkpoint.load_model(tmp_path / "checkpoints" / "3")
    with pytest.raises(ValueError, match=r"is step 5, but step=1"):
        checkpoint.load_model(tmp_path / "checkpoints" / "5", step=1)
    assert_trees_equal(checkpoint.load_model(tmp_path, step=1)[0], params_of(1))
    assert_trees_equal(checkpoint.load_model(tmp_path)[0], params_of(5))


def test_path_rule_is_by_name():
    root = checkpoint.checkpoints_dir("/runs/a")
    assert root == epath.Path("/runs/a/checkpoints")
    assert checkpoint.locate("/runs/a") == (root, None)
    assert checkpoint.locate("/runs/a", 3) == (root, 3)
    assert checkpoint.locate("/runs/a/checkpoints") == (root, None)
    assert checkpoint.locate("/runs/a/checkpoints/7") == (root, 7)
    assert checkpoint.locate("gs://b/run/checkpoints/7")[1] == 7
    # Digits alone do not make a step: only under a `checkpoints` folder.
    assert checkpoint.locate("/runs/7") == (checkpoint.checkpoints_dir("/runs/7"), None)
    assert checkpoint.locate("rel")[0] == epath.Path(os.path.abspath("rel")) / "checkpoints"


@pytest.mark.parametrize("where", ["local", "ram"])
def test_probe_head_round_trip(tmp_path, ram_dir, where):
    directory = os.fspath(tmp_path) if where == "local" else ram_dir
    path = f"{directory}/best_head.npz"
    head = {"kernel": np.arange(12, dtype=np.float32).reshape(4, 3),
            "bias": np.zeros(3, np.float32), "bn_mean": np.ones(4, np.float32)}
    meta = {"epoch": 3, "top1": 0.5, "class_names": ["a", "b", "c"], "use_bn": True}
    assert checkpoint.save_probe_head(path, head, meta) == path
    got, got_meta = checkpoint.load_probe_head(path)
    assert got_meta == meta and sorted(got) == sorted(head)
    for key in head:
        np.testing.assert_array_equal(got[key], head[key])
        assert got[key].dtype == head[key].dtype
    assert not [n for n in tf.io.gfile.listdir(directory) if n.endswith(fileio.TMP_SUFFIX)]


def test_a_checkpoint_saved_before_image_size_moved_loads_like_a_new_one(tmp_path):
    """Before image_size moved into config.model, train saved the model section with the
    data's image_size added at the top level; today it saves config.model as is. Both load
    into the same encoder, built for the saved size."""
    from stablerep_jax import config_utils, features
    from stablerep_jax.models.encoder import build_model
    model_section = config_utils.load_config(
        os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "stablerep.py")
        + ":tiny").model
    model_section.image_size = 24
    model_section.patch_size = 8
    new_layout = model_section.to_dict()
    old_layout = {**{k: v for k, v in new_layout.items() if k != "image_size"},
                  "image_size": 24}
    variables = build_model(new_layout).init(jax.random.PRNGKey(0),
                                             np.zeros((1, 2, 24, 24, 3), np.float32), train=False)
    images = np.random.default_rng(0).normal(size=(2, 24, 24, 3)).astype(np.float32)
    feats = {}
    for name, layout in (("old", old_layout), ("new", new_layout)):
        checkpoint.save_model(tmp_path / name, 0, variables["params"],
                              variables["batch_stats"], layout)
        encoder = features.load_encoder(str(tmp_path / name))
        assert encoder.image_size == encoder.model.image_size == 24
        feats[name] = encoder.model.apply(encoder.variables, images,
                                          method=type(encoder.model).encode_image)
    np.testing.assert_array_equal(feats["old"], feats["new"])


def test_keep_checkpoints_below_one_is_refused_and_minus_one_keeps_all(tmp_path):
    """keep 0 used to delete each checkpoint as it was written (logging "saved"): it is
    refused with the key's name; -1 (`KEEP_ALL`) keeps every step, n keeps the newest n."""
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=rf"keep_checkpoints={bad!r}: must be >= 1 .* or -1"):
            checkpoint.TrainCheckpointer(tmp_path / "bad", keep=bad)
    assert not (tmp_path / "bad").exists()
    for step in (1, 2, 3):
        train_save(tmp_path / "all", step, params_of(step), keep=checkpoint.KEEP_ALL)
        train_save(tmp_path / "two", step, params_of(step), keep=2)
    assert checkpoint.finished_steps(tmp_path / "all") == [1, 2, 3]
    assert checkpoint.finished_steps(tmp_path / "two") == [2, 3]


def test_a_convert_output_as_train_workdir_says_what_it_is(tmp_path):
    """Used to be orbax's KeyError 'Item "meta" was not found'."""
    checkpoint.save_model(tmp_path / "converted", 0, params_of(2), {}, MODEL_CONFIG)
    ckpt = checkpoint.TrainCheckpointer(tmp_path / "converted")
    try:
        assert ckpt.latest_step() == 0
        with pytest.raises(ValueError, match=r"converted/checkpoints/0 is not a train checkpoint: "
                                             r"it has no 'meta' item .*items there: "
                                             r"model_config, params\), as written by `convert`. "
                                             r"To train from these weights, pass --config.init_"
                                             rf"from={tmp_path}/converted and a new"):
            ckpt.restore_meta(0)
    finally:
        ckpt.close()


def test_a_trainer_removes_what_killed_saves_left(tmp_path):
    """Each kill during a save used to leave a temporary directory of the state's size for
    good; the trainer's manager removes them when it opens (orbax's cleanup_tmp_directories)."""
    checkpoint.save_model(tmp_path, 1, params_of(1), STATS, MODEL_CONFIG)
    subprocess.run([sys.executable, "-c", KILLED_SAVE, os.fspath(tmp_path)], check=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("2")]
    train_save(tmp_path, 3, params_of(3))              # the resumed run's first save
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]
    assert_trees_equal(checkpoint.load_model(tmp_path)[0], params_of(3))
