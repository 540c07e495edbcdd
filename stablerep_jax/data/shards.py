"""Which TFRecord shards a host reads, how many records each holds, and the order of an epoch.

An epoch on a host is a deterministic function of (seed, epoch, host): the host's files are
permuted and taken in blocks of `files_per_block`; the files of a block are interleaved record
by record and permuted in windows (see `pipeline`). Because the record count of every file is known (from
`manifest.json`, else counted once), a restart can jump to any record of any epoch by skipping
whole epochs and blocks arithmetically and reading at most one block.

Also here, because every host must agree on them: which files a glob means (`matching_files`:
no manifests or other job outputs), the steps of an epoch (`steps_per_epoch`, shared with the
trainer's schedule), and the label offset of each directory (`label_offsets`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from stablerep_jax.data import records


# Names a glob can match in an output directory that are not shards (jobs write these beside them).
NOT_RECORD_EXTENSIONS = (".json", ".txt", ".png", ".jpg", ".jpeg", ".webp", ".csv", ".tsv",
                         ".md", ".log", ".html", ".yaml", ".yml", ".npy", ".npz", ".pth")


def matching_files(pattern: str) -> list[str]:
    """The sorted shard files of a glob (the same list on every host). Temporary files of
    writers in progress are skipped; any other file that is not a TFRecord shard by its name
    (manifest.json, settings.json, missing.txt, a contact sheet) is an error naming it."""
    files = sorted(f for f in tf.io.gfile.glob(pattern) if not f.endswith(records.TMP_SUFFIX))
    if not files:
        raise FileNotFoundError(f"data.train_files={pattern!r} matches no file")
    others = [f for f in files if os.path.splitext(f)[1].lower() in NOT_RECORD_EXTENSIONS]
    if others:
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        raise ValueError(f"data.train_files={pattern!r} matches files that are not TFRecord "
                         f"shards: {shown}; narrow the glob (e.g. DIR/*{records.SHARD_SUFFIX})")
    return files


def host_files(pattern: str, process_index: int, process_count: int) -> list[str]:
    """This host's disjoint share (every `process_count`-th file) of the sorted glob."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} / process_count {process_count}: "
                         "need 0 <= index < count")
    files = matching_files(pattern)
    if len(files) < process_count:
        raise ValueError(f"data.train_files={pattern!r} matches {len(files)} files, fewer than "
                         f"the {process_count} hosts; every host needs at least one file "
                         "(write more shards)")
    return files[process_index::process_count]


def steps_per_epoch(counts: Sequence[int], batch_size: int, process_count: int) -> int:
    """Steps in an epoch: `counts` are the records of every file of the sorted glob; host h
    reads files h, h + process_count, ... and every host must take the same number of steps,
    so an epoch is the smallest host share // (batch_size // process_count). On one host this
    is records // batch_size, the reference's DistributedSampler + drop_last."""
    host_batch = batch_size // process_count
    if host_batch < 1 or batch_size % process_count:
        raise ValueError(f"batch_size {batch_size} does not split over {process_count} hosts")
    shares = [sum(counts[h::process_count]) for h in range(process_count)]
    return min(shares) // host_batch


def read_manifests(files: Sequence[str]) -> dict[str, dict | None]:
    """{directory: its parsed manifest.json or None}, for the directories of `files`, sorted."""
    return {d: records.read_manifest(d) for d in sorted({os.path.dirname(f) for f in files})}


def _caption_id_range(directory: str, manifest: dict | None) -> int:
    """How many caption ids a directory's shards may use (ids lie in [0, range))."""
    if manifest and manifest.get("num_caption_ids") is not None:
        return int(manifest["num_caption_ids"])
    raise ValueError(
        f"data.train_files spans several directories, so labels are caption_id + an offset per "
        f"directory, but {directory}/{records.MANIFEST_NAME} is missing or does not say how many "
        "caption ids its shards use (num_caption_ids, which generate and import_images record): "
        "write that directory with them, or train on one directory")


def label_offsets(manifests: dict[str, dict | None]) -> dict[str, int]:
    """{directory: offset added to its caption ids}: 0 for one directory (labels are its caption
    ids); else the caption-id ranges of the directories before it in sorted order, so two
    directories' captions never share a label. The same on every host."""
    directories = sorted(manifests)
    if len(directories) == 1:
        return {directories[0]: 0}
    offsets, total = {}, 0
    for directory in directories:
        offsets[directory] = total
        total += _caption_id_range(directory, manifests[directory])
    if total >= 2**31:
        raise ValueError(f"{total} caption ids over {len(directories)} directories do not fit "
                         "int32 labels")
    return offsets


def check_not_empty(files: Sequence[str], counts: Sequence[int], threads: int = 16) -> None:
    """A shard of zero bytes that should hold records (a failed copy, a full disk) is an error
    naming it, before training starts rather than when the stream reaches it."""
    listed = [f for f, c in zip(files, counts) if c > 0]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        sizes = list(pool.map(lambda f: tf.io.gfile.stat(f).length, listed))
    empty = [f for f, size in zip(listed, sizes) if size == 0]
    if empty:
        raise ValueError(f"{len(empty)} shard(s) are empty (0 bytes) but their manifest lists "
                         f"records: {', '.join(empty[:10])}; regenerate them")


