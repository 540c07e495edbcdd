"""tf.data input pipeline for training: TFRecord shards -> augmented multi-view batches per host.

Stream of one host (all stages deterministic for a fixed seed):

  blocks of permuted files (epoch_plan.EpochPlan) -> interleaved records, each file exactly its
     recorded count long (a corrupt or truncated tail becomes unreadable placeholders)
  -> parse, pick m of K images              (keyed by seed, epoch, label, draw)
  -> permuted in windows of data.permute_window records
  -> after each epoch, its first 2 x allowance records again as spares (draw 1)
  -> each record followed by its marker; decode the m x num_crop views' crops (JPEG: only the
     crop; keyed by seed, epoch, label, view, draw); a record that fails to decode is dropped,
     and its marker, which never fails, says so and names it
  -> keep the first `steps_per_epoch * B_host` good records of each epoch, count bad ones
  -> the views: resize, flip to uint8, plus  (same keys)
       each view's colour parameters; the train step finishes them on the accelerator
       (`device_augment.finish_views`: colour stage, normalisation)
  -> batch(B_host) [-> CLIP tokens] -> prefetch

Every epoch yields `steps_per_epoch` batches, the trainer's number (`TrainSet.steps_per_epoch`:
records // batch_size on one host, as the reference's DistributedSampler + drop_last): the
records past the quota are the epoch's unused remainder, and a bad record (unreadable or
undecodable) is replaced from it, or, when it is used up, from the spares, fresh draws of the
epoch's first captions (never in the same batch as their first use unless an epoch is one
batch). Up to `floor(data.max_bad_fraction * records)` bad records per epoch are tolerated.
Problems travel as data: the scan that counts records marks the element where one is found
with an error code, the file and the record index, and `TrainIterator` raises the error that
names them when that element's batch arrives. A batch never mixes two epochs and step s always
falls in epoch s // steps_per_epoch. Labels are caption_id plus the offset of the record's
directory (`TrainSet.label_offsets`; 0 for one directory). Resuming at step s skips whole
epochs and blocks without reading them and reads (without decoding) at most one block. The
resumed stream equals the uninterrupted one exactly when no record of the current epoch before
step s was bad; otherwise it is shifted by those few records until the epoch ends (later epochs
are exact again).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from absl import logging

from stablerep_jax.data import augment, epoch_plan, tokenize, train_set, views
from stablerep_jax.data.train_set import TrainSet

FILES_PER_BLOCK = 16
READ_BUFFER_BYTES = 8 << 20

# Error codes the counting scan writes into an element (`_error`); 0: none.
TOO_MANY_UNREADABLE, TOO_MANY_UNDECODABLE, UNREADABLE_FILE, EPOCH_SHORT, TOO_FEW_IMAGES = range(1, 6)
_ERROR_FIELDS = ("_error", "_error_file", "_error_record", "_error_epoch", "_error_value")


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """Sizes of this host's stream, for logging and for the trainer."""
    files: tuple[str, ...]
    records_per_epoch: int
    host_batch: int
    steps_per_epoch: int
    bad_allowance: int          # bad records tolerated per epoch on this host
    start_epoch: int
    start_step_in_epoch: int


class TrainIterator:
    """Infinite iterator of numpy batches; `dropped` / `seen` count records since it started
    (bad ones / all read past), for logging."""

    def __init__(self, dataset: tf.data.Dataset, info: StreamInfo, pattern: str,
                 max_bad_fraction: float):
        self._iterator = iter(dataset.as_numpy_iterator())
        self.info = info
        self.dropped = 0
        self.seen = 0
        self._pattern = pattern
        self._max_bad_fraction = max_bad_fraction

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._iterator)
        errors = np.flatnonzero(batch["_error"])
        if errors.size:
            raise self._explain(**{k[1:]: int(batch[k][errors[0]]) for k in _ERROR_FIELDS})
        self.dropped = int(batch.pop("_dropped").max())
        self.seen = int(batch.pop("_seen").max())
        for key in _ERROR_FIELDS:
            del batch[key]
        return batch

    def _explain(self, error: int, error_file: int, error_record: int, error_epoch: int,
                 error_value: int) -> ValueError:
        file = self.info.files[error_file] if 0 <= error_file < len(self.info.files) else "?"
        if error in (TOO_MANY_UNREADABLE, TOO_MANY_UNDECODABLE):
            what = ("could not be read (a corrupt or truncated TFRecord)"
                    if error == TOO_MANY_UNREADABLE else "holds images that do not decode")
            return ValueError(
                f"{file}: record {error_record} {what}; that is more than "
                f"data.max_bad_fraction={self._max_bad_fraction} of the "
                f"{self.info.records_per_epoch} records of an epoch on this host "
                f"(> {self.info.bad_allowance} bad records, epoch {error_epoch}) in "
                f"{self._pattern!r}")
        if error == UNREADABLE_FILE:
            return ValueError(f"{file}: no record can be read (empty, not a TFRecord file, "
                              f"or corrupt from its start) though it should hold records; "
                              f"regenerate it or remove it from {self._pattern!r}")
        if error == EPOCH_SHORT:
            return ValueError(f"{self._pattern!r}: too many bad records to fill epoch "
                              f"{error_epoch} of {self.info.steps_per_epoch} steps: only "
                              f"{error_value} of its {self.info.host_batch} x "
                              f"{self.info.steps_per_epoch} records were good")
        if error == TOO_FEW_IMAGES:
            return ValueError(f"{file}: record {error_record} holds {error_value} images, fewer "
                              f"than data.n_img: each caption needs at least n_img images")
        raise AssertionError(f"unknown input pipeline error code {error}")


