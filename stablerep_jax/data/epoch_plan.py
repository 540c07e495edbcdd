"""The order in which a host reads its shards in an epoch.

An epoch on a host is a deterministic function of (seed, epoch, host): the host's files are
permuted and taken in blocks of `files_per_block`; the files of a block are interleaved record
by record and permuted in windows (see `pipeline`). Because the record count of every file is
known (`train_set.TrainSet`), a restart can jump to any record of any epoch by skipping whole
epochs and blocks arithmetically and reading at most one block.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np


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
