"""Labelled images for evaluation (linear probe, k-NN): a TFDS dataset or an image folder.

`load_eval_dataset("cifar10" | "folder:PATH", ...)` checks everything it can up front (unknown
name, unprepared TFDS data, missing split, empty folder) and names the culprit. Each split reads
its examples in a fixed order; a host reads one contiguous slice of it. Batches for evaluation
are padded with masked blanks so that every host yields the same number of batches and every
example counts exactly once (never a repeated sample); training batches drop the remainder.

The views are the reference's (`main_linear.py`, torchvision on PIL images): for evaluation
Resize(256) (shorter side, bilinear) + CenterCrop(224); for training the classifiers
RandomResizedCrop(224, scale 0.08-1, ratio 3/4-4/3, bilinear) + RandomHorizontalFlip; both then
ImageNet mean/std. Sizes other than 224 keep the 256/224 ratio.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from stablerep_jax.data import augment

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")      # what tfds.folder_dataset.ImageFolder reads
DEFAULT_TEST_SPLITS = ("test", "validation", "val")
EVAL_RESIZE = (256, 224)               # Resize(256) then CenterCrop(224)
TRAIN_CROP_SCALE = (0.08, 1.0)         # torchvision RandomResizedCrop defaults
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
FLIP_PROB = 0.5
# (train, test) splits of TFDS datasets whose evaluation split is not simply "test" (ImageNet's
# "test" split has no labels) or whose reference training set is train + validation.
STANDARD_SPLITS = {
    "imagenet2012": ("train", "validation"),
    "food101": ("train", "validation"),
    "oxford_flowers102": ("train+validation", "test"),
    "dtd": ("train+validation", "test"),
}


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of this host's contiguous slice; slices differ in size by at most one."""
    return (num_examples * process_index // process_count,
            num_examples * (process_index + 1) // process_count)


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder: sorted files, each with its class index."""
    name: str
    files: tuple[str, ...]
    labels: tuple[int, ...]

    @property
    def num_examples(self) -> int:
        return len(self.files)

    def host_count(self, process_index: int, process_count: int) -> int:
        start, stop = host_range(self.num_examples, process_index, process_count)
        return stop - start

    def host_dataset(self, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        """Undecoded examples {"image": file path, "label": int32, "index": int64 (position in
        the split)}; `decode` turns one into a uint8 [H, W, 3] image (after any shuffle)."""
        start, stop = host_range(self.num_examples, process_index, process_count)
        return tf.data.Dataset.from_tensor_slices({
            "image": tf.constant(list(self.files[start:stop]), tf.string, [stop - start]),
            "label": np.asarray(self.labels[start:stop], np.int32),
            "index": np.arange(start, stop, dtype=np.int64)})

    def ordered_dataset(self, indices: np.ndarray) -> tf.data.Dataset:
        """Undecoded examples (as `host_dataset`) of the given split positions, in that order."""
        indices = np.asarray(indices, np.int64)
        return tf.data.Dataset.from_tensor_slices({
            "image": tf.constant([self.files[i] for i in indices], tf.string, [len(indices)]),
            "label": np.asarray([self.labels[i] for i in indices], np.int32),
            "index": indices})

    def decode(self, raw) -> tf.Tensor:
        return tf.io.decode_image(tf.io.read_file(raw), channels=3, expand_animations=False)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """One split of a prepared TFDS dataset, read in file order unless given a file seed."""
    name: str
    builder: object
    image_key: str
    label_key: str
    num_examples: int

    def _host_split(self, process_index: int, process_count: int):
        if process_count == 1:
            return self.name
        import tensorflow_datasets as tfds
        return tfds.even_splits(self.name, n=process_count)[process_index]

    def host_count(self, process_index: int, process_count: int) -> int:
        return int(self.builder.info.splits[self._host_split(process_index, process_count)]
                   .num_examples)

    def host_dataset(self, process_index: int = 0, process_count: int = 1,
                     file_seed: Optional[int] = None) -> tf.data.Dataset:
        """Undecoded examples {"image": encoded bytes, "label": int32, "index": int64}. With
        `file_seed` (training), this host's files are read in a seeded random order (TFDS's
        deterministic file shuffle) and `index` is the position in that stream, not in the
        split; without it (evaluation), in file order and `index` is the split position."""
        import tensorflow_datasets as tfds
        start = sum(self.host_count(i, process_count) for i in range(process_index))
        read_config = None if file_seed is None else tfds.ReadConfig(shuffle_seed=int(file_seed))
        ds = self.builder.as_dataset(split=self._host_split(process_index, process_count),
                                     shuffle_files=file_seed is not None, read_config=read_config,
                                     decoders={self.image_key: tfds.decode.SkipDecoding()})
        image_key, label_key = self.image_key, self.label_key

        def select(i, ex):
            return {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32),
                    "index": tf.cast(i, tf.int64) + start}

        return ds.enumerate().map(select)

    def decode(self, raw) -> tf.Tensor:
        image = self.builder.info.features[self.image_key].decode_example(raw)
        if image.shape.rank == 3 and image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        return image


@dataclasses.dataclass(frozen=True)
class EvalDataset:
    name: str
    class_names: tuple[str, ...]
    train: object           # FolderSplit | TfdsSplit
    test: object

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_eval_dataset(dataset: str, data_dir: Optional[str] = None,
                      train_split: Optional[str] = None, test_split: Optional[str] = None,
                      image_key: str = "image", label_key: str = "label") -> EvalDataset:
    """`dataset` is a TFDS name (with `data_dir`) or `folder:PATH`. Splits left as None are the
    dataset's standard ones (`STANDARD_SPLITS`, else train and the first of test / validation /
    val that exists)."""
    if not dataset:
        raise ValueError("set --config.dataset to a TFDS name (e.g. cifar10) or folder:PATH")
    if dataset.startswith(FOLDER_PREFIX):
        return _load_folder(dataset[len(FOLDER_PREFIX):], train_split or "train", test_split)
    standard = STANDARD_SPLITS.get(dataset.split("/")[0].split(":")[0], ("train", None))
    return _load_tfds(dataset, data_dir, train_split or standard[0], test_split or standard[1],
                      image_key, label_key)


# --------------------------------------------------------------------------------------------
# Image folders


def _subdirs(path: str) -> list[str]:
    """Sorted names of the sub-folders of `path` (local or any tf.io.gfile URL; buckets list
    folder names with a trailing slash)."""
    gfile = tf.io.gfile
    names = (n.rstrip("/") for n in gfile.listdir(path))
    return sorted(n for n in names if gfile.isdir(os.path.join(path, n)))


def _list_split(path: str) -> dict[str, list[str]]:
    by_label = {}
    for label in _subdirs(path):
        label_dir = os.path.join(path, label)
        by_label[label] = sorted(os.path.join(label_dir, f) for f in tf.io.gfile.listdir(label_dir)
                                 if f.lower().endswith(IMAGE_EXTENSIONS))
    return by_label


def _load_folder(root: str, train_split: str, test_split: Optional[str]) -> EvalDataset:
    if not root:
        raise ValueError("dataset='folder:' needs a path: folder:/path/to/root")
    if not tf.io.gfile.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} (from dataset='folder:{root}') does not exist")
    splits = _subdirs(root)
    test_split = test_split or next((s for s in DEFAULT_TEST_SPLITS if s in splits), None)
    if test_split is None:
        raise FileNotFoundError(f"image folder {root!r} has no test split (looked for "
                                f"{', '.join(DEFAULT_TEST_SPLITS)}); its sub-folders: {splits}")
    listed = {}
    for split in (train_split, test_split):
        if split not in splits:
            raise FileNotFoundError(f"image folder {root!r} has no split {split!r}; its sub-folders: "
                                    f"{splits} (layout: ROOT/<split>/<label>/*.jpg|png)")
        listed[split] = _list_split(os.path.join(root, split))
        if not any(listed[split].values()):
            raise ValueError(f"image folder {os.path.join(root, split)!r} holds no images "
                             f"({', '.join(IMAGE_EXTENSIONS)}) in label sub-folders "
                             "(layout: ROOT/<split>/<label>/*.jpg|png)")
    class_names = tuple(sorted(set(listed[train_split]) | set(listed[test_split])))
    index = {name: i for i, name in enumerate(class_names)}

    def make(split):
        pairs = [(f, index[label]) for label, files in listed[split].items() for f in files]
        return FolderSplit(split, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs))

    return EvalDataset(f"folder:{root}", class_names, make(train_split), make(test_split))


# --------------------------------------------------------------------------------------------
# TFDS


def _load_tfds(name: str, data_dir, train_split, test_split, image_key, label_key) -> EvalDataset:
    import tensorflow_datasets as tfds
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        base = name.split("/")[0].split(":")[0]
        close = difflib.get_close_matches(base, tfds.list_builders(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: not a TFDS dataset name and not "
                         f"'{FOLDER_PREFIX}PATH'.{hint}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name!r} is not prepared in data_dir={data_dir!r} ({builder.data_dir}); "
            f"prepare it first (`tfds build {name} --data_dir=DIR`; ImageNet needs its manual "
            "download) and pass --config.data_dir=DIR")
    available = sorted(builder.info.splits.keys())
    test_split = test_split or next((s for s in DEFAULT_TEST_SPLITS if s in available), None)
    if test_split is None:
        raise ValueError(f"TFDS dataset {name!r} has no test or validation split; splits: "
                         f"{available}; set --config.test_split")
    features = builder.info.features
    for key, field in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise ValueError(f"TFDS dataset {name!r} has no feature {key!r} (config.{field}); "
                             f"features: {sorted(features.keys())}")
    if not hasattr(features[label_key], "num_classes"):
        raise ValueError(f"TFDS dataset {name!r}: feature {label_key!r} is not a class label")

    def make(split):
        try:
            count = int(builder.info.splits[split].num_examples)
        except (KeyError, ValueError) as e:
            raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; splits: "
                             f"{available}") from e
        return TfdsSplit(split, builder, image_key, label_key, count)

    names = tuple(features[label_key].names)
    return EvalDataset(name, names, make(train_split), make(test_split))


# --------------------------------------------------------------------------------------------
# Views: the reference's torchvision transforms


def eval_resize_size(size: int) -> int:
    """The shorter side before the centre crop: 256 for 224, the same ratio otherwise."""
    return size * EVAL_RESIZE[0] // EVAL_RESIZE[1]


def _round_half_even_half(diff):
    """round(diff / 2) as Python rounds (half to even): torchvision's CenterCrop offset."""
    half = diff // 2
    return half + (diff % 2) * (half % 2)


