"""convert + checkpoint: released `.pth` layouts import with exact features, bad files fail with
messages naming keys, and model checkpoints round-trip from any of the accepted paths."""
import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from stablerep_jax import checkpoint, config_utils, convert, parallel
from stablerep_jax.models.encoder import StableRepModel, build_model

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from stablerep_jax.testing import torch_reference as tref  # noqa: E402  (needs torch)

pytestmark = pytest.mark.torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, DEPTH, MLP, EMB = 32, 2, 32, 16
VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS, EMBED = 64, 12, 32, 1, 4, 24





def tiny_vit(seed=0, num_classes=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes,
                              img_size=SIZE, depth=DEPTH)
    return tref.randomize_(model, seed).eval()


def released_state_dict(visual, head, module_prefix=True, text=None):
    """The reference's `model.state_dict()` of a DDP-wrapped VisionEncoder (or ...TextEncoder)."""
    sd = {**visual.state_dict(prefix="visual."), **head.state_dict(prefix="image_mlp.")}
    if text is not None:
        sd.update(text)
    prefix = "module." if module_prefix else ""
    return {prefix + k: v.clone() for k, v in sd.items()}


def save_pth(path, state_dict, wrap=True):
    obj = state_dict
    if wrap:   # the reference's training checkpoint (util/misc.py save_model)
        obj = {"model": state_dict, "epoch": 14, "optimizer": {"state": {}, "param_groups": []},
               "args": argparse.Namespace(model="base", ssl_mlp_dim=MLP)}
    torch.save(obj, path)
    return str(path)


def convert_config(pth, output_dir, **overrides):
    config = config_utils.load_config(os.path.join(REPO, "configs", "convert.py") + ":tiny")
    config.pth, config.output_dir = pth, str(output_dir)
    config.model.image_size, config.model.mlp_dim, config.model.emb_dim = SIZE, MLP, EMB
    config_utils.apply_overrides(config, overrides)
    return config


def images_nchw(n=3, seed=1):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def encode(params, batch_stats, model_config, x_nchw):
    model = build_model(model_config)
    x = np.ascontiguousarray(x_nchw.numpy().transpose(0, 2, 3, 1))
    return model.apply({"params": params, "batch_stats": batch_stats}, x,
                       method=StableRepModel.encode_image)


@pytest.fixture(scope="module")
def visual_and_head():
    visual = tiny_vit(seed=3)
    head = tref.randomize_(tref.projection_head(192, MLP, EMB), 3).eval()
    return visual, head


def test_released_layout_converts_and_matches_timm(close, tmp_path, visual_and_head):
    visual, head = visual_and_head
    pth = save_pth(tmp_path / "released.pth", released_state_dict(visual, head))
    step_dir = convert.run(convert_config(pth, tmp_path / "out"))
    assert step_dir.endswith(os.path.join("checkpoints", "0"))

    params, batch_stats, model_config = checkpoint.load_model(tmp_path / "out")
    assert model_config["variant"] == "tiny" and model_config["depth"] == DEPTH
    assert model_config["image_size"] == SIZE and not model_config["add_language"]
    # The layout train writes: its model section's fields, image_size among them.
    train_model = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py")).model
    assert set(model_config) == set(train_model.keys())
    x = images_nchw()
    with torch.no_grad():
        ref_cls = visual(x)
        ref_feats = head(ref_cls).numpy()
    close(encode(params, batch_stats, model_config, x), ref_cls.numpy(), 1e-4)
    # The head (weights and running statistics) came across too: eval-mode features match.
    model = build_model(model_config)
    images = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))[:, None]
    out = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    close(out["feats"], ref_feats, 1e-4)


