"""Which captions a written shard holds: a seeded global permutation, as TFDS shuffles at write time.

`generate` and `import_images` put captions perm[S*P:(S+1)*P], in that order, into shard S, where
perm is a permutation of all caption ids and P is captions_per_shard. Every shard is then a
uniform random sample of the data set, in random order, whatever the order of the captions file
(RedCaps is grouped by subreddit, for instance), so the few shards a training host interleaves
at a time, and hence a batch, hold no runs of neighbouring captions. (Sorting a shard would
undo part of this: records read one after another would be close in the file.) `caption_id` stays the caption's index in the
captions file: labels, resume and the images generated for a caption do not change.

The permutation is computed from raw PCG64 output (a stream NumPy guarantees not to change) and
a stable argsort, so a resumed `generate` on another NumPy version puts every caption into the
same shard. Writers record `order_info()` in settings.json (so a rerun into an output written
with another layout stops, naming it) and in manifest.json (`is_permuted`).
"""
from __future__ import annotations

import numpy as np

ORDER_KEY = "caption_order"      # settings.json / manifest.json key holding `order_info()`
ORDER_SEED = 20230602            # fixed: the layout needs no knob, only to be recorded
_KIND = "permuted"
_VERSION = 1


def order_info(seed: int = ORDER_SEED) -> dict:
    """What a manifest records about the caption -> shard assignment."""
    return {"kind": _KIND, "version": _VERSION, "seed": int(seed)}


def is_permuted(manifest: dict | None) -> bool:
    """Whether a shard directory's manifest says its shards hold permuted captions."""
    info = (manifest or {}).get(ORDER_KEY)
    return isinstance(info, dict) and info.get("kind") == _KIND


def caption_order(num_captions: int, captions_per_shard: int,
                  seed: int = ORDER_SEED) -> np.ndarray:
    """int64 [num_captions]: a permutation of 0..num_captions-1; its consecutive slices of
    `captions_per_shard` are the shards' captions in writing order."""
    if num_captions < 0 or captions_per_shard < 1:
        raise ValueError(f"num_captions={num_captions}, captions_per_shard={captions_per_shard}: "
                         "need num_captions >= 0 and captions_per_shard >= 1")
    keys = np.random.PCG64([int(seed), int(num_captions)]).random_raw(num_captions)
    return np.argsort(keys, kind="stable").astype(np.int64)


def shard_slices(num_captions: int, captions_per_shard: int,
                 seed: int = ORDER_SEED) -> list[np.ndarray]:
    """Caption ids of every shard, in shard order (views into one permutation array)."""
    order = caption_order(num_captions, captions_per_shard, seed)
    return [order[start:start + captions_per_shard]
            for start in range(0, num_captions, captions_per_shard)]
