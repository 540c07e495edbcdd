"""The training data set, resolved once: which shards a glob means, their record counts, the
manifests beside them and the label offset of each directory.

`train` builds one `TrainSet` at start-up and hands it to everything that needs the data's
identity or size: the schedule (`steps_per_epoch`), the resume check (`fingerprint`) and the
input pipeline (`host_share`). None of them globs or counts again, so a shard that lands while
a run starts (generate still writing) cannot make the schedule, the resume check and the
stream disagree: it is simply not part of this run.

Every host builds the same object (sorted glob, the same manifests), so all hosts agree on the
steps of an epoch and on labels.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from stablerep_jax.data import records

# Names a glob can match in an output directory that are not shards (jobs write these beside them).
NOT_RECORD_EXTENSIONS = (".json", ".txt", ".png", ".jpg", ".jpeg", ".webp", ".csv", ".tsv",
                         ".md", ".log", ".html", ".yaml", ".yml", ".npy", ".npz", ".pth")


@dataclasses.dataclass(frozen=True)
class HostShare:
    """One host's disjoint share of a `TrainSet`: every `process_count`-th file of the sorted
    glob, with its record count and the label offset of its directory."""
    files: tuple[str, ...]
    counts: tuple[int, ...]
    offsets: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TrainSet:
    """The shards of `data.train_files` as they were when the run started."""
    pattern: str
    files: tuple[str, ...]                      # the sorted glob
    counts: tuple[int, ...]                     # records (captions) per file
    manifests: Mapping[str, dict | None]        # {directory: manifest.json or None}
    label_offsets: Mapping[str, int]            # {directory: offset added to caption ids}

    @classmethod
    def resolve(cls, pattern: str) -> TrainSet:
        """Globs `pattern` once, reads each directory's manifest.json once and counts every
        shard (from the manifest; a shard none lists is counted by reading it, with a warning).
        Errors name the glob, the file or the manifest at fault."""
        if not pattern:
            raise ValueError("set data.train_files to a glob of TFRecord shards")
        files = matching_files(pattern)
        manifests = {d: records.read_manifest(d) for d in sorted({os.path.dirname(f) for f in files})}
        counts = _count_records(files, manifests)
        dataset = cls(pattern=pattern, files=tuple(files), counts=tuple(counts),
                      manifests=manifests, label_offsets=label_offsets(manifests))
        logging.info("training data %r: %d shards, %d records in %d director%s", pattern,
                     len(files), dataset.num_records, len(manifests),
                     "y" if len(manifests) == 1 else "ies")
        return dataset

    @property
    def num_records(self) -> int:
        return sum(self.counts)

    def fingerprint(self) -> list[list]:
        """[[file name, records], ...] sorted by name, what a resumed run must match. Names
        without their directory: the same shards moved elsewhere are the same data."""
        return [[os.path.basename(f), int(n)] for f, n in zip(self.files, self.counts)]

    def steps_per_epoch(self, batch_size: int, process_count: int) -> int:
        """Steps in an epoch: host h reads files h, h + process_count, ... and every host must
        take the same number of steps, so an epoch is the smallest host share //
        (batch_size // process_count). On one host this is records // batch_size, the
        reference's DistributedSampler + drop_last."""
        host_batch = batch_size // process_count
        if host_batch < 1 or batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} does not split over {process_count} hosts")
        shares = [sum(self.counts[h::process_count]) for h in range(process_count)]
        return min(shares) // host_batch

    def host_share(self, process_index: int, process_count: int) -> HostShare:
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} / process_count {process_count}: "
                             "need 0 <= index < count")
        if len(self.files) < process_count:
            raise ValueError(f"data.train_files={self.pattern!r} matches {len(self.files)} files, "
                             f"fewer than the {process_count} hosts; every host needs at least "
                             "one file (write more shards)")
        files = self.files[process_index::process_count]
        return HostShare(files=files, counts=self.counts[process_index::process_count],
                         offsets=tuple(self.label_offsets[os.path.dirname(f)] for f in files))

    def check_images_per_caption(self, n_img: int) -> None:
        """Fails early when a manifest says the shards hold fewer than n_img images per caption."""
        for directory, manifest in sorted(self.manifests.items()):
            k = (manifest or {}).get("images_per_caption")
            if k is not None and int(k) < n_img:
                raise ValueError(f"data.n_img={n_img} but {directory}/manifest.json says "
                                 f"images_per_caption={k}: each caption needs at least n_img images")


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


def _caption_id_range(directory: str, manifest: dict | None) -> int:
    """How many caption ids a directory's shards may use (ids lie in [0, range))."""
    if manifest and manifest.get("num_caption_ids") is not None:
        return int(manifest["num_caption_ids"])
    raise ValueError(
        f"data.train_files spans several directories, so labels are caption_id + an offset per "
        f"directory, but {directory}/{records.MANIFEST_NAME} is missing or does not say how many "
        "caption ids its shards use (num_caption_ids, which generate and import_images record): "
        "write that directory with them, or train on one directory")


def label_offsets(manifests: Mapping[str, dict | None]) -> dict[str, int]:
    """{directory: offset added to its caption ids}: 0 for one directory (labels are its caption
    ids); else the caption-id ranges of the directories before it in sorted order, so two
    directories' captions never share a label."""
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


def _listed_counts(directory: str, manifest: dict | None) -> dict[str, int]:
    """{shard file name: captions} from a directory's manifest ({} without one)."""
    if manifest is None:
        return {}
    try:
        return {name: int(info["captions"]) for name, info in manifest.get("shards", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{directory}/{records.MANIFEST_NAME}: a shard entry lacks an integer "
                         f"'captions' count ({e})") from e


def _count_records(files: Sequence[str], manifests: Mapping[str, dict | None]) -> list[int]:
    listed = {d: _listed_counts(d, m) for d, m in manifests.items()}
    counts = []
    for path in files:
        directory, name = os.path.split(path)
        if name in listed[directory]:
            counts.append(listed[directory][name])
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