def eval_view(image_uint8, size: int, dtype="float32") -> tf.Tensor:
    """torchvision Resize(eval_resize_size(size)) + CenterCrop(size) + normalise: the shorter
    side becomes `short`, the longer int(short * long / shorter) (truncated, as torchvision)."""
    shape = tf.shape(image_uint8)
    h, w = shape[0], shape[1]
    short = eval_resize_size(size)
    new_h = tf.where(h <= w, short, short * h // w)
    new_w = tf.where(h <= w, short * w // h, short)
    image = augment.resize_to_unit(image_uint8, new_h, new_w)
    top, left = _round_half_even_half(new_h - size), _round_half_even_half(new_w - size)
    image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
    return augment.normalize(image, dtype)


def train_view_params(key, height, width) -> tuple[tf.Tensor, tf.Tensor]:
    """(crop box [top, left, h, w], flip) of one training view: RandomResizedCrop's box
    (`TRAIN_CROP_SCALE`, `TRAIN_CROP_RATIO`, 10 tries then the centre fallback) and a coin."""
    k_box, k_flip = augment.split_key(key, 2)
    box = augment.random_resized_crop_box(k_box, height, width, TRAIN_CROP_SCALE,
                                          TRAIN_CROP_RATIO)
    flip = tf.random.stateless_uniform([], seed=k_flip) < FLIP_PROB
    return box, flip


def train_view(image_uint8, size: int, key, dtype="float32") -> tf.Tensor:
    """RandomResizedCrop(size) + RandomHorizontalFlip + normalise, keyed by a stateless key."""
    shape = tf.shape(image_uint8)
    box, flip = train_view_params(key, shape[0], shape[1])
    image = augment.resize_to_unit(augment.crop(image_uint8, box), size, size)
    image = tf.cond(flip, lambda: augment.flip_left_right(image), lambda: image)
    return augment.normalize(tf.ensure_shape(image, [size, size, 3]), dtype)


# --------------------------------------------------------------------------------------------
# Batches


def _blank(image_size: int) -> dict:
    return {"image": tf.zeros([image_size, image_size, 3], tf.float32),
            "label": tf.constant(0, tf.int32), "index": tf.constant(-1, tf.int64),
            "mask": tf.constant(False)}


def num_eval_batches(split, global_batch: int, process_count: int) -> int:
    """Batches every host yields: enough for the largest host slice."""
    host_batch = global_batch // process_count
    largest = max(split.host_count(i, process_count) for i in range(process_count))
    return max(1, math.ceil(largest / host_batch))


def eval_batches(split, image_size: int, global_batch: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict]:
    """`eval_view` batches of this host's slice, padded with masked blanks: numpy dicts of
    image float32 [b, S, S, 3], label int32 [b], index int64 [b], mask bool [b]."""
    host_batch = global_batch // process_count
    steps = num_eval_batches(split, global_batch, process_count)
    count = split.host_count(process_index, process_count)

    def prepare(ex):
        return {"image": eval_view(split.decode(ex["image"]), image_size),
                "label": ex["label"], "index": ex["index"], "mask": tf.constant(True)}

    ds = split.host_dataset(process_index, process_count).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE)
    pad = steps * host_batch - count
    if pad:
        ds = ds.concatenate(tf.data.Dataset.from_tensors(_blank(image_size)).repeat(pad))
    return ds.batch(host_batch).prefetch(2).as_numpy_iterator()


def train_steps_per_epoch(split, global_batch: int) -> int:
    return split.num_examples // global_batch


def epoch_order(num_examples: int, global_batch: int, seed: int, epoch: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """This host's split positions for one training epoch, in order. The epoch is a permutation
    of the whole split drawn from (seed, epoch), as the reference's sampler; global batch s is
    its s-th block of `global_batch` (the remainder dropped), of which host p reads the p-th of
    `process_count` equal parts, so the global batches do not depend on the number of hosts."""
    steps = num_examples // global_batch
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch, 0x0DE7])).permutation(
        num_examples)[:steps * global_batch]
    host_batch = global_batch // process_count
    return perm.reshape(steps, process_count, host_batch)[:, process_index].reshape(-1)


