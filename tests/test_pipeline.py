"""Training input pipeline: batch contract (colour stage on the device or the host), views equal
to the keyed views of the stored image, m distinct stored images per caption, per-host file
split, determinism and exact resume, undecodable records dropped and counted, CLIP tokens."""
import io
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stablerep_jax import config_utils
from stablerep_jax import train
from stablerep_jax.data import augment, caption_order, device_augment, pipeline, records
from stablerep_jax.data.train_set import TrainSet
from stablerep_jax.data import tokenize, views

from tiny_tokenizer import write_tiny_clip_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CAPTIONS, K = 32, 4


def _png(rgb, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()).save(
        buffer, format="PNG")
    return buffer.getvalue()


def _colour(caption_id, k):
    """Image k of a caption is a flat colour that names both (k in red, caption in green)."""
    return (20 + 50 * k, 5 + 7 * caption_id, 128)


def _write(directory, num_captions=NUM_CAPTIONS, k=K, num_shards=4, bad=(), manifest=True,
           **meta):
    os.makedirs(directory, exist_ok=True)
    per_shard = -(-num_captions // num_shards)
    shards = {}
    for shard in range(num_shards):
        recs = []
        for c in range(shard * per_shard, min((shard + 1) * per_shard, num_captions)):
            images = [_png(_colour(c, j)) for j in range(k)]
            if c in bad:
                images = [b"not an image", images[0][:40]] * (k // 2) + [b"x"] * (k % 2)
            recs.append(records.CaptionRecord(caption=f"caption {c}", caption_id=c,
                                              images=images, seeds=list(range(k))))
        name = f"train-{shard:05d}-of-{num_shards:05d}.tfrecord"
        records.write_shard(os.path.join(directory, name), recs)
        shards[name] = {"captions": len(recs), "images": len(recs) * k}
    if manifest:
        records.write_manifest(directory, shards, images_per_caption=k, **meta)
    return os.path.join(directory, "*.tfrecord")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return _write(str(tmp_path_factory.mktemp("records")))


def _data_config(train_files, **overrides):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.data.image_size = 16
    config.data.permute_window = 16
    for key, value in overrides.items():
        config_utils.apply_overrides(config, {f"data.{key}": value})
    return config.data


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _stored_index(view):
    """Which stored image (k) and caption a weakly augmented flat-colour uint8 view came from."""
    rgb = view.mean(axis=(0, 1))
    return int(round((rgb[0] - 20) / 50)), int(round((rgb[1] - 5) / 7))


@pytest.mark.parametrize("n_img,num_crop,dtype", [
    (2, 1, "float32"), (1, 2, "bfloat16"), (3, 2, "float32")])
def test_batch_contract(files, n_img, num_crop, dtype):
    """uint8 views + their colour parameters, finished in the step (in data.image_dtype)."""
    data = _data_config(files, n_img=n_img, num_crop=num_crop, image_dtype=dtype)
    batch = next(pipeline.make_train_iterator(data, batch_size=8, seed=0))
    views_shape = (8, n_img * num_crop, 16, 16, 3)
    assert set(batch) == {"images", "labels", augment.PARAMS_KEY}
    assert batch["images"].shape == views_shape and batch["images"].dtype == np.uint8
    assert batch["labels"].dtype == np.int32 and batch["labels"].shape == (8,)
    params = batch[augment.PARAMS_KEY]
    assert params.dtype == np.float32 and params.shape == (8, n_img * num_crop,
                                                           augment.NUM_PARAMS)
    images = jax.jit(lambda b: device_augment.model_images(b, data))(batch)
    assert images.shape == views_shape and images.dtype.name == dtype
    assert np.isfinite(np.asarray(images, np.float32)).all()


def _noise_jpeg(seed, size=(30, 26)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size[::-1] + (3,), np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def test_views_are_the_keyed_views_of_the_stored_image(tmp_path):
    """Each view of a batch (and its colour parameters) is `augment.prepare_image` of the
    decoded stored image with its view key: the crop decoded in one stage and the rest made in another take
    their halves of the same key (one stored image per caption, so which one is known)."""
    recs = [records.CaptionRecord(caption=f"c{c}", caption_id=c, images=[_noise_jpeg(c)],
                                  seeds=[0]) for c in range(8)]
    records.write_shard(str(tmp_path / "train-0.tfrecord"), recs)
    records.write_manifest(str(tmp_path), {"train-0.tfrecord": {"captions": 8, "images": 8}},
                           images_per_caption=1)
    data = _data_config(str(tmp_path / "*.tfrecord"), n_img=1, num_crop=2, aug="strong")
    spec = augment.AugmentSpec.from_config(data)
    batch = next(pipeline.make_train_iterator(data, batch_size=4, seed=5))
    for b, label in enumerate(batch["labels"]):
        image = tf.io.decode_image(recs[label].images[0], channels=3)
        for v in range(2):
            key = views.view_key(5, 0, int(label), v, 0)
            want, params = augment.prepare_image(key, image, spec)
            np.testing.assert_array_equal(batch[augment.PARAMS_KEY][b, v], params.numpy())
            np.testing.assert_array_equal(batch["images"][b, v], want.numpy())


def test_views_are_distinct_stored_images_of_the_caption(files):
    data = _data_config(files, n_img=3, num_crop=2, aug="weak")
    it = pipeline.make_train_iterator(data, batch_size=8, seed=0)
    steps = it.info.steps_per_epoch
    chosen = {}                                   # (epoch, caption) -> stored images
    for step, batch in enumerate(_take(it, 2 * steps)):
        for views, label in zip(batch["images"], batch["labels"]):
            ids = [_stored_index(v) for v in views]
            assert {c for _, c in ids} == {int(label)}            # every view of this caption
            ks = [k for k, _ in ids]
            assert ks[0::2] == ks[1::2]                           # crops of one image adjacent
            assert len(set(ks[0::2])) == 3                        # m distinct stored images
            chosen[(step // steps, int(label))] = frozenset(ks)
    changed = sum(chosen[(0, c)] != chosen[(1, c)] for c in range(NUM_CAPTIONS))
    assert changed > NUM_CAPTIONS // 2                            # fresh draw every epoch


def test_each_epoch_covers_every_caption_once(files):
    it = pipeline.make_train_iterator(_data_config(files), batch_size=8, seed=3)
    assert it.info.steps_per_epoch == NUM_CAPTIONS // 8
    epochs = [np.concatenate([b["labels"] for b in _take(it, 4)]) for _ in range(2)]
    for labels in epochs:
        assert sorted(labels.tolist()) == list(range(NUM_CAPTIONS))
    assert epochs[0].tolist() != epochs[1].tolist()               # reshuffled


def test_hosts_read_disjoint_files_that_cover_all(files):
    dataset = TrainSet.resolve(files)
    shares = [dataset.host_share(i, 2).files for i in range(2)]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(dataset.host_share(0, 1).files)
    data = _data_config(files)
    seen = []
    for host in range(2):
        it = pipeline.make_train_iterator(data, batch_size=8, seed=0, process_index=host,
                                          process_count=2)
        labels = np.concatenate([b["labels"] for b in _take(it, it.info.steps_per_epoch)])
        assert next(it)["labels"].shape == (4,)                   # batch_size // hosts
        seen.append(set(labels.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(NUM_CAPTIONS))


def test_file_glob_errors_name_the_glob(tmp_path, files):
    missing = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        TrainSet.resolve(missing)
    with pytest.raises(FileNotFoundError, match="nothing-"):
        pipeline.make_train_iterator(_data_config(missing), batch_size=8, seed=0)
    with pytest.raises(ValueError, match="fewer than the 5 hosts"):
        TrainSet.resolve(files).host_share(0, 5)


def test_a_shard_written_after_the_data_set_is_resolved_is_not_read(tmp_path):
    """The run's TrainSet fixes the shards, counts and fingerprint at start-up: a shard that
    lands later (generate still writing) changes none of them and is never read."""
    directory = str(tmp_path / "data")
    glob = _write(directory, num_captions=16, num_shards=2)
    dataset = TrainSet.resolve(glob)
    fingerprint, steps = dataset.fingerprint(), dataset.steps_per_epoch(8, 1)
    late = [records.CaptionRecord(caption=f"caption {c}", caption_id=c,
                                  images=[_png(_colour(c, j)) for j in range(K)],
                                  seeds=list(range(K))) for c in range(16, 24)]
    records.write_shard(os.path.join(directory, "train-00002-of-00002.tfrecord"), late)
    manifest = records.read_manifest(directory)
    manifest["shards"]["train-00002-of-00002.tfrecord"] = {"captions": 8, "images": 8 * K}
    records.write_manifest(directory, manifest["shards"], images_per_caption=K)
    assert TrainSet.resolve(glob).num_records == 24                 # a new resolve would see it
    it = pipeline.make_train_iterator(_data_config(glob), dataset, batch_size=8, seed=0)
    labels = np.concatenate([b["labels"] for b in _take(it, 3 * steps)])
    assert it.info.steps_per_epoch == steps == 2
    assert set(labels.tolist()) == set(range(16))                  # three epochs, none of 16-23
    assert dataset.fingerprint() == fingerprint and len(fingerprint) == 2


def test_same_seed_same_batches_and_exact_resume(files):
    data = _data_config(files)                                     # strong augmentation
    straight = _take(pipeline.make_train_iterator(data, batch_size=8, seed=1), 7)
    again = _take(pipeline.make_train_iterator(data, batch_size=8, seed=1), 7)
    for a, b in zip(straight, again):
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a[augment.PARAMS_KEY], b[augment.PARAMS_KEY])
    other = next(pipeline.make_train_iterator(data, batch_size=8, seed=2))
    assert not np.array_equal(other["images"], straight[0]["images"])
    for start in (3, 5):                                           # mid-epoch, next epoch
        resumed = _take(pipeline.make_train_iterator(data, batch_size=8, seed=1,
                                                     start_step=start), 2)
        for a, b in zip(straight[start:start + 2], resumed):
            np.testing.assert_array_equal(a["labels"], b["labels"])
            np.testing.assert_array_equal(a["images"], b["images"])
            np.testing.assert_array_equal(a[augment.PARAMS_KEY], b[augment.PARAMS_KEY])


def test_undecodable_record_is_replaced_and_counted(tmp_path):
    """n // B steps per epoch as the trainer schedules (not (n - allowance) // B): the bad
    record's place is filled by a spare, a fresh draw of one of the epoch's first records."""
    bad_id = 5
    glob = _write(str(tmp_path), bad=(bad_id,))
    it = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.1), batch_size=4,
                                      seed=0)
    steps = it.info.steps_per_epoch
    assert steps == NUM_CAPTIONS // 4
    for epoch in range(2):
        batches = _take(it, steps)
        labels = np.concatenate([b["labels"] for b in batches])
        assert bad_id not in labels
        assert set(labels.tolist()) == set(range(NUM_CAPTIONS)) - {bad_id}   # no other epoch
        assert len(labels) == NUM_CAPTIONS                        # one caption drawn twice ...
        for batch in batches:                                     # ... never in the same batch
            assert len(set(batch["labels"].tolist())) == 4
        assert it.dropped == epoch + 1
    assert it.seen > it.dropped


def test_too_many_undecodable_records_fail_clearly(tmp_path):
    glob = _write(str(tmp_path), bad=(1, 2))
    it = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.0), batch_size=8,
                                      seed=0)
    with pytest.raises(ValueError, match=r"train-00000-of-00004.tfrecord: record [12] holds "
                                         r"images that do not decode; .*max_bad_fraction=0.0"):
        _take(it, 4)


def test_too_few_images_per_caption_fail_clearly(tmp_path):
    no_manifest = _write(str(tmp_path / "a"), k=2, manifest=False)
    it = pipeline.make_train_iterator(_data_config(no_manifest, n_img=3), batch_size=8, seed=0)
    with pytest.raises(ValueError, match=r"a/train-0000\d-of-00004.tfrecord: record \d holds 2 "
                                         r"images, fewer than data.n_img"):
        next(it)
    with_manifest = _write(str(tmp_path / "b"), k=2)
    with pytest.raises(ValueError, match="images_per_caption=2"):
        pipeline.make_train_iterator(_data_config(with_manifest, n_img=3), batch_size=8, seed=0)


def test_tokens_for_stablerep_plus_plus(files, tmp_path):
    tok_dir = write_tiny_clip_tokenizer(str(tmp_path / "tokenizer"))
    it = pipeline.make_train_iterator(_data_config(files), batch_size=8, seed=0,
                                      tokenizer_dir=tok_dir)
    batch = next(it)
    assert batch["tokens"].shape == (8, 77) and batch["tokens"].dtype == np.int32
    tokenizer = tokenize.load_tokenizer(tok_dir)
    want = tokenize.clip_token_ids(tokenizer, [f"caption {c}" for c in batch["labels"]])
    np.testing.assert_array_equal(batch["tokens"], want)


def test_tokenize_matches_clip_tokenize_layout(tmp_path):
    tokenizer = tokenize.load_tokenizer(write_tiny_clip_tokenizer(str(tmp_path)))
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    short, long = tokenize.clip_token_ids(tokenizer, [b"the cat", "word " * 200])
    n = int(np.nonzero(short)[0].max()) + 1
    assert short[0] == sot and short[n - 1] == eot and (short[n:] == 0).all()
    assert short[1:n - 1].tolist() == tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert long[0] == sot and long[-1] == eot and (long != 0).all()    # truncated, EOT kept
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        tokenize.load_tokenizer(str(tmp_path / "missing"))


# --------------------------------------------------------------------------------------------
# Steps per epoch agree with the trainer's schedule


def _train_config(train_files, batch_size, **data):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.batch_size, config.total_steps, config.epochs = batch_size, 0, 1.0
    for key, value in data.items():
        config_utils.apply_overrides(config, {f"data.{key}": value})
    return config


def test_stream_steps_per_epoch_equal_training_length(tmp_path):
    glob = _write(str(tmp_path), num_captions=30, num_shards=3, bad=(7,))   # shards 10/10/10
    config = _train_config(glob, 6, max_bad_fraction=0.1)
    dataset = TrainSet.resolve(glob)
    schedule = train.epoch_steps(config, dataset, process_count=1)
    it = pipeline.make_train_iterator(config.data, dataset, batch_size=6, seed=0)
    assert it.info.steps_per_epoch == schedule == 30 // 6
    for host in range(2):                                          # shares of 20 and 10 records
        schedule = train.epoch_steps(config, dataset, process_count=2)
        it = pipeline.make_train_iterator(config.data, dataset, batch_size=6, seed=0,
                                          process_index=host, process_count=2)
        assert it.info.steps_per_epoch == schedule == 10 // 3


# --------------------------------------------------------------------------------------------
# Damaged shards and globs that match other files


def _truncate(path, cut):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) - cut] if cut else b"")


