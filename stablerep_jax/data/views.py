"""Per-record work of the training pipeline: pick m of a caption's K images, decode the m x
num_crop crops of their views, and turn those into augmented views.

Randomness is keyed by (seed, epoch, label[, view], draw) only (label = caption_id + the
offset of the record's directory), so the images sampled for a
caption and their augmentations do not depend on batch size, host count, shuffling or where a
run was resumed. Decoding is separated from augmentation so that only undecodable *data* is
dropped (see `decode_crops`), while a bug in augmentation still fails loudly. A view's crop box
and the rest of it come from the same view key (`augment.decode_view_crops`, `prepare_view`),
so a view equals `augment.prepare_image(view_key, decoded image)`.
"""
from __future__ import annotations

import tensorflow as tf

from stablerep_jax.data import augment, records

# A record's status, carried with it: what `parse_and_sample` found. Decoding failures are
# found later by the pipeline (a record's marker arriving without it: `pipeline._with_markers`,
# `pipeline._count_and_keep`), without parsing any error text.
OK, UNREADABLE, TOO_FEW_IMAGES = 0, 1, 2
_SAMPLE_SALT = 1
_VIEW_SALT = 2


def parse_and_sample(serialized, epoch, *, n_img: int, seed: int, readable=True,
                     label_offset=0, draw=0) -> dict:
    """Parses one record and keeps `n_img` of its K encoded images, drawn without replacement,
    fresh for every epoch.

    `label` = caption_id + `label_offset` (unique across the directories a run reads) keys the
    randomness; `draw` is 0 for a record's first use in an epoch and 1 when it is re-read as a
    spare, so a spare gets other images and views. `status` says what is wrong with the record
    without raising: UNREADABLE (`readable` False: the corrupt tail of a shard; no images) or
    TOO_FEW_IMAGES (K < n_img; `num_images` says K)."""
    def parsed():
        rec = records.parse_example(serialized)
        num = tf.shape(rec["images"])[0]
        label = rec["caption_id"] + tf.cast(label_offset, tf.int64)
        key = augment.make_key(seed, _SAMPLE_SALT, epoch, label, draw)
        order = tf.argsort(tf.random.stateless_uniform([num], seed=key))
        padded = tf.concat([rec["images"], tf.fill([n_img], b"")], 0)   # read only when K < m
        picked = tf.gather(padded, tf.concat([order, num + tf.range(n_img)], 0)[:n_img])
        status = tf.where(num >= n_img, OK, TOO_FEW_IMAGES)
        return (rec["caption"], rec["caption_id"], label, tf.ensure_shape(picked, [n_img]),
                status, num)

    def unreadable():
        return (tf.constant(b""), tf.constant(-1, tf.int64), tf.constant(-1, tf.int64),
                tf.fill([n_img], b""), tf.constant(UNREADABLE), tf.constant(0))

    caption, caption_id, label, encoded, status, num = tf.cond(
        tf.cast(readable, tf.bool), parsed, unreadable)
    return {"caption": caption, "caption_id": caption_id, "label": label, "epoch": epoch,
            "draw": tf.cast(draw, tf.int64), "encoded": encoded, "status": status,
            "num_images": num}


def view_key(seed: int, epoch, label, view: int, draw=0):
    return augment.make_key(seed, _VIEW_SALT, epoch, label, view, draw)


def _view_keys(element: dict, image: int, num_crop: int, seed: int) -> list:
    """The keys of stored image `image`'s views (image-major view numbering)."""
    return [view_key(seed, element["epoch"], element["label"], image * num_crop + c,
                     element["draw"]) for c in range(num_crop)]


def decode_crops(element: dict, *, n_img: int, num_crop: int, seed: int,
                 spec: augment.AugmentSpec, decode) -> dict:
    """The element with its encoded images replaced by the decoded crops of its n_img x num_crop
    views (uint8, image-major) and their images' short sides. When `decode` is False (a record
    whose status is not OK, or the pipeline's marker of a record) the crops are 1x1
    placeholders and nothing is decoded. Raises (InvalidArgumentError) on undecodable bytes:
    only decoding and the crop boxes run here, so the pipeline can drop exactly those failures
    while a bug in the rest of the view fails loudly."""
    def decoded():
        crops, short_sides = [], []
        for i in range(n_img):
            image_crops, short_side = augment.decode_view_crops(
                element["encoded"][i], _view_keys(element, i, num_crop, seed), spec)
            crops.extend(image_crops)
            short_sides.extend([short_side] * num_crop)
        return tuple(crops), tf.stack(short_sides)

    def placeholders():
        return (tuple(tf.zeros([1, 1, 3], tf.uint8) for _ in range(n_img * num_crop)),
                tf.ones([n_img * num_crop], tf.int32))

    crops, short_sides = tf.cond(tf.cast(decode, tf.bool), decoded, placeholders)
    out = {k: v for k, v in element.items() if k != "encoded"}
    out.update(crops=crops, short_sides=short_sides)
    return out


def augment_views(element: dict, *, spec: augment.AugmentSpec, num_crop: int, seed: int) -> dict:
    """[n_img * num_crop, S, S, 3] uint8 views, image-major: (img0 crop0, img0 crop1, img1 crop0,
    ...), from `decode_crops`' crops, plus their colour parameters [V, NUM_PARAMS] under
    `augment.PARAMS_KEY`, which `device_augment.finish_views` applies in the train step."""
    views, params = [], []
    for v, crop in enumerate(element["crops"]):
        key = view_key(seed, element["epoch"], element["label"], v, element["draw"])
        view, view_params = augment.prepare_view(key, crop, spec, element["short_sides"][v])
        views.append(view)
        params.append(view_params)
    return {"images": tf.stack(views), augment.PARAMS_KEY: tf.stack(params),
            "labels": tf.cast(element["label"], tf.int32), "caption": element["caption"]}
