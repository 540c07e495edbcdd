"""tf.data input pipeline for training: TFRecord shards -> augmented multi-view batches per host.

Stream of one host (all stages deterministic for a fixed seed):

  blocks of permuted files (shards.EpochPlan) -> interleaved records, each file exactly its
     manifest count long (a corrupt or truncated tail becomes unreadable placeholders)
  -> parse, pick m of K images              (keyed by seed, epoch, label, draw)
  -> permuted in windows of data.shuffle_buffer records
  -> after each epoch, its first 2 x allowance records again as spares (draw 1)
  -> decode the m x num_crop views' crops   (views.safe_decode; JPEG: only the crop; keyed
     by seed, epoch, label, view, draw); undecodable records flagged
  -> keep the first `steps_per_epoch * B_host` decodable records of each epoch, count drops
  -> the views: resize, flip to uint8, plus  (same keys)
       each view's colour parameters; the train step finishes them on the accelerator
       (`device_augment.finish_views`: colour stage, normalisation)
  -> batch(B_host) [-> CLIP tokens] -> prefetch

Every epoch yields `steps_per_epoch` batches, the trainer's number (`shards.steps_per_epoch`:
records // batch_size on one host, as the reference's DistributedSampler + drop_last): the
records past the quota are the epoch's unused remainder, and an undecodable record is replaced
from it, or, when it is used up, from the spares, fresh draws of the epoch's first captions
(never in the same batch as their first use unless an epoch is one batch). Up to
`floor(data.max_bad_fraction * records)` bad records per epoch are tolerated; past that, the
error names the file and record. A batch never mixes two epochs and step s always falls in epoch
s // steps_per_epoch. Labels are caption_id plus the offset of the record's directory
(`shards.label_offsets`; 0 for one directory). Resuming at step s skips whole epochs and blocks
without reading them and reads (without decoding) at most one block. The resumed stream equals
the uninterrupted one exactly when no record of the current epoch before step s failed to
decode; otherwise it is shifted by those few records until the epoch ends (later epochs are
exact again).
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from stablerep_jax.data import augment, records, shards, tokenize, views
from stablerep_jax.data.shards import host_files  # noqa: F401  (this module's API)

TOO_MANY_BAD = "too many undecodable records in one epoch"
UNREADABLE_FILE = "shard unreadable from its first record"
EPOCH_SHORT = "epoch ended before its quota of decodable records"
FILES_PER_BLOCK = 16
READ_BUFFER_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """Sizes of this host's stream, for logging and for the trainer."""
    files: tuple[str, ...]
    records_per_epoch: int
    host_batch: int
    steps_per_epoch: int
    bad_allowance: int          # undecodable records tolerated per epoch on this host
    start_epoch: int
    start_step_in_epoch: int


class TrainIterator:
    """Infinite iterator of numpy batches; `dropped` / `seen` count records since it started
    (undecodable ones / all read past), for logging."""

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
        try:
            batch = next(self._iterator)
        except tf.errors.InvalidArgumentError as e:
            raise self._explain(e) from e
        self.dropped = int(batch.pop("_dropped").max())
        self.seen = int(batch.pop("_seen").max())
        return batch

    def _explain(self, error: Exception) -> Exception:
        message = str(error.message if hasattr(error, "message") else error)
        where = _failing_record(message, self.info.files)
        if TOO_MANY_BAD in message:
            what = ("could not be read (a corrupt or truncated TFRecord)" if where[2] == "0"
                    else "holds images that do not decode")
            return ValueError(
                f"{where[0]}: record {where[1]} {what}; that is more than "
                f"data.max_bad_fraction={self._max_bad_fraction} of the "
                f"{self.info.records_per_epoch} records of an epoch on this host "
                f"(> {self.info.bad_allowance} bad records) in {self._pattern!r}")
        if UNREADABLE_FILE in message:
            return ValueError(f"{where[0]}: no record can be read (empty, not a TFRecord file, "
                              f"or corrupt from its start) though it should hold records; "
                              f"regenerate it or remove it from {self._pattern!r}")
        if EPOCH_SHORT in message:
            return ValueError(f"{self._pattern!r}: too many undecodable records to fill an "
                              f"epoch of {self.info.steps_per_epoch} steps ({message.splitlines()[0]})")
        if views.TOO_FEW_IMAGES in message:
            return ValueError(f"{self._pattern!r}: a {views.TOO_FEW_IMAGES}: "
                              f"{message.splitlines()[0]}")
        return error