def test_plain_timm_state_dict_gets_a_random_head(close, tmp_path):
    visual = tiny_vit(seed=4, num_classes=10)          # a classifier: head.* is ignored
    pth = save_pth(tmp_path / "timm.pth", visual.state_dict(), wrap=False)
    convert.run(convert_config(pth, tmp_path / "out", seed=5))
    params, batch_stats, model_config = checkpoint.load_model(tmp_path / "out" / "checkpoints")
    x = images_nchw(seed=6)
    with torch.no_grad():
        ref = visual.forward_features(x)[:, 0]          # CLS after the final norm
    close(encode(params, batch_stats, model_config, x), ref.numpy(), 1e-4)
    assert params["image_mlp"]["layer1"]["kernel"].shape == (192, MLP)
    assert np.std(params["image_mlp"]["layer1"]["kernel"]) > 0


def test_stablerep_pp_layout_imports_text_tower(close, tmp_path, visual_and_head):
    visual, head = visual_and_head
    torch.manual_seed(7)
    text = tref.randomize_(tref.TextEncoder(VOCAB, CONTEXT, TWIDTH, TDEPTH, THEADS), 7).eval()
    extra = dict(text.state_dict())
    extra["image_projection"] = torch.randn(192, EMBED) * 0.1
    extra["text_projection"] = torch.randn(TWIDTH, EMBED) * 0.1
    extra["logit_scale"] = torch.tensor(np.log(1 / 0.05), dtype=torch.float32)
    pth = save_pth(tmp_path / "pp.pth", released_state_dict(visual, head, text=extra))
    convert.run(convert_config(pth, tmp_path / "out", **{"model.text_heads": THEADS}))
    step_dir = tmp_path / "out" / "checkpoints" / "0"
    params, batch_stats, model_config = checkpoint.load_model(step_dir)
    assert model_config["add_language"] and model_config["embed_dim"] == EMBED
    assert (model_config["text_depth"], model_config["context_length"]) == (TDEPTH, CONTEXT)

    tokens = np.zeros((2, CONTEXT), np.int64)
    tokens[0, :5] = [5, 9, 2, 7, VOCAB - 1]
    tokens[1, :3] = [3, 4, VOCAB - 1]
    x = images_nchw(n=2, seed=8)
    with torch.no_grad():
        ref_text = (text(torch.from_numpy(tokens)) @ extra["text_projection"]).numpy()
        ref_image = (visual(x) @ extra["image_projection"]).numpy()
    model = build_model(model_config)
    images = np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1))[:, None]
    out = model.apply({"params": params, "batch_stats": batch_stats}, images,
                      jnp.asarray(tokens, jnp.int32), train=False)
    close(out["text_emb"], ref_text, 1e-4)
    close(out["image_emb"], ref_image, 1e-4)
    np.testing.assert_allclose(out["logit_scale"], 1 / 0.05, rtol=1e-5)

    # Image-only import of the same file: the text keys are known and skipped.
    convert.run(convert_config(pth, tmp_path / "image_only", import_text=False))
    params, _, model_config = checkpoint.load_model(tmp_path / "image_only")
    assert not model_config["add_language"] and "text" not in params