def test_truncated_shard_is_named_or_its_tail_skipped_and_counted(tmp_path):
    glob = _write(str(tmp_path))                        # 4 shards of 8 captions
    victim = os.path.join(str(tmp_path), "train-00002-of-00004.tfrecord")
    ids = [r.caption_id for r in records.read_records(victim)]
    _truncate(victim, 200)                              # cuts into the last record
    readable = len(list(tf.data.TFRecordDataset(victim).ignore_errors()))
    assert 0 < readable < len(ids)
    strict = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.0),
                                          batch_size=8, seed=0)
    with pytest.raises(ValueError, match=rf"train-00002-of-00004.tfrecord: record {readable} "
                                         r"could not be read \(a corrupt or truncated TFRecord\)"):
        _take(strict, 4)
    tolerant = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.1),
                                            batch_size=8, seed=0)
    labels = np.concatenate([b["labels"] for b in _take(tolerant, 4)])
    assert set(labels.tolist()) == set(range(NUM_CAPTIONS)) - set(ids[readable:])
    assert tolerant.dropped == len(ids) - readable and len(labels) == NUM_CAPTIONS


def test_truncated_shard_without_manifest_is_named_when_counted(tmp_path):
    glob = _write(str(tmp_path), manifest=False)
    _truncate(os.path.join(str(tmp_path), "train-00001-of-00004.tfrecord"), 200)
    with pytest.raises(ValueError, match=r"train-00001-of-00004.tfrecord: corrupt or truncated "
                                         r"TFRecord after record \d"):
        pipeline.make_train_iterator(_data_config(glob), batch_size=8, seed=0)


