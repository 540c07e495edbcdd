"""How much a batch's captions cluster in the captions file: the batch-composition measure.

When a captions file is ordered by content (RedCaps is grouped by subreddit), captions that lie
close together in it are related, and a batch made of runs of neighbouring captions has
correlated negatives. The measure: among all pairs of captions in the same batch, the fraction
whose caption ids lie within N/100 of each other (N captions). For batches drawn from a global
random permutation, as the reference's DistributedSampler draws them, it is about 2%
(`permutation_fraction`); a layout is acceptable when it stays within 1.3x of that.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def near_distance(num_captions: int) -> int:
    """Two caption ids are "near" when they differ by at most this (N/100, at least 1)."""
    return max(1, num_captions // 100)


def near_pair_counts(batches: Iterable[np.ndarray], num_captions: int) -> tuple[int, int]:
    """(near same-batch pairs, all same-batch pairs) over batches of caption ids."""
    d = near_distance(num_captions)
    near = total = 0
    for labels in batches:
        ids = np.sort(np.asarray(labels, np.int64).ravel())
        n = len(ids)
        total += n * (n - 1) // 2
        # For each caption, how many later (sorted) captions lie within d of it.
        near += int((np.searchsorted(ids, ids + d, side="right") - np.arange(1, n + 1)).sum())
    return near, total


def near_pair_fraction(batches: Iterable[np.ndarray], num_captions: int) -> float:
    near, total = near_pair_counts(batches, num_captions)
    if total == 0:
        raise ValueError("no batch holds two captions: nothing to measure")
    return near / total


def permutation_fraction(num_captions: int) -> float:
    """The expected fraction for batches of a uniform random permutation: the chance that two
    distinct captions drawn at random lie within `near_distance` of each other."""
    n, d = num_captions, near_distance(num_captions)
    if n < 2:
        raise ValueError(f"num_captions={n}: need at least 2 captions")
    d = min(d, n - 1)
    return (2 * d * n - d * (d + 1)) / (n * (n - 1))