def _failing_record(message: str, files: tuple[str, ...]) -> tuple[str, str, str]:
    """(file, record index, readable flag) from a failed scan assertion's message."""
    file = re.search(r"\[file\] \[(\d+)\]", message)
    record = re.search(r"\[record\] \[(\d+)\]", message)
    readable = re.search(r"\[readable\] \[(\d+)\]", message)
    return (files[int(file.group(1))] if file else "?", record.group(1) if record else "?",
            readable.group(1) if readable else "?")


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


def _read_records(plan: shards.EpochPlan, start_epoch: int, skip_records: int, window: int,
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
            readable=e["readable"], file=e["file"], index=e["index"]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if window > 1:
            ds = ds.batch(window).enumerate().map(
                lambda i, w: _permute_window(w, augment.make_key(block_seed, i))).unbatch()
        return ds.skip(skip).take(take)

    return blocks.flat_map(read_block).prefetch(max(window, 1))


def _count_and_keep(*, start_epoch: int, first_quota: int, quota: int, allowance: int):
    """A scan over decoded records that keeps the first `quota` decodable ones of each epoch
    (`first_quota` for the epoch a run starts in) and counts the undecodable ones.

    Records of the epoch's main pass beyond the quota are its unused remainder (the reference's
    drop_last); undecodable records are replaced from that remainder, then from the spares
    (draw 1) that follow the epoch. Fails, naming the file and record, past `allowance`
    undecodable records in an epoch, at a shard unreadable from its first record, or when an
    epoch cannot be filled."""
    def scan(state, element):
        cur_epoch, dropped_e, kept_e, dropped, seen = state
        epoch = element["epoch"]
        fresh = tf.not_equal(epoch, cur_epoch)
        cur_limit = tf.where(tf.equal(cur_epoch, start_epoch), tf.constant(first_quota, tf.int64),
                             tf.constant(quota, tf.int64))
        filled = tf.logical_or(tf.logical_not(fresh),
                               tf.logical_or(cur_epoch < 0, kept_e >= cur_limit))
        check_filled = tf.debugging.Assert(
            filled, [EPOCH_SHORT, "epoch", cur_epoch, "kept", kept_e, "quota", cur_limit])
        dropped_e = tf.where(fresh, tf.constant(0, tf.int64), dropped_e)
        kept_e = tf.where(fresh, tf.constant(0, tf.int64), kept_e)
        main = tf.equal(element["draw"], 0)
        ok, readable = element["ok"], element["readable"]
        bad = tf.cast(tf.logical_and(main, tf.logical_not(ok)), tf.int64)
        whole_file = tf.logical_and(main, tf.logical_and(tf.logical_not(readable),
                                                         tf.equal(element["index"], 0)))
        check_file = tf.debugging.Assert(
            tf.logical_not(whole_file), [UNREADABLE_FILE, "file", element["file"]])
        limit = tf.where(tf.equal(epoch, start_epoch), tf.constant(first_quota, tf.int64),
                         tf.constant(quota, tf.int64))
        keep = tf.logical_and(ok, kept_e < limit)
        dropped_e += bad
        check_bad = tf.debugging.Assert(
            dropped_e <= tf.constant(allowance, tf.int64),
            [TOO_MANY_BAD, "epoch", epoch, "dropped", dropped_e, "file", element["file"],
             "record", element["index"], "readable", readable])
        with tf.control_dependencies([check_filled, check_file, check_bad]):
            kept_e += tf.cast(keep, tf.int64)
        out = dict(element, keep=keep, _dropped=dropped + bad, _seen=seen + 1)
        return (epoch, dropped_e, kept_e, dropped + bad, seen + 1), out
    zero = tf.constant(0, tf.int64)
    return (tf.constant(-1, tf.int64), zero, zero, zero, zero), scan


def make_train_iterator(data_config, *, batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0,
                        tokenizer_dir: str | None = None,
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

    `steps_per_epoch` is the trainer's (`train.training_length`); by default it is computed the
    same way (`shards.steps_per_epoch`). `num_threads` caps tf.data's CPU threads (default: all
    cores)."""
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
    pattern = data_config.train_files
    if not pattern:
        raise ValueError("set data.train_files to a glob of TFRecord shards")

    all_files = shards.matching_files(pattern)
    files = host_files(pattern, process_index, process_count)
    all_counts = shards.count_records(all_files)
    count_of = dict(zip(all_files, all_counts))
    counts = [count_of[f] for f in files]
    shards.check_not_empty(files, counts)
    manifests = shards.read_manifests(all_files)
    offsets = shards.label_offsets(manifests)
    _check_images_per_caption(manifests, n_img)
    plan = shards.EpochPlan(files=tuple(files), counts=tuple(counts), seed=int(seed),
                            host=process_index,
                            files_per_block=max(1, min(files_per_block, len(files))),
                            offsets=tuple(offsets[os.path.dirname(f)] for f in files))
    n = plan.records_per_epoch
    if steps_per_epoch is None:
        steps_per_epoch = shards.steps_per_epoch(all_counts, batch_size, process_count)
    if steps_per_epoch < 1:
        raise ValueError(f"{pattern!r} ({len(all_files)} files) holds fewer than one batch of "
                         f"{host_batch} captions for host {process_index} of {process_count} "
                         f"({n} records)")
    if steps_per_epoch * host_batch > n:
        raise ValueError(f"{steps_per_epoch} steps per epoch of {host_batch} captions need "
                         f"{steps_per_epoch * host_batch} records on host {process_index}, but its "
                         f"share of {pattern!r} holds {n} (data.num_captions too large?)")
    allowance = int(np.floor(max_bad * n))
    start_epoch, step_in_epoch = divmod(int(start_step), steps_per_epoch)
    info = StreamInfo(files=tuple(files), records_per_epoch=n, host_batch=host_batch,
                      steps_per_epoch=steps_per_epoch, bad_allowance=allowance,
                      start_epoch=start_epoch, start_step_in_epoch=step_in_epoch)
    logging.info("input: host %d/%d reads %d files, %d records/epoch, %d steps/epoch of %d "
                 "captions; starting at epoch %d step %d", process_index, process_count,
                 len(files), n, steps_per_epoch, host_batch, start_epoch, step_in_epoch)

    ds = _read_records(plan, start_epoch, step_in_epoch * host_batch,
                       int(data_config.shuffle_buffer), spare_records=min(n, 2 * allowance),
                       n_img=n_img, seed=int(seed))
    ds = ds.interleave(lambda e: views.safe_decode(e, n_img=n_img, num_crop=num_crop,
                                                   seed=int(seed), spec=spec),
                       cycle_length=tf.data.AUTOTUNE, block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    init, scan = _count_and_keep(
        start_epoch=start_epoch, first_quota=(steps_per_epoch - step_in_epoch) * host_batch,
        quota=steps_per_epoch * host_batch, allowance=allowance)
    ds = ds.scan(init, scan).filter(lambda e: e["keep"])

    def to_views(e):
        out = views.augment_views(e, spec=spec, num_crop=num_crop, seed=int(seed))
        out.update(_dropped=e["_dropped"], _seen=e["_seen"])
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
        return tokenize.tokenize(tokenizer, captions)

    def add(batch):
        out = _drop_captions(batch)
        ids = tf.numpy_function(tokens, [batch["caption"]], tf.int32, stateful=False)
        out["tokens"] = tf.ensure_shape(ids, [batch["caption"].shape[0], tokenize.CONTEXT_LENGTH])
        return out
    return add


def _check_images_per_caption(manifests: dict[str, dict | None], n_img: int) -> None:
    """Fails early when a manifest says the shards hold fewer than n_img images per caption."""
    for directory, manifest in sorted(manifests.items()):
        k = (manifest or {}).get("images_per_caption")
        if k is not None and int(k) < n_img:
            raise ValueError(f"data.n_img={n_img} but {directory}/manifest.json says "
                             f"images_per_caption={k}: each caption needs at least n_img images")
