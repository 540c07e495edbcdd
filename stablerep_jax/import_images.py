r"""Imports existing images into our TFRecord shards (the schema in `data/records.py`).

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.csv=/data/cc12m_syn/train.csv \
      --config.roots=/data/cc12m_syn/seed0,/data/cc12m_syn/seed1,/data/cc12m_syn/seed2 \
      --config.output_dir=/data/cc12m_syn_tfrecords

or, for a folder of caption groups (one sub-folder per caption with caption.txt and its images):

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.folder=/data/my_groups --config.output_dir=/data/my_tfrecords

Missing or unreadable images are reported by name: with `on_missing=error` (default) the job
stops before writing the shard that needs them (with `check_first`, before writing anything);
with `on_missing=skip_caption` the captions concerned are left out and listed in
OUTPUT_DIR/missing.txt. Shards are written atomically; `manifest.json` is written last, so a
directory with a manifest is complete. Rerunning after an interruption keeps finished shards.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
from collections.abc import Sequence

import tensorflow as tf
from absl import logging
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stablerep_jax import fileio
from stablerep_jax.data import layouts, records

IMAGE_FORMATS = ("keep", *records.IMAGE_FORMATS)
ON_MISSING = ("error", "skip_caption")
MISSING_REPORT = "missing.txt"
_REPORT_NAMES = 20


class ImageProblem(Exception):
    """An image that is missing or cannot be read; carries the path."""


def sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def prepare_image(data: bytes, path: str, *, image_format: str = "keep", save_size: int = 0,
                  jpeg_quality: int = 95, verify: bool = True) -> bytes:
    """The bytes to store: the file itself when it already is JPEG/PNG in the wanted format and
    size, else decoded, resized (shorter side to `save_size`) and re-encoded."""
    kind = sniff_format(data)
    target = image_format if image_format != "keep" else (kind or "png")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if save_size <= 0 and kind == target:
                if verify:
                    img.load()            # a full decode catches truncated files
                return data
            img = img.convert("RGB")
            if save_size > 0:
                w, h = img.size
                scale = save_size / min(w, h)
                img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 Image.BICUBIC)
            return records.encode_image(img, target, jpeg_quality)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageProblem(f"{path}: cannot be read as an image ({e})") from e


def _read(path: str) -> bytes:
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError as e:
        raise ImageProblem(f"{path}: missing") from e


def _missing_paths(groups, pool) -> list[str]:
    paths = [p for g in groups for p in g.paths]
    exists = list(tqdm(pool.map(tf.io.gfile.exists, paths), total=len(paths), desc="check",
                       unit="img", mininterval=2.0))
    return [p for p, ok in zip(paths, exists) if not ok]


def _report(problems: Sequence[str]) -> str:
    shown = "\n  ".join(problems[:_REPORT_NAMES])
    more = f"\n  ... and {len(problems) - _REPORT_NAMES} more" if len(problems) > _REPORT_NAMES else ""
    return f"{len(problems)} image(s) missing or unreadable:\n  {shown}{more}"


def _build_record(group: layouts.CaptionGroup, seeds: Sequence[int], config):
    """(CaptionRecord, []) or (None, problems)."""
    images, problems = [], []
    for path in group.paths:
        try:
            images.append(prepare_image(
                _read(path), path, image_format=config.image_format, save_size=config.save_size,
                jpeg_quality=config.jpeg_quality, verify=config.verify))
        except ImageProblem as e:
            problems.append(str(e))
    if problems:
        return None, problems
    return records.CaptionRecord(caption=group.caption, caption_id=group.caption_id,
                                 images=images, seeds=list(seeds)[:len(images)]), []


def _groups(config) -> list[layouts.CaptionGroup]:
    if bool(config.csv) == bool(config.folder):
        raise ValueError("set exactly one of --config.csv (with --config.roots) or "
                         "--config.folder")
    if config.csv:
        roots = [r.strip() for r in (config.roots or "").split(",") if r.strip()]
        return layouts.read_reference_layout(config.csv, roots)
    return layouts.read_folder_layout(config.folder)


def _seeds(config, k: int) -> list[int]:
    if not config.seeds:
        return list(range(k))
    seeds = [int(s) for s in config.seeds.split(",")]
    if len(seeds) != k:
        raise ValueError(f"seeds={config.seeds!r} has {len(seeds)} values for {k} images per caption")
    return seeds


def plan_shards(groups: Sequence[layouts.CaptionGroup],
                captions_per_shard: int) -> list[tuple[str, list[layouts.CaptionGroup]]]:
    """(shard file name, its caption groups) for every shard of the output, the same on every
    host and every rerun."""
    num_shards = -(-len(groups) // captions_per_shard)
    return [(f"train-{index:05d}-of-{num_shards:05d}.tfrecord",
             list(groups[index * captions_per_shard:(index + 1) * captions_per_shard]))
            for index in range(num_shards)]


def check_config(config) -> None:
    if config.image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={config.image_format!r}: choose one of {IMAGE_FORMATS}")
    if config.on_missing not in ON_MISSING:
        raise ValueError(f"on_missing={config.on_missing!r}: choose one of {ON_MISSING}")
    if not config.output_dir:
        raise ValueError("set --config.output_dir")
    if config.captions_per_shard < 1:
        raise ValueError(f"captions_per_shard={config.captions_per_shard}: must be >= 1")


def run(config) -> dict:
    """Imports the images the config names; returns the written manifest."""
    check_config(config)
    groups = _groups(config)
    k_max = max(len(g.paths) for g in groups)
    seeds = _seeds(config, k_max)
    tf.io.gfile.makedirs(config.output_dir)
    num_shards = -(-len(groups) // config.captions_per_shard)
    logging.info("importing %d captions (up to %d images each) into %d shards in %s",
                 len(groups), k_max, num_shards, config.output_dir)

    skipped: list[str] = []
    shards: dict[str, dict] = {}
    k_min = k_max
    with concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:
        if config.check_first:
            missing = _missing_paths(groups, pool)
            if missing and config.on_missing == "error":
                raise FileNotFoundError(_report(missing) + "\nnothing was written")
        bar = tqdm(total=len(groups), desc="import", unit="caption", mininterval=2.0)
        for name, chunk in plan_shards(groups, config.captions_per_shard):
            path = os.path.join(config.output_dir, name)
            if tf.io.gfile.exists(path):
                done = records.read_records(path)
                shards[name] = {"captions": len(done), "images": sum(len(r.images) for r in done)}
                k_min = min([k_min] + [len(r.images) for r in done])
                logging.info("%s exists from an earlier run; kept", path)
                bar.update(len(chunk))
                continue
            built = list(pool.map(lambda g: _build_record(g, seeds, config), chunk))
            problems = [p for _, probs in built for p in probs]
            if problems and config.on_missing == "error":
                error = FileNotFoundError if all(p.endswith(": missing") for p in problems) else ValueError
                raise error(_report(problems) + f"\n(needed by shard {name}; "
                            f"{len(shards)} earlier shards are complete)")
            skipped += problems
            recs = [r for r, _ in built if r is not None]
            records.write_shard(path, recs)
            k_min = min([k_min] + [len(r.images) for r in recs])
            shards[name] = {"captions": len(recs), "images": sum(len(r.images) for r in recs)}
            bar.update(len(chunk))
        bar.close()

    if skipped:
        logging.warning("left out captions with missing/unreadable images; %s", _report(skipped))
        fileio.write_text_atomic(os.path.join(config.output_dir, MISSING_REPORT), "\n".join(skipped) + "\n")
    source = {"csv": config.csv, "roots": config.roots} if config.csv else {"folder": config.folder}
    manifest = records.write_manifest(
        config.output_dir, shards, images_per_caption=k_min, source=source,
        image_format=config.image_format, save_size=config.save_size,
        skipped_images=len(skipped))
    logging.info("wrote %d captions, %d images in %d shards to %s", manifest["num_captions"],
                 manifest["num_images"], manifest["num_shards"], config.output_dir)
    return manifest


def main(config):
    from stablerep_jax import parallel
    parallel.hide_accelerators_from_tensorflow()
    run(config)


if __name__ == "__main__":
    from stablerep_jax import cli
    cli.run(main)
