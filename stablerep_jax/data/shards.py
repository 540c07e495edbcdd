"""Which TFRecord shards a host reads, how many records each holds, and the order of an epoch.

An epoch on a host is a deterministic function of (seed, epoch, host): the host's files are
permuted and taken in blocks of `files_per_block`; the files of a block are interleaved record
by record and permuted in windows (see `pipeline`). Because the record count of every file is known (from
`manifest.json`, else counted once), a restart can jump to any record of any epoch by skipping
whole epochs and blocks arithmetically and reading at most one block.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import logging

from stablerep_jax.data import records


def host_files(pattern: str, process_index: int, process_count: int) -> list[str]:
    """This host's disjoint share (every `process_count`-th file) of the sorted glob."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} / process_count {process_count}: "
                         "need 0 <= index < count")
    files = sorted(f for f in tf.io.gfile.glob(pattern)
                   if not f.endswith(records.TMP_SUFFIX)
                   and os.path.basename(f) != records.MANIFEST_NAME)
    if not files:
        raise FileNotFoundError(f"data.train_files={pattern!r} matches no file")
    if len(files) < process_count:
        raise ValueError(f"data.train_files={pattern!r} matches {len(files)} files, fewer than "
                         f"the {process_count} hosts; every host needs at least one file "
                         "(write more shards)")
    return files[process_index::process_count]


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
            counts.append(int(tf.data.TFRecordDataset(path).reduce(
                np.int64(0), lambda n, _: n + 1).numpy()))
    return counts


@dataclasses.dataclass(frozen=True)
class Block:
    """A group of files read together in one epoch; `skip` records are dropped from its start."""
    epoch: int
    files: tuple[str, ...]
    skip: int = 0


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """A host's files, their record counts, and how epochs are cut into blocks."""
    files: tuple[str, ...]
    counts: tuple[int, ...]
    seed: int
    host: int
    files_per_block: int

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

    def iter_blocks(self, start_epoch: int, skip_records: int):
        """Blocks from `start_epoch` on, forever, the first `skip_records` of that epoch skipped."""
        epoch, skip = start_epoch, skip_records
        while True:
            for idx, count in self.blocks(epoch):
                if skip >= count:
                    skip -= count
                    continue
                yield Block(epoch=epoch, files=tuple(self.files[i] for i in idx), skip=skip)
                skip = 0
            epoch += 1

    def block_seed(self, block: Block) -> int:
        """Seed of a block's window permutations: (seed, epoch, host, first file), not skips."""
        first = self.files.index(block.files[0])
        return int(np.random.default_rng([self.seed, block.epoch, self.host, first]).integers(2**62))