def test_unknown_and_missing_keys_are_listed(tmp_path, visual_and_head):
    visual, head = visual_and_head
    sd = released_state_dict(visual, head)
    extra = dict(sd, **{"module.visual.blocks.0.attn.extra_gate": torch.zeros(3)})
    with pytest.raises(KeyError, match=r"unknown keys.*visual\.blocks\.0\.attn\.extra_gate"):
        convert.run(convert_config(save_pth(tmp_path / "extra.pth", extra), tmp_path / "o1"))
    missing = {k: v for k, v in sd.items() if k != "module.image_mlp.bn2.running_var"}
    with pytest.raises(KeyError, match=r"missing keys.*image_mlp\.bn2\.running_var"):
        convert.run(convert_config(save_pth(tmp_path / "missing.pth", missing), tmp_path / "o2"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_shape_mismatch_names_the_key(tmp_path, visual_and_head):
    visual, head = visual_and_head
    pth = save_pth(tmp_path / "r.pth", released_state_dict(visual, head))
    with pytest.raises(ValueError, match=r"image_mlp\.layer1\.weight"):
        convert.run(convert_config(pth, tmp_path / "o", **{"model.mlp_dim": 2 * MLP}))
    with pytest.raises(ValueError, match=r"variant='small'.*--config\.model\.variant=tiny"):
        convert.run(convert_config(pth, tmp_path / "o", **{"model.variant": "small"}))
    with pytest.raises(ValueError, match=r"pos_embed.*model\.image_size=64"):
        convert.run(convert_config(pth, tmp_path / "o", **{"model.image_size": 64}))


def test_load_model_paths_steps_and_partial_restore(tmp_path):
    mesh = parallel.make_mesh()
    # A sharded device array (as `train` holds them) comes back as a host numpy array.
    params = {"dense": {"kernel": jax.device_put(np.arange(16, dtype=np.float32).reshape(8, 2),
                                                 parallel.batch_sharded(mesh))}}
    stats = {"bn": {"mean": np.ones(3, np.float32)}}
    config = {"variant": "tiny", "image_size": 32, "down_res": (64, 128)}
    checkpoint.save_model(tmp_path, 1, params, stats, config)
    # A later step written with more items, as `train` does (optimizer state etc.).
    manager = ocp.CheckpointManager(checkpoint.checkpoints_dir(tmp_path))
    manager.save(5, args=ocp.args.Composite(
        opt_state=ocp.args.StandardSave({"mu": jnp.zeros(4)}),
        **checkpoint.model_save_args({"dense": {"kernel": np.full((2, 3), 7, np.float32)}},
                                     stats, config)))
    manager.wait_until_finished()
    manager.close()

    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
        got, got_stats, got_config = checkpoint.load_model(path)
        assert isinstance(got["dense"]["kernel"], np.ndarray)
        np.testing.assert_array_equal(got["dense"]["kernel"], np.full((2, 3), 7))
        np.testing.assert_array_equal(got_stats["bn"]["mean"], stats["bn"]["mean"])
        assert got_config == {"variant": "tiny", "image_size": 32, "down_res": [64, 128]}
    old, _, _ = checkpoint.load_model(tmp_path, step=1)
    assert isinstance(old["dense"]["kernel"], np.ndarray)
    np.testing.assert_array_equal(old["dense"]["kernel"], np.arange(16).reshape(8, 2))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        checkpoint.load_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="step 3"):
        checkpoint.load_model(tmp_path, step=3)


def test_merge_matching_checks_paths_and_shapes():
    target = {"a": {"w": jnp.zeros((2, 2))}, "b": jnp.zeros(3)}
    merged = checkpoint.merge_matching(target, {"a": {"w": np.ones((2, 2))}, "b": np.ones(3)})
    np.testing.assert_array_equal(merged["a"]["w"], np.ones((2, 2)))
    with pytest.raises(ValueError, match="missing in ckpt: b"):
        checkpoint.merge_matching(target, {"a": {"w": np.ones((2, 2))}}, source_name="ckpt")
    kept = checkpoint.merge_matching(target, {"a": {"w": np.ones((2, 2))}}, allow_missing=True)
    np.testing.assert_array_equal(kept["b"], np.zeros(3))
    with pytest.raises(ValueError, match=r"a/w: .* \(3, 2\)"):
        checkpoint.merge_matching(target, {"a": {"w": np.ones((3, 2))}, "b": np.ones(3)})


def test_command_line(tmp_path, visual_and_head):
    visual, head = visual_and_head
    pth = save_pth(tmp_path / "r.pth", released_state_dict(visual, head, module_prefix=False))
    cmd = [sys.executable, "-m", "stablerep_jax.convert",
           f"--config={os.path.join(REPO, 'configs', 'convert.py')}:tiny",
           f"--config.pth={pth}", f"--config.output_dir={tmp_path / 'out'}",
           f"--config.model.image_size={SIZE}", f"--config.model.mlp_dim={MLP}",
           f"--config.model.emb_dim={EMB}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    params, _, _ = checkpoint.load_model(tmp_path / "out")
    with torch.no_grad():
        ref = visual.cls_token.numpy().reshape(-1)
    np.testing.assert_array_equal(params["visual"]["cls_token"].reshape(-1), ref)


def test_output_dir_that_orbax_cannot_write_is_refused_first(tmp_path, ram_dir):
    """ram:// (like any URL TensorStore has no driver for) would put the arrays in a local
    folder named 'ram:'; the job stops before reading anything, naming the config key."""
    with pytest.raises(ValueError, match=r"output_dir='ram://.*local path or a gs:// / s3://"):
        convert.run(convert_config(str(tmp_path / "not_read.pth"), ram_dir))
    assert not os.path.exists("ram:") and not (tmp_path / "ram:").exists()


def test_pth_is_read_from_a_url(tmp_path, ram_dir, visual_and_head):
    """The released weights may sit in a bucket: the .pth is read through tf.io.gfile (here
    ram://, the same code path as gs://); the checkpoint itself stays local."""
    import tensorflow as tf
    visual, head = visual_and_head
    local = save_pth(tmp_path / "r.pth", released_state_dict(visual, head))
    url = ram_dir + "/weights/r.pth"
    tf.io.gfile.makedirs(ram_dir + "/weights")
    tf.io.gfile.copy(local, url)
    convert.run(convert_config(url, tmp_path / "out"))
    params, _, _ = checkpoint.load_model(tmp_path / "out")
    np.testing.assert_array_equal(params["visual"]["cls_token"].reshape(-1),
                                  visual.cls_token.detach().numpy().reshape(-1))
    with pytest.raises(FileNotFoundError, match="none.pth"):
        convert.run(convert_config(ram_dir + "/weights/none.pth", tmp_path / "out2"))


@pytest.mark.slow
def test_two_hosts_write_one_checkpoint(tmp_path, visual_and_head):
    """Two hosts of a (simulated SLURM) cluster run the command line: the job joins
    jax.distributed, every process calls the save and orbax writes the checkpoint once; a
    second run stops on every process alike (nobody is left waiting inside a save)."""
    from processes import run_processes
    visual, head = visual_and_head
    pth = save_pth(tmp_path / "r.pth", released_state_dict(visual, head))
    args = [os.path.join(REPO, "tests", "multiprocess_writers.py"), 2, "convert", "convert.py:tiny",
            f"--config.pth={pth}", f"--config.output_dir={tmp_path / 'out'}",
            f"--config.model.image_size={SIZE}", f"--config.model.mlp_dim={MLP}",
            f"--config.model.emb_dim={EMB}"]
    outputs = run_processes(*args)
    for i, output in enumerate(outputs):
        assert "exit code 0" in output and f"process {i} of 2" in output, output[-3000:]
    params, batch_stats, model_config = checkpoint.load_model(tmp_path / "out")
    with torch.no_grad():
        x = images_nchw()
        ref = visual(x).numpy()
    np.testing.assert_allclose(encode(params, batch_stats, model_config, x), ref, atol=1e-4)
    for output in run_processes(*args):
        assert "already exists" in output and "exit code 1" in output, output[-3000:]


@pytest.mark.slow
def test_a_host_that_cannot_read_the_weights_stops_every_host(tmp_path, visual_and_head):
    """Host 1 lacks the .pth: it names the file, host 0 stops too instead of waiting inside
    orbax's save for host 1, and nothing is written."""
    from processes import run_processes
    visual, head = visual_and_head
    pth = save_pth(tmp_path / "r.pth", released_state_dict(visual, head))
    outputs = run_processes(
        os.path.join(REPO, "tests", "multiprocess_writers.py"), 2, "convert", "convert.py:tiny",
        f"--config.pth={pth}", f"--config.output_dir={tmp_path / 'out'}",
        f"--config.model.image_size={SIZE}", f"--config.model.mlp_dim={MLP}",
        f"--config.model.emb_dim={EMB}",
        f"@1:--config.pth={tmp_path / 'elsewhere.pth'}", timeout=300)
    assert "exit code 1" in outputs[1] and "elsewhere.pth" in outputs[1], outputs[1][-3000:]
    assert "exit code 1" in outputs[0] and "process(es) [1] failed" in outputs[0], \
        outputs[0][-3000:]
    assert not (tmp_path / "out" / "checkpoints" / "0").exists()