def test_corrupt_record_is_named(tmp_path):
    glob = _write(str(tmp_path))
    victim = os.path.join(str(tmp_path), "train-00001-of-00004.tfrecord")
    with open(victim, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF                        # fails the record's CRC
    with open(victim, "wb") as f:
        f.write(bytes(data))
    it = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.0), batch_size=8,
                                      seed=0)
    with pytest.raises(ValueError, match=r"train-00001-of-00004.tfrecord: record \d+ could not"):
        _take(it, 4)


def test_empty_shard_listed_with_records_is_an_error_naming_it(tmp_path):
    glob = _write(str(tmp_path))
    _truncate(os.path.join(str(tmp_path), "train-00003-of-00004.tfrecord"), 0)
    with pytest.raises(ValueError, match="empty.*train-00003-of-00004.tfrecord"):
        pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.5 - 1e-9),
                                     batch_size=8, seed=0)


def test_shard_unreadable_from_its_start_is_an_error_naming_it(tmp_path):
    glob = _write(str(tmp_path))
    with open(os.path.join(str(tmp_path), "train-00000-of-00004.tfrecord"), "wb") as f:
        f.write(_png((1, 2, 3)))                        # not a TFRecord file at all
    it = pipeline.make_train_iterator(_data_config(glob, max_bad_fraction=0.4), batch_size=8,
                                      seed=0)
    with pytest.raises(ValueError, match="train-00000-of-00004.tfrecord: no record can be read"):
        _take(it, 4)