def _manifest_counts(directory: str) -> dict[str, int] | None:
    """{shard file name: captions} from the directory's manifest.json; None without one."""
    manifest = records.read_manifest(directory)
    if manifest is None:
        return None
    path = os.path.join(directory, records.MANIFEST_NAME)
    try:
        return {name: int(info["captions"]) for name, info in manifest.get("shards", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: a shard entry lacks an integer 'captions' count ({e})") from e


def count_records(files: list[str], *, unlisted: str = "read") -> list[int]:
    """Records per file, from each directory's manifest.json.

    A file no manifest lists is counted by reading it (`unlisted="read"`: the input pipeline,
    which reads it anyway) or raises FileNotFoundError naming it (`unlisted="error"`: sizing a
    schedule should not read terabytes; the caller can ask for the count instead)."""
    if unlisted not in ("read", "error"):
        raise ValueError(f"unlisted={unlisted!r}: expected 'read' or 'error'")
    manifests: dict[str, dict[str, int] | None] = {}
    counts = []
    for path in files:
        directory, name = os.path.split(path)
        if directory not in manifests:
            manifests[directory] = _manifest_counts(directory)
        listed = manifests[directory] or {}
        if name in listed:
            counts.append(listed[name])
        elif unlisted == "error":
            where = (f"is not listed in {directory}/{records.MANIFEST_NAME}"
                     if manifests[directory] is not None
                     else f"has no {records.MANIFEST_NAME} beside it")
            raise FileNotFoundError(f"{path} {where}")
        else:
            logging.warning("%s is not in a manifest.json; counting its records (reads the file)",
                            path)
            counts.append(_count_by_reading(path))
    return counts


def _count_by_reading(path: str) -> int:
    """Records in a file no manifest lists; a corrupt or truncated file is an error naming it."""
    try:
        count = int(tf.data.TFRecordDataset(path).ignore_errors().reduce(
            np.int64(0), lambda n, _: n + 1).numpy())
        if count == 0:     # a directory, an unreadable or empty file: say why, naming it
            tf.data.TFRecordDataset(path).take(1).reduce(np.int64(0), lambda n, _: n)
    except tf.errors.OpError as e:
        raise ValueError(f"{path}: cannot be read as a TFRecord file ({e.message.splitlines()[0]})") from e
    try:
        tf.data.TFRecordDataset(path).skip(count).take(1).reduce(np.int64(0), lambda n, _: n)
    except tf.errors.OpError as e:
        raise ValueError(f"{path}: corrupt or truncated TFRecord after record {count} (no "
                         "manifest lists it, so it cannot be read past the damage); fix or "
                         "remove it") from e
    return count


@dataclasses.dataclass(frozen=True)
class Block:
    """A group of files read together in one epoch: `skip` records are dropped from its start
    and at most `take` (None: all) are read. Spare blocks re-read the epoch's first records,
    from which undecodable records are replaced (see `pipeline`)."""
    epoch: int
    files: tuple[str, ...]
    skip: int = 0
    take: int | None = None
    spare: bool = False


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """A host's files, their record counts and label offsets, and how epochs are cut into blocks."""
    files: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    host: int
    files_per_block: int
    offsets: tuple[int, ...] = ()      # label offset of each file (default 0)

    @property
    def records_per_epoch(self) -> int:
        return sum(self.counts)

    def blocks(self, epoch: int) -> list[tuple[tuple[int, ...], int]]:
        """(file indices, record count) of each block of `epoch`, in reading order."""
        order = np.random.default_rng([self.seed, epoch, self.host, 0xF11E]).permutation(len(self.files))
        out = []
        for start in range(0, len(order), self.files_per_block):
            idx = tuple(int(i) for i in order[start:start + self.files_per_block])
            out.append((idx, sum(self.counts[i] for i in idx)))
        return out

    def iter_blocks(self, start_epoch: int, skip_records: int, spare_records: int = 0):
        """Blocks from `start_epoch` on, forever, the first `skip_records` of that epoch skipped;
        after each epoch, spare blocks holding its first `spare_records` records again."""
        epoch, skip = start_epoch, skip_records
        while True:
            blocks = self.blocks(epoch)
            for idx, count in blocks:
                if skip >= count:
                    skip -= count
                    continue
                yield Block(epoch=epoch, files=tuple(self.files[i] for i in idx), skip=skip)
                skip = 0
            left = spare_records
            for idx, count in blocks:
                if left <= 0:
                    break
                yield Block(epoch=epoch, files=tuple(self.files[i] for i in idx),
                            take=min(left, count), spare=True)
                left -= count
            epoch += 1

    @functools.cached_property
    def _position(self) -> dict[str, int]:
        return {f: i for i, f in enumerate(self.files)}

    def position(self, path: str) -> int:
        return self._position[path]

    def offset(self, path: str) -> int:
        return self.offsets[self._position[path]] if self.offsets else 0

    def count(self, path: str) -> int:
        return self.counts[self._position[path]]

    def block_seed(self, block: Block) -> int:
        """Seed of a block's window permutations: (seed, epoch, host, first file), not skips."""
        first = self._position[block.files[0]]
        return int(np.random.default_rng([self.seed, block.epoch, self.host, first]).integers(2**62))
