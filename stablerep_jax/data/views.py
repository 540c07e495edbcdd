"""Per-record work of the training pipeline: pick m of a caption's K images, decode the m x
num_crop crops of their views, and turn those into augmented views.

Randomness is keyed by (seed, epoch, label[, view], draw) only (label = caption_id + the
offset of the record's directory), so the images sampled for a
caption and their augmentations do not depend on batch size, host count, shuffling or where a
run was resumed. Decoding is separated from augmentation so that only undecodable *data* is
dropped (see `safe_decode`), while a bug in augmentation still fails loudly. A view's crop box
and the rest of it come from the same view key (`augment.decode_view_crops`, `prepare_view`),
so a view equals `augment.prepare_image(view_key, decoded image)`.
"""
from __future__ import annotations

import tensorflow as tf

from stablerep_jax.data import augment, records

TOO_FEW_IMAGES = "record holds fewer images than data.n_img"
_SAMPLE_SALT = 1
_VIEW_SALT = 2


def parse_and_sample(serialized, epoch, *, n_img: int, seed: int, readable=True,
                     label_offset=0, draw=0) -> dict:
    """Parses one record and keeps `n_img` of its K encoded images, drawn without replacement,
    fresh for every epoch. Fails (a hard error, not a drop) when K < n_img.

    `label` = caption_id + `label_offset` (unique across the directories a run reads) keys the
    randomness; `draw` is 0 for a record's first use in an epoch and 1 when it is re-read as a
    spare, so a spare gets other images and views. An unreadable record (`readable` False: the
    corrupt tail of a shard) becomes an element with no images, which `safe_decode` flags."""
    def parsed():
        rec = records.parse_example(serialized)
        num = tf.shape(rec["images"])[0]
        check = tf.debugging.Assert(
            num >= n_img, [TOO_FEW_IMAGES, "caption_id", rec["caption_id"], "images", num,
                           "n_img", n_img])
        label = rec["caption_id"] + tf.cast(label_offset, tf.int64)
        with tf.control_dependencies([check]):
            key = augment.make_key(seed, _SAMPLE_SALT, epoch, label, draw)
            order = tf.argsort(tf.random.stateless_uniform([num], seed=key))
        return (rec["caption"], rec["caption_id"], label,
                tf.ensure_shape(tf.gather(rec["images"], order[:n_img]), [n_img]))

    def unreadable():
        return (tf.constant(b""), tf.constant(-1, tf.int64), tf.constant(-1, tf.int64),
                tf.fill([n_img], b""))

    caption, caption_id, label, encoded = tf.cond(tf.cast(readable, tf.bool), parsed, unreadable)
    return {"caption": caption, "caption_id": caption_id, "label": label, "epoch": epoch,
            "draw": tf.cast(draw, tf.int64), "encoded": encoded}


def view_key(seed: int, epoch, label, view: int, draw=0):
    return augment.make_key(seed, _VIEW_SALT, epoch, label, view, draw)


def _view_keys(element: dict, image: int, num_crop: int, seed: int) -> list:
    """The keys of stored image `image`'s views (image-major view numbering)."""
    return [view_key(seed, element["epoch"], element["label"], image * num_crop + c,
                     element["draw"]) for c in range(num_crop)]


def _decode_all(element: dict, n_img: int, num_crop: int, seed: int,
                spec: augment.AugmentSpec) -> dict:
    crops, short_sides = [], []
    for i in range(n_img):
        image_crops, short_side = augment.decode_view_crops(
            element["encoded"][i], _view_keys(element, i, num_crop, seed), spec)
        crops.extend(image_crops)
        short_sides.extend([short_side] * num_crop)
    out = {k: v for k, v in element.items() if k != "encoded"}
    out["crops"] = tuple(crops)
    out["short_sides"] = tf.stack(short_sides)
    out["ok"] = tf.constant(True)
    return out


def _placeholder(element: dict, num_views: int) -> dict:
    out = {k: v for k, v in element.items() if k != "encoded"}
    out["crops"] = tuple(tf.zeros([1, 1, 3], tf.uint8) for _ in range(num_views))
    out["short_sides"] = tf.ones([num_views], tf.int32)
    out["ok"] = tf.constant(False)
    return out


def safe_decode(element: dict, *, n_img: int, num_crop: int, seed: int,
                spec: augment.AugmentSpec) -> tf.data.Dataset:
    """A one-element dataset: the decoded crops of the n_img x num_crop views (uint8, image-
    major) with ok=True, or, when any of the bytes fail to decode, 1x1 placeholders with
    ok=False. Used with `interleave`, so a bad record becomes a flagged element that the
    pipeline can count instead of an error that stops it. Only the crop boxes (a few tested
    lines) run inside this error net besides decoding; the rest of the view fails loudly."""
    decoded = tf.data.Dataset.from_tensors(element).map(
        lambda e: _decode_all(e, n_img, num_crop, seed, spec)).ignore_errors()
    fallback = tf.data.Dataset.from_tensors(element).map(
        lambda e: _placeholder(e, n_img * num_crop))
    return decoded.concatenate(fallback).take(1)


def augment_views(element: dict, *, spec: augment.AugmentSpec, num_crop: int, seed: int) -> dict:
    """[n_img * num_crop, S, S, 3] uint8 views, image-major: (img0 crop0, img0 crop1, img1 crop0,
    ...), from `safe_decode`'s crops, plus their colour parameters [V, NUM_PARAMS] under
    `augment.PARAMS_KEY`, which `device_augment.finish_views` applies in the train step."""
    views, params = [], []
    for v, crop in enumerate(element["crops"]):
        key = view_key(seed, element["epoch"], element["label"], v, element["draw"])
        view, view_params = augment.prepare_view(key, crop, spec, element["short_sides"][v])
        views.append(view)
        params.append(view_params)
    return {"images": tf.stack(views), augment.PARAMS_KEY: tf.stack(params),
            "labels": tf.cast(element["label"], tf.int32), "caption": element["caption"]}