def train_batches(split, image_size: int, global_batch: int, seed: int, epoch: int,
                  shuffle_buffer: int, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict]:
    """One epoch of `train_view` batches (the reference's probe training views).

    Every crop depends only on (seed, epoch, example index). An image folder is read in a global
    permutation (`epoch_order`: the batches are the same for any number of hosts); a TFDS split,
    which has no cheap random access, streams this host's slice with its files in a new order
    every epoch through a shuffle buffer of `shuffle_buffer` examples. All hosts yield
    `num_examples // global_batch` batches.
    """
    host_batch = global_batch // process_count
    steps = train_steps_per_epoch(split, global_batch)

    def prepare(ex):
        key = augment.make_key(seed, epoch, ex["index"])
        return {"image": train_view(split.decode(ex["image"]), image_size, key),
                "label": ex["label"], "index": ex["index"], "mask": tf.constant(True)}

    if isinstance(split, FolderSplit):
        ds = split.ordered_dataset(epoch_order(split.num_examples, global_batch, seed, epoch,
                                               process_index, process_count))
    else:
        count = split.host_count(process_index, process_count)
        shuffle_seed, file_seed = (int(x) for x in np.random.SeedSequence(
            [seed, epoch, 0x5EB]).generate_state(2))
        ds = (split.host_dataset(process_index, process_count, file_seed)
              .shuffle(max(1, min(shuffle_buffer, count)), seed=shuffle_seed,
                       reshuffle_each_iteration=False)
              .take(steps * host_batch))
    ds = (ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
          .batch(host_batch, drop_remainder=True))
    return ds.prefetch(2).as_numpy_iterator()
