"""Cached evaluation features on the devices: split by rows, gathered by index, k-NN over shards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablerep_jax import features, linear_probe, parallel


@pytest.mark.parametrize("num", [64, 61])            # a multiple of the 8 devices, and not
def test_shard_rows_keeps_a_slice_per_device_padded_with_zeros(num):
    mesh = parallel.make_mesh()
    assert mesh.size == 8
    rows = np.arange(num * 3, dtype=np.float32).reshape(num, 3)
    on_device = features.shard_rows(rows, mesh)
    padded = -(-num // 8) * 8
    assert on_device.shape == (padded, 3)
    shards = sorted(on_device.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape for s in shards] == [(padded // 8, 3)] * 8
    whole = np.asarray(on_device)
    np.testing.assert_array_equal(whole[:num], rows)
    np.testing.assert_array_equal(whole[num:], 0)


def test_row_gather_equals_indexing_a_full_copy_bit_for_bit():
    """Indices from every device's slice, repeated, in any order; float rows and int labels."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    num = 101
    feats = rng.normal(size=(num, 5)).astype(np.float32)
    labels = rng.integers(0, 1000, num).astype(np.int32)
    index = np.concatenate([rng.permutation(num)[:40], [0, num - 1, 7, 7, 7, 50, num - 1, 0]])
    take = jax.jit(features.make_row_gather(mesh))
    got_f = take(features.shard_rows(feats, mesh), jnp.asarray(index, jnp.int32))
    got_l = take(features.shard_rows(labels, mesh), jnp.asarray(index, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got_f), feats[index])
    np.testing.assert_array_equal(np.asarray(got_l), labels[index])
    assert got_f.sharding.spec == jax.sharding.PartitionSpec(parallel.DATA_AXIS)


def test_cached_probe_keeps_only_a_slice_of_the_features_on_each_device():
    """The runner's device copy of the training features is split by rows, not replicated, and
    training on it over 8 devices equals training on one."""
    rng = np.random.default_rng(1)
    num, dim = 203, 6
    feats = rng.normal(size=(num, dim)).astype(np.float32) + rng.integers(0, 2, (num, 1))
    labels = rng.integers(0, 3, num).astype(np.int32)
    kwargs = dict(epochs=3, batch_size=40, seed=2, use_bn=True)
    eight, eight_loss = linear_probe.train_heads_on_features(
        feats, labels, 3, (0.1, 1.0), mesh=parallel.make_mesh(), **kwargs)
    one, one_loss = linear_probe.train_heads_on_features(
        feats, labels, 3, (0.1, 1.0), mesh=parallel.make_mesh(jax.devices()[:1]), **kwargs)
    np.testing.assert_allclose(eight.kernel, one.kernel, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(eight_loss, one_loss, rtol=1e-5)
    assert not np.allclose(eight.kernel[0], eight.kernel[1])   # the lrs did something
    hp = linear_probe.make_hparams((0.1,), 1, num // 40)
    seen_before = {id(a) for a in jax.live_arrays()}
    run_epoch = linear_probe.cached_epoch_runner(feats, labels, hp, 40, parallel.make_mesh())
    table = [a for a in jax.live_arrays() if id(a) not in seen_before and a.shape == (208, dim)]
    assert len(table) == 1
    assert {s.data.shape for s in table[0].addressable_shards} == {(26, dim)}
    del run_epoch


@pytest.mark.parametrize("num_train,k", [(203, 20), (30, 20), (9, 9)])
def test_sharded_knn_scores_equal_the_definition(num_train, k):
    """Each device's own k best, merged, are the global k best: also when a device holds fewer
    than k rows (30 rows: 4 per device) or padding (203 is not a multiple of 8)."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(num_train)
    train_f = rng.normal(size=(num_train, 8)).astype(np.float32)
    train_l = rng.integers(0, 5, num_train).astype(np.int32)
    test_f = rng.normal(size=(17, 8)).astype(np.float32)
    want = np.asarray(features.knn_scores(train_f, train_l, test_f, 5, k, 0.07))
    fn = features.make_sharded_knn_scores(mesh, num_train, 5, k, 0.07)
    got = fn(features.shard_rows(train_f, mesh), features.shard_rows(train_l, mesh),
             features.replicate(test_f, mesh))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
