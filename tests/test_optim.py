"""Optimizer and batch-size rules: the reference's lr scaling and weight-decay groups, and the
batch-size error that a user on a 64/128/256-chip slice meets with the paper's 1376 captions."""
import os

import jax
import jax.numpy as jnp
import pytest

from stablerep_jax import config_utils, optim, parallel
from stablerep_jax.models.encoder import build_model

STABLEREP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "configs", "stablerep.py")


@pytest.mark.parametrize("devices,below,above", [(64, 1344, 1408), (128, 1280, 1408),
                                                 (256, 1280, 1536)])
def test_paper_batch_on_common_slices_names_the_nearest_valid_sizes(devices, below, above):
    with pytest.raises(ValueError) as err:
        parallel.host_local_batch_size(1376, device_count=devices, process_count=devices // 4)
    message = str(err.value)
    assert f"batch_size=1376" in message and f"{devices} devices" in message
    assert f"nearest valid batch sizes are {below} or {above}" in message
    assert "lr = optim.blr x batch_size x data.n_img" in message and "/ 256 / 2" in message
    # Both suggestions are accepted, and each host gets its share.
    for batch in (below, above):
        assert parallel.host_local_batch_size(batch, device_count=devices,
                                              process_count=devices // 4) == batch * 4 // devices


def test_batch_smaller_than_the_slice_names_only_the_slice_size():
    with pytest.raises(ValueError, match=r"nearest valid batch sizes are 64 \("):
        parallel.host_local_batch_size(43, device_count=64, process_count=16)
    # 32 GPUs, as in the paper: 1376 = 43 x 32 is valid; 4 hosts of 8 GPUs read 344 each.
    assert parallel.host_local_batch_size(1376, device_count=32, process_count=4) == 344


def test_this_runs_devices_are_the_default():
    n = jax.device_count()
    assert parallel.host_local_batch_size(3 * n) == 3 * n // jax.process_count()
    with pytest.raises(ValueError, match=f"not divisible by the {n} devices"):
        parallel.host_local_batch_size(3 * n + 1)


def test_learning_rate_scales_with_the_batch_as_the_reference():
    c = config_utils.load_config(STABLEREP + ":vit_b16_cc12m_1x")
    assert optim.peak_learning_rate(c) == pytest.approx(2e-4 * 1376 * 6 / 256 / 2)
    c.batch_size = 1408
    assert optim.peak_learning_rate(c) == pytest.approx(2e-4 * 1408 * 6 / 256 / 2)
    c.optim.lr = 0.03                 # an absolute lr overrides the scaling
    assert optim.peak_learning_rate(c) == 0.03


def test_weight_decay_groups_match_the_reference_rule():
    """misc.add_weight_decay: no decay where ndim < 2 or the name holds 'bias', 'ln' or 'bn'."""
    c = config_utils.load_config(STABLEREP + ":tiny")
    c.model.add_language = True
    model = build_model(c.model)
    params = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((2, 2, 32, 32, 3)), jnp.zeros((2, 77), jnp.int32),
        train=False))["params"]
    mask = optim.decay_mask(params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    masks = dict(jax.tree_util.tree_flatten_with_path(mask)[0])
    decayed = {jax.tree_util.keystr(k) for k, _ in flat if masks[k]}
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        reference_decays = not (leaf.ndim < 2 or "bias" in name or "ln_" in name or "bn" in name
                                or "norm" in name)
        assert masks[path] == reference_decays, name
    assert any("cls_token" in n for n in decayed) and any("pos_embed" in n for n in decayed)
    assert not any("logit_scale" in n for n in decayed)