def test_glob_matching_other_files_is_an_error_naming_them(tmp_path):
    _write(str(tmp_path))
    for name in ("settings.json", "summary.json", "missing.txt", "contact_sheet.png"):
        with open(os.path.join(str(tmp_path), name), "w") as f:
            f.write("{}")
    with pytest.raises(ValueError, match=r"not TFRecord shards: .*contact_sheet.png, .*manifest"
                                         r".json, .*missing.txt, .*settings.json, .*summary.json"):
        pipeline.make_train_iterator(_data_config(os.path.join(str(tmp_path), "*")),
                                     batch_size=8, seed=0)


# --------------------------------------------------------------------------------------------
# Labels across data sets, and the shard order


def test_two_outputs_with_overlapping_ids_get_distinct_labels(tmp_path):
    for name in ("a", "b"):
        _write(str(tmp_path / name), num_captions=16, num_shards=2, num_caption_ids=16)
    both = pipeline.make_train_iterator(_data_config(str(tmp_path / "*" / "*.tfrecord")),
                                        batch_size=8, seed=0)
    labels = np.concatenate([b["labels"] for b in _take(both, 4)])
    assert sorted(labels.tolist()) == list(range(32))            # b's ids shifted by 16
    one = pipeline.make_train_iterator(_data_config(str(tmp_path / "b" / "*.tfrecord")),
                                       batch_size=8, seed=0)
    labels = np.concatenate([b["labels"] for b in _take(one, 2)])
    assert sorted(labels.tolist()) == list(range(16))            # one data set: its caption ids


