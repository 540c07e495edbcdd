"""The TFRecord schema that `generate` and `import_images` write and `train` reads.

One example per caption:
  caption     bytes      UTF-8 caption text
  caption_id  int64      0-based index among the captions kept from the captions file
  images      bytes[K]   K encoded images (JPEG or PNG)
  seeds       int64[K]   one seed per image

Shards are written under a temporary name and renamed when complete, so a file with the final
name is always whole. `manifest.json` in the output directory lists the finished shards.
Writing needs no TensorFlow graph work; parsing is a tf.function-friendly map for tf.data.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
from PIL import Image

from stablerep_jax import fileio

MANIFEST_NAME = "manifest.json"
TMP_SUFFIX = fileio.TMP_SUFFIX
SHARD_SUFFIX = ".tfrecord"
IMAGE_FORMATS = ("jpeg", "png")     # what the `images` field may hold


@dataclass
class CaptionRecord:
    """One caption with its K images, the unit of a TFRecord example."""
    caption: str
    caption_id: int
    images: Sequence[bytes]
    seeds: Sequence[int] = field(default_factory=list)


def _bytes_feature(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _int_feature(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_image(image, image_format: str, jpeg_quality: int = 95) -> bytes:
    """A picture (PIL image or uint8 [H, W, 3]) -> the JPEG/PNG bytes an `images` entry holds."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}: choose one of {IMAGE_FORMATS}")
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    out = io.BytesIO()
    if image_format == "jpeg":
        img.save(out, format="JPEG", quality=jpeg_quality)
    else:
        img.save(out, format="PNG")
    return out.getvalue()


def encode_example(record: CaptionRecord) -> bytes:
    """Serialises one caption record to a tf.train.Example proto string."""
    if len(record.images) == 0:
        raise ValueError(f"caption_id {record.caption_id}: a record needs at least one image")
    if record.seeds and len(record.seeds) != len(record.images):
        raise ValueError(
            f"caption_id {record.caption_id}: {len(record.seeds)} seeds for "
            f"{len(record.images)} images")
    features = {
        "caption": _bytes_feature([record.caption.encode("utf-8")]),
        "caption_id": _int_feature([record.caption_id]),
        "images": _bytes_feature(record.images),
        "seeds": _int_feature(record.seeds or [-1] * len(record.images)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


FEATURE_SPEC = {
    "caption": tf.io.FixedLenFeature([], tf.string),
    "caption_id": tf.io.FixedLenFeature([], tf.int64),
    "images": tf.io.VarLenFeature(tf.string),
    "seeds": tf.io.VarLenFeature(tf.int64),
}


def parse_example(serialized: tf.Tensor) -> dict:
    """Parses one serialized example into dense tensors (images: string [K], seeds: int64 [K])."""
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    return {
        "caption": parsed["caption"],
        "caption_id": parsed["caption_id"],
        "images": tf.sparse.to_dense(parsed["images"], default_value=b""),
        "seeds": tf.sparse.to_dense(parsed["seeds"], default_value=-1),
    }


def decode_record(serialized: bytes) -> CaptionRecord:
    """Eager, pure-Python decoding of one example; for tests, tools and resume checks."""
    example = tf.train.Example.FromString(serialized)
    f = example.features.feature
    return CaptionRecord(
        caption=f["caption"].bytes_list.value[0].decode("utf-8"),
        caption_id=int(f["caption_id"].int64_list.value[0]),
        images=list(f["images"].bytes_list.value),
        seeds=[int(s) for s in f["seeds"].int64_list.value],
    )


def read_records(path: str, limit: int | None = None) -> list[CaptionRecord]:
    """Reads the records of one finished shard (only the first `limit` when given)."""
    dataset = tf.data.TFRecordDataset(path)
    if limit is not None:
        dataset = dataset.take(limit)
    return [decode_record(bytes(r.numpy())) for r in dataset]


def write_shard(path: str, records: Iterable[CaptionRecord]) -> int:
    """Writes a shard atomically (local or any tf.io.gfile path): to `path + .tmp`, then renamed.
    Returns the record count.

    A crash leaves at most a `.tmp` file, which readers never match and writers overwrite.
    """
    count = 0
    with fileio.atomic_path(path) as tmp:
        with tf.io.TFRecordWriter(tmp) as writer:
            for record in records:
                writer.write(encode_example(record))
                count += 1
    return count


def read_manifest(directory: str) -> dict | None:
    """The parsed `manifest.json` of a shard directory (local, gs:// or any tf.io.gfile path),
    or None when there is none."""
    try:
        return fileio.read_json(os.path.join(directory, MANIFEST_NAME))
    except FileNotFoundError:
        return None


def check_rerun_settings(path: str, settings: dict) -> bool:
    """Whether this is a rerun: True when an output directory's settings file (`path`) exists.
    Raises, naming each changed key, when it records other settings than `settings`. Writing
    the file is left to the caller."""
    try:
        previous = fileio.read_json(path)
    except FileNotFoundError:
        return False
    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    if changed:
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        raise ValueError(f"{os.path.dirname(path)} holds data made with other settings "
                         f"({details}); use a new output_dir or the settings in {path}")
    return True


def write_manifest(directory: str, shards: dict, **meta) -> dict:
    """Writes `manifest.json`: `shards` maps a finished shard's file name to at least
    {"captions": int, "images": int}; `meta` (e.g. images_per_caption, model, config) is stored
    beside it. Totals are derived here so readers never have to re-count records."""
    manifest = dict(meta)
    manifest["shards"] = {name: dict(info) for name, info in sorted(shards.items())}
    manifest["num_shards"] = len(shards)
    manifest["num_captions"] = sum(int(s["captions"]) for s in shards.values())
    manifest["num_images"] = sum(int(s["images"]) for s in shards.values())
    fileio.write_json_atomic(os.path.join(directory, MANIFEST_NAME), manifest)
    return manifest