def _permute_window(window, key):
    order = tf.argsort(tf.random.stateless_uniform([tf.shape(window["caption_id"])[0]], seed=key))
    return tf.nest.map_structure(lambda t: tf.gather(t, order), window)


def _file_records(path, count, offset, position):
    """Exactly `count` elements for one shard: its records, then, where the file ends early or
    is corrupt (TF's DataLossError, which names no file), unreadable placeholders in place of
    the missing tail. Every element carries its file's position among the host's files and its
    record index, for error messages; the
    count stays exact, so resume arithmetic and the interleave order do not depend on damage."""
    readable = tf.data.TFRecordDataset(path, buffer_size=READ_BUFFER_BYTES).ignore_errors()
    missing = tf.data.Dataset.from_tensors(tf.constant(b"")).repeat(count)   # no record is b""
    return readable.take(count).concatenate(missing).take(count).enumerate().map(
        lambda i, rec: {"serialized": rec, "readable": tf.strings.length(rec) > 0,
                        "file": position, "index": i, "offset": offset})


def _read_records(plan: epoch_plan.EpochPlan, start_epoch: int, skip_records: int, window: int,
                  *, spare_records: int, n_img: int, seed: int) -> tf.data.Dataset:
    """Parsed records with m sampled encoded images, from `start_epoch` on, forever; after each
    epoch its first `spare_records` records again, marked as spares (draw 1).

    Within a block, the interleaved records are cut into windows of `window` records and each
    window is permuted (keyed by the block seed and window index). Unlike a shuffle buffer,
    this has no state that crosses blocks, so a restart can start at any block; the prefetch
    after it assembles the next window while the current one is consumed.
    """
    def gen():
        for block in plan.iter_blocks(start_epoch, skip_records, spare_records):
            yield (np.array(block.files), np.array([plan.count(f) for f in block.files], np.int64),
                   np.array([plan.offset(f) for f in block.files], np.int64),
                   np.array([plan.position(f) for f in block.files], np.int64),
                   np.int64(block.epoch), np.int64(block.skip),
                   np.int64(-1 if block.take is None else block.take), np.int64(block.spare),
                   np.int64(plan.block_seed(block)))

    blocks = tf.data.Dataset.from_generator(gen, output_signature=(
        tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64), tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64),
        tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)))

    def read_block(files, counts, offsets, positions, epoch, skip, take, spare, block_seed):
        ds = tf.data.Dataset.from_tensor_slices((files, counts, offsets, positions)).interleave(
            _file_records, cycle_length=plan.files_per_block, block_length=1,
            num_parallel_calls=plan.files_per_block, deterministic=True)
        ds = ds.map(lambda e: dict(
            views.parse_and_sample(e["serialized"], epoch, n_img=n_img, seed=seed,
                                   readable=e["readable"], label_offset=e["offset"], draw=spare),
            file=e["file"], index=e["index"]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if window > 1:
            ds = ds.batch(window).enumerate().map(
                lambda i, w: _permute_window(w, augment.make_key(block_seed, i))).unbatch()
        return ds.skip(skip).take(take)

    return blocks.flat_map(read_block).prefetch(max(window, 1))


def _with_markers(element: dict) -> dict:
    """The record and, after it, its marker: the same element with no image bytes and
    `marker` set. The marker never fails to decode, so when the record does (and is dropped by
    `ignore_errors`) the marker reaches the counting scan alone and names it."""
    marker = dict(element, encoded=tf.fill(tf.shape(element["encoded"]), b""))
    return tf.nest.map_structure(lambda a, b: tf.stack([a, b]), dict(element, marker=False),
                                 dict(marker, marker=True))


def _count_and_keep(*, start_epoch: int, first_quota: int, quota: int, allowance: int):
    """A scan over records and their markers that keeps the first `quota` good records of each
    epoch (`first_quota` for the epoch a run starts in) and counts the bad ones: a record whose
    status is UNREADABLE, or whose marker arrives without it (it failed to decode).

    Records of the epoch's main pass beyond the quota are its unused remainder (the reference's
    drop_last); bad records are replaced from that remainder, then from the spares (draw 1)
    that follow the epoch. Past `allowance` bad records in an epoch, at a shard unreadable from
    its first record, at a record with too few images, or when an epoch cannot be filled, the
    element gets an error code (`_error`) with the file, record, epoch and a count."""
    def as64(value):
        return tf.constant(value, tf.int64)

    def scan(state, element):
        cur_epoch, dropped_e, kept_e, dropped, seen, pending = state
        epoch, marker = element["epoch"], element["marker"]
        fresh = tf.not_equal(epoch, cur_epoch)
        cur_limit = tf.where(tf.equal(cur_epoch, start_epoch), as64(first_quota), as64(quota))
        short = tf.logical_and(fresh, tf.logical_and(cur_epoch >= 0, kept_e < cur_limit))
        short_kept = kept_e
        dropped_e = tf.where(fresh, as64(0), dropped_e)
        kept_e = tf.where(fresh, as64(0), kept_e)
        main = tf.equal(element["draw"], 0)
        status = element["status"]
        unreadable = tf.logical_and(tf.logical_not(marker), tf.equal(status, views.UNREADABLE))
        undecodable = tf.logical_and(marker, tf.logical_not(pending))
        bad = tf.logical_and(main, tf.logical_or(unreadable, undecodable))
        good = tf.logical_and(tf.logical_not(marker), tf.equal(status, views.OK))
        limit = tf.where(tf.equal(epoch, start_epoch), as64(first_quota), as64(quota))
        keep = tf.logical_and(good, kept_e < limit)
        bad64 = tf.cast(bad, tf.int64)
        dropped_e += bad64
        kept_e += tf.cast(keep, tf.int64)
        seen_now = seen + tf.cast(marker, tf.int64)
        errors = [   # (condition, code, value), the first that holds wins
            (short, EPOCH_SHORT, short_kept),
            (tf.logical_and(tf.logical_not(marker), tf.equal(status, views.TOO_FEW_IMAGES)),
             TOO_FEW_IMAGES, tf.cast(element["num_images"], tf.int64)),
            (tf.logical_and(unreadable, tf.logical_and(main, tf.equal(element["index"], 0))),
             UNREADABLE_FILE, as64(0)),
            (tf.logical_and(bad, dropped_e > allowance),
             tf.where(unreadable, TOO_MANY_UNREADABLE, TOO_MANY_UNDECODABLE), dropped_e)]
        code, value = tf.constant(0), as64(0)
        for condition, this_code, this_value in reversed(errors):
            code = tf.where(condition, this_code, code)
            value = tf.where(condition, this_value, value)
        out = dict(element, keep=keep, _dropped=dropped + bad64, _seen=seen_now, _error=code,
                   _error_file=element["file"], _error_record=element["index"],
                   _error_epoch=tf.where(short, cur_epoch, epoch), _error_value=value)
        return (epoch, dropped_e, kept_e, dropped + bad64, seen_now,
                tf.logical_not(marker)), out
    zero = as64(0)
    return (as64(-1), zero, zero, zero, zero, tf.constant(False)), scan


def make_train_iterator(data_config, dataset: TrainSet | None = None, *, batch_size: int,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0, tokenizer_dir: str | None = None,
                        steps_per_epoch: int | None = None,
                        files_per_block: int = FILES_PER_BLOCK,
                        num_threads: int | None = None) -> TrainIterator:
    """Batches for `train`: {"images": [B_host, V, S, S, 3], "labels": [B_host] int32
    (caption_id + the offset of its directory; the caption ids for one directory), "tokens":
    [B_host, 77] int32 when `tokenizer_dir` is given}, where B_host = batch_size //
    process_count, V = n_img * num_crop, S = data.image_size.

    "images" are uint8 (cropped, resized, flipped) and "view_params" [B_host, V, NUM_PARAMS]
    float32 carries each view's colour stage, which `device_augment.model_images` applies
    (normalised, `data.image_dtype`) inside the jitted step.

    `dataset` is the run's `TrainSet` (train resolves it once, so this reads exactly the
    shards its schedule and resume check saw); None resolves `data.train_files` here, for
    standalone use. `steps_per_epoch` is the trainer's; by default the data set's.
    `num_threads` caps tf.data's CPU threads (default: all cores)."""
    if batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} does not split over {process_count} hosts")
    host_batch = batch_size // process_count
    n_img, num_crop = int(data_config.n_img), int(data_config.num_crop)
    if n_img < 1 or num_crop < 1:
        raise ValueError(f"data.n_img={n_img}, data.num_crop={num_crop}: both must be >= 1")
    max_bad = float(data_config.max_bad_fraction)
    if not 0.0 <= max_bad < 0.5:
        raise ValueError(f"data.max_bad_fraction={max_bad}: must be in [0, 0.5)")
    spec = augment.AugmentSpec.from_config(data_config)
    if dataset is None:
        dataset = TrainSet.resolve(data_config.train_files)
    pattern = dataset.pattern
    share = dataset.host_share(process_index, process_count)
    train_set.check_not_empty(share.files, share.counts)
    dataset.check_images_per_caption(n_img)
    plan = epoch_plan.EpochPlan(files=share.files, counts=share.counts, seed=int(seed),
                                host=process_index,
                                files_per_block=max(1, min(files_per_block, len(share.files))),
                                offsets=share.offsets)
    n = plan.records_per_epoch
    if steps_per_epoch is None:
        steps_per_epoch = dataset.steps_per_epoch(batch_size, process_count)
    if steps_per_epoch < 1:
        raise ValueError(f"{pattern!r} ({len(dataset.files)} files) holds fewer than one batch "
                         f"of {host_batch} captions for host {process_index} of {process_count} "
                         f"({n} records)")
    if steps_per_epoch * host_batch > n:
        raise ValueError(f"{steps_per_epoch} steps per epoch of {host_batch} captions need "
                         f"{steps_per_epoch * host_batch} records on host {process_index}, but its "
                         f"share of {pattern!r} holds {n} (data.num_captions too large?)")
    allowance = int(np.floor(max_bad * n))
    start_epoch, step_in_epoch = divmod(int(start_step), steps_per_epoch)
    info = StreamInfo(files=share.files, records_per_epoch=n, host_batch=host_batch,
                      steps_per_epoch=steps_per_epoch, bad_allowance=allowance,
                      start_epoch=start_epoch, start_step_in_epoch=step_in_epoch)
    logging.info("input: host %d/%d reads %d files, %d records/epoch, %d steps/epoch of %d "
                 "captions; starting at epoch %d step %d", process_index, process_count,
                 len(share.files), n, steps_per_epoch, host_batch, start_epoch, step_in_epoch)

    ds = _read_records(plan, start_epoch, step_in_epoch * host_batch,
                       int(data_config.permute_window), spare_records=min(n, 2 * allowance),
                       n_img=n_img, seed=int(seed))
    ds = ds.map(_with_markers).unbatch()
    ds = ds.map(lambda e: views.decode_crops(
        e, n_img=n_img, num_crop=num_crop, seed=int(seed), spec=spec,
        decode=tf.logical_and(tf.logical_not(e["marker"]), tf.equal(e["status"], views.OK))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).ignore_errors()
    init, scan = _count_and_keep(
        start_epoch=start_epoch, first_quota=(steps_per_epoch - step_in_epoch) * host_batch,
        quota=steps_per_epoch * host_batch, allowance=allowance)
    ds = ds.scan(init, scan).filter(lambda e: tf.logical_or(e["keep"], e["_error"] > 0))

    def to_views(e):
        out = views.augment_views(e, spec=spec, num_crop=num_crop, seed=int(seed))
        out.update({k: e[k] for k in ("_dropped", "_seen") + _ERROR_FIELDS})
        return out

    ds = ds.map(to_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(host_batch, drop_remainder=True)
    ds = ds.map(_add_tokens(tokenizer_dir) if tokenizer_dir else _drop_captions)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    if num_threads:
        options.threading.private_threadpool_size = num_threads
        options.threading.max_intra_op_parallelism = 1
    ds = ds.with_options(options)
    return TrainIterator(ds, info, pattern, max_bad)


def _drop_captions(batch):
    return {k: v for k, v in batch.items() if k != "caption"}


def _add_tokens(tokenizer_dir: str):
    tokenizer = tokenize.load_tokenizer(tokenizer_dir)

    def tokens(captions):
        return tokenize.clip_token_ids(tokenizer, captions)

    def add(batch):
        out = _drop_captions(batch)
        ids = tf.numpy_function(tokens, [batch["caption"]], tf.int32, stateful=False)
        out["tokens"] = tf.ensure_shape(ids, [batch["caption"].shape[0], tokenize.CONTEXT_LENGTH])
        return out
    return add