def test_outputs_whose_id_range_is_unknown_are_refused_by_name(tmp_path):
    # a manifest without the range (total_captions alone, as generate once wrote, is not it)
    _write(str(tmp_path / "a"), num_captions=16, num_shards=2, total_captions=16)
    _write(str(tmp_path / "b"), num_captions=16, num_shards=2, num_caption_ids=16)
    with pytest.raises(ValueError, match=f"{tmp_path / 'a'}/manifest.json .*num_caption_ids"):
        pipeline.make_train_iterator(_data_config(str(tmp_path / "*" / "*.tfrecord")),
                                     batch_size=8, seed=0)


PINNED_ORDER = [0, 9, 1, 8, 5, 6, 2, 3, 7, 4]


def test_caption_order_is_a_fixed_permutation():
    order = caption_order.caption_order(10, 4)
    assert order.tolist() == PINNED_ORDER                       # resumes on any NumPy agree
    big = caption_order.caption_order(10_000, 1000)
    assert sorted(big.tolist()) == list(range(10_000))
    assert np.abs(np.diff(big[:1000])).mean() > 2000            # a shuffled sample, not a run


def test_train_loss_sees_the_views_finished_on_the_device(files):
    """The step's model input is `device_augment.model_images`: a device batch (uint8 views +
    parameters) gives the loss of the same views finished beforehand."""
    config = _train_config(files, 8)
    batch = next(pipeline.make_train_iterator(config.data, batch_size=8, seed=0))
    assert batch["images"].dtype == np.uint8
    model = train.build_model(config.model)
    variables = train.init_variables(model, config, jax.random.PRNGKey(0))
    loss_fn = jax.jit(train.make_loss_fn(model, config))
    finished = {"images": jax.jit(lambda b: device_augment.model_images(b, config.data))(batch),
                "labels": batch["labels"]}
    losses = [float(loss_fn(variables["params"], variables["batch_stats"], b, 0.1)[0])
              for b in (batch, finished)]
    assert np.isfinite(losses[0]) and losses[0] == pytest.approx(losses[1], rel=1e-6)
