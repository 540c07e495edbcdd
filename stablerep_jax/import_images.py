r"""Imports existing images into our TFRecord shards (the schema in `data/records.py`).

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.csv=/data/cc12m_syn/train.csv \
      --config.roots=/data/cc12m_syn/seed0,/data/cc12m_syn/seed1,/data/cc12m_syn/seed2 \
      --config.output_dir=/data/cc12m_syn_tfrecords

or, for a folder of caption groups (one sub-folder per caption with caption.txt and its images):

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.folder=/data/my_groups --config.output_dir=/data/my_tfrecords

Images larger than `max_image_pixels` (panoramas, scans) are never decoded in full: a JPEG is
decoded at 1/2, 1/4 or 1/8 of its size (PIL's `draft`, the largest that fits) and re-encoded;
any other format is an unreadable image. PIL's own process-wide limit is lifted while the job
decodes (this check replaces it, on the size in the file's header, before anything is decoded).

Missing or unreadable images are reported by name: with `on_missing=error` (default) the job
stops before writing the shard that needs them (with `check_first`, before writing any of this
process's shards); with `on_missing=skip_caption` the captions concerned are left out and listed
in OUTPUT_DIR/missing.txt.

Outputs: `settings.json` (written first: the inputs and options the shards depend on), the
shards (each written atomically after its `shard_info/<shard>.json`: counts and skipped images),
then `manifest.json` and `missing.txt`, which cover every shard on disk, whichever run or host
wrote it. Rerunning after an interruption keeps finished shards; a rerun with another CSV,
folder, roots, seeds, captions_per_shard or encoding stops and names each changed setting.
SIGTERM (preemption): each host finishes the shard it is writing and stops; process 0 writes
manifest.json and missing.txt over the shards on disk (`complete: false`), and the job exits 75
(`cli.EXIT_RESUME`): rerunning it writes the rest. During start-up (reading the CSV, checking
files) a single process stops at once, before writing anything.
On a pod every host runs the job, joined as every job is (`cli.define_job_flags`: JAX finds
the hosts on TPU pods and SLURM, or --coordinator_address, --num_processes, --process_id): host
H writes shards H, H + N, ...; host 0 alone writes settings.json, manifest.json and missing.txt.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
from collections.abc import Sequence

import jax
import numpy as np
import tensorflow as tf
from absl import flags, logging
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from stablerep_jax import cli, fileio, parallel, preemption
from stablerep_jax.data import caption_order, layouts, records

IMAGE_FORMATS = ("keep", *records.IMAGE_FORMATS)
ON_MISSING = ("error", "skip_caption")
MISSING_REPORT = "missing.txt"
SETTINGS_NAME = "settings.json"
SHARD_INFO_DIR = "shard_info"     # <shard>.json: a written shard's counts and skipped images
_REPORT_NAMES = 20
# Default `max_image_pixels`: where PIL's own check raised DecompressionBombError (twice its
# MAX_IMAGE_PIXELS), so images that imported before import as they did.
DEFAULT_MAX_IMAGE_PIXELS = 2 * 89_478_485
_DRAFT_SCALES = (2, 4, 8)             # the reductions libjpeg decodes at directly


class ImageProblem(Exception):
    """An image that is missing or cannot be read; carries the path."""


def sniff_format(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def _fit_pixels(img: Image.Image, path: str, max_pixels: int) -> bool:
    """Makes an opened, not yet decoded image at most `max_pixels` pixels: returns False when it
    already is, True when a JPEG now decodes at a reduced scale (`draft`); else ImageProblem."""
    w, h = img.size
    if w * h <= max_pixels:
        return False
    size = f"{w}x{h} = {w * h} pixels, above max_image_pixels={max_pixels}"
    scale = next((s for s in _DRAFT_SCALES if -(-w // s) * -(-h // s) <= max_pixels), None)
    if img.format != "JPEG" or scale is None:
        why = ("even 1/8 of it is larger" if img.format == "JPEG" else
               f"{img.format or 'this format'} cannot be decoded at reduced size (JPEG can)")
        raise ImageProblem(f"{path}: cannot be read as an image ({size}; {why}): shrink it or "
                           "raise --config.max_image_pixels")
    img.draft(img.mode, (max(1, w // scale), max(1, h // scale)))
    if img.size[0] * img.size[1] > max_pixels:      # draft declined (e.g. several tiles)
        raise ImageProblem(f"{path}: cannot be read as an image ({size}; it could not be "
                           "decoded at reduced size): shrink it or raise --config.max_image_pixels")
    logging.warning("%s: %s; decoded at 1/%d size (%dx%d)", path, size, w // img.size[0],
                    img.size[0], img.size[1])
    return True


def prepare_image(data: bytes, path: str, *, image_format: str = "keep", save_size: int = 0,
                  jpeg_quality: int = 95, verify: bool = True,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> bytes:
    """The bytes to store: the file itself when it already is JPEG/PNG in the wanted format and
    size, else decoded, resized (shorter side to `save_size`) and re-encoded. An image above
    `max_pixels` is decoded at reduced size where the format allows (`_fit_pixels`) and
    re-encoded, else it is an ImageProblem naming `path`, as is any file PIL cannot read."""
    kind = sniff_format(data)
    target = image_format if image_format != "keep" else (kind or "png")
    try:
        with Image.open(io.BytesIO(data)) as img:
            reduced = _fit_pixels(img, path, max_pixels)
            if save_size <= 0 and kind == target and not reduced:
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
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombError) as e:
        raise ImageProblem(f"{path}: cannot be read as an image ({e})") from e


@contextlib.contextmanager
def _own_pixel_limit():
    """Lifts PIL's process-wide pixel limit (it raises at open, before the size can be read)
    while the job decodes: `prepare_image` checks `max_image_pixels` itself instead."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


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
                jpeg_quality=config.jpeg_quality, verify=config.verify,
                max_pixels=config.max_image_pixels))
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
        return layouts.read_reference_layout(config.csv, _roots(config))
    return layouts.read_folder_layout(config.folder)


def _roots(config) -> list[str]:
    return [r.strip() for r in (config.roots or "").split(",") if r.strip()]


def _seeds(config, k: int) -> list[int]:
    if not config.seeds:
        return list(range(k))
    seeds = [int(s) for s in config.seeds.split(",")]
    if len(seeds) != k:
        raise ValueError(f"seeds={config.seeds!r} has {len(seeds)} values for {k} images per caption")
    return seeds


def shards_to_import(groups: Sequence[layouts.CaptionGroup],
                     captions_per_shard: int) -> list[tuple[str, list[layouts.CaptionGroup]]]:
    """(shard file name, its caption groups) for every shard of the output (all hosts', finished
    or not), the same on every host and every rerun: each shard holds a seeded random sample of
    the groups (`caption_order.caption_order`), so no shard is a run of neighbouring CSV rows."""
    slices = caption_order.shard_slices(len(groups), captions_per_shard)
    return [(f"train-{index:05d}-of-{len(slices):05d}.tfrecord",
             [groups[i] for i in ids.tolist()]) for index, ids in enumerate(slices)]


def check_config(config) -> None:
    if config.image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={config.image_format!r}: choose one of {IMAGE_FORMATS}")
    if config.on_missing not in ON_MISSING:
        raise ValueError(f"on_missing={config.on_missing!r}: choose one of {ON_MISSING}")
    if not config.output_dir:
        raise ValueError("set --config.output_dir")
    if config.captions_per_shard < 1:
        raise ValueError(f"captions_per_shard={config.captions_per_shard}: must be >= 1")
    if config.max_image_pixels < 1:
        raise ValueError(f"max_image_pixels={config.max_image_pixels}: must be >= 1 (images "
                         f"larger are decoded at reduced size or skipped; PIL's default is "
                         f"{DEFAULT_MAX_IMAGE_PIXELS})")


def settings_of(config, groups: Sequence[layouts.CaptionGroup], seeds: Sequence[int]) -> dict:
    """Everything the shards' contents depend on (not workers or checks): a rerun into the same
    output_dir must give the same, or it would keep shards of other data (settings.json)."""
    reencodes_jpeg = config.image_format == "jpeg" or (
        config.image_format == "keep" and config.save_size > 0)
    return {
        "layout": "reference" if config.csv else "folder",
        "roots": _roots(config) if config.csv else None,
        "folder": config.folder or None,
        "captions_sha256": groups_fingerprint(groups), "num_captions": len(groups),
        "seeds": list(seeds), "captions_per_shard": config.captions_per_shard,
        "image_format": config.image_format, "save_size": config.save_size,
        "jpeg_quality": config.jpeg_quality if reencodes_jpeg else None,
        "max_image_pixels": config.max_image_pixels,
        caption_order.ORDER_KEY: caption_order.order_info(),
    }


def groups_fingerprint(groups: Sequence[layouts.CaptionGroup]) -> str:
    """sha256 of every caption, its id and its image paths: another CSV (or the same one
    edited, or another folder) gives another fingerprint."""
    digest = hashlib.sha256()
    for g in groups:
        digest.update(json.dumps([g.caption_id, g.caption, list(g.paths)]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(this process, processes): JAX's unless given."""
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process_index={index}, process_count={count}: need "
                         "0 <= process_index < process_count")
    return index, count


def _finished_shards(output_dir: str) -> set[str]:
    """Names of the shards on disk (one listing; temporary files never match)."""
    pattern = os.path.join(output_dir, f"train-*{records.SHARD_SUFFIX}")
    return {os.path.basename(p) for p in tf.io.gfile.glob(pattern)}


def _info_path(output_dir: str, name: str) -> str:
    return os.path.join(output_dir, SHARD_INFO_DIR, name + ".json")


def _write_shard(output_dir: str, name: str, recs: Sequence[records.CaptionRecord],
                 problems: Sequence[str]) -> dict:
    """The shard's counts and skipped images (its info file, written first: a shard on disk
    always has one), then the shard itself."""
    info = {"captions": len(recs), "images": sum(len(r.images) for r in recs),
            "min_images": min((len(r.images) for r in recs), default=None),
            "skipped": list(problems)}
    fileio.write_json_atomic(_info_path(output_dir, name), info)
    records.write_shard(os.path.join(output_dir, name), recs)
    return info


def _read_shard_info(output_dir: str, name: str) -> dict:
    """A finished shard's info file (`_write_shard` writes it before the shard)."""
    return fileio.read_json(_info_path(output_dir, name))


def _check_shard_infos(output_dir: str, finished: set[str]) -> None:
    """Every shard on disk has its info file (written before it), or the output comes from
    another layout of this job: one listing, after the shards' (a shard another host renames
    in between has its info file already)."""
    info_dir = os.path.join(output_dir, SHARD_INFO_DIR)
    infos = set(tf.io.gfile.listdir(info_dir)) if finished and fileio.exists(info_dir) else set()
    lacking = sorted(n for n in finished if n + ".json" not in infos)
    if lacking:
        raise ValueError(
            f"{output_dir} holds {len(lacking)} shard(s) without {SHARD_INFO_DIR}/<shard>.json "
            f"({', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}): they were written "
            "by another layout of import_images (one that kept no per-shard counts) and cannot "
            "be completed; import into a new output_dir")


def _check_present(config, todo) -> None:
    """Stops before anything is written when an image of the shards to write is missing."""
    with concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:
        missing = _missing_paths([g for _, chunk in todo for g in chunk], pool)
    if missing:
        raise FileNotFoundError(_report(missing) + "\nnothing was written")


def _remove_stale_temp_files(output_dir: str, todo, process_index: int) -> None:
    """Partial files killed runs left for what this process writes (its own shards and their
    info files; process 0 also its JSON outputs): no other process writes those names."""
    names = [name for name, _ in todo]
    stale = fileio.remove_stale_temp_files(output_dir, names + (
        [SETTINGS_NAME, records.MANIFEST_NAME, MISSING_REPORT] if process_index == 0 else []))
    stale += fileio.remove_stale_temp_files(os.path.join(output_dir, SHARD_INFO_DIR),
                                            [name + ".json" for name in names])
    if stale:
        logging.info("removed %d temporary files left by interrupted runs: %s", len(stale),
                     ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))


def _import_shards(config, todo, seeds: Sequence[int], stop=lambda: False) -> tuple[int, bool]:
    """Writes the shards of `todo` (name, groups); returns (how many it wrote, whether `stop()`
    said to stop before the last: it is asked before each shard)."""
    written = 0
    with _own_pixel_limit(), concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:
        bar = tqdm(total=sum(len(chunk) for _, chunk in todo), desc="import", unit="caption",
                   mininterval=2.0)
        for name, chunk in todo:
            if stop():
                logging.warning("stopping after %d of this process's %d shards to write "
                                "(SIGTERM); each written shard is complete", written, len(todo))
                bar.close()
                return written, True
            built = list(pool.map(lambda g: _build_record(g, seeds, config), chunk))
            problems = [p for _, probs in built for p in probs]
            if problems and config.on_missing == "error":
                missing_only = all(p.endswith(": missing") for p in problems)
                error = FileNotFoundError if missing_only else ValueError
                raise error(_report(problems) + f"\n(needed by shard {name}; {written} shards "
                            "were written before it and are complete)")
            _write_shard(config.output_dir, name, [r for r, _ in built if r is not None],
                         problems)
            written += 1
            bar.update(len(chunk))
        bar.close()
    return written, False


def write_outputs(config, plan, settings: dict, k_max: int) -> dict:
    """manifest.json and missing.txt over every shard of the output on disk (this run's and
    earlier runs', every host's): written once, by process 0, when the shards are done."""
    output_dir = config.output_dir
    finished = _finished_shards(output_dir)
    names = [name for name, _ in plan if name in finished]
    with concurrent.futures.ThreadPoolExecutor(config.num_workers) as pool:   # ~10k on gs://
        infos = dict(zip(names, pool.map(lambda n: _read_shard_info(output_dir, n), names)))
    skipped = [p for info in infos.values() for p in info["skipped"]]
    report_path = os.path.join(output_dir, MISSING_REPORT)
    if skipped:
        logging.warning("left out captions with missing/unreadable images; %s", _report(skipped))
        fileio.write_text_atomic(report_path, "\n".join(skipped) + "\n")
    else:
        fileio.remove_if_present(report_path)     # an earlier run's, whose shards were redone
    mins = [info["min_images"] for info in infos.values() if info["min_images"] is not None]
    missing_shards = len(plan) - len(infos)
    if missing_shards:
        logging.warning("manifest.json lists %d of %d shards; %d are not written yet (rerun "
                        "process 0 when every process is done)", len(infos), len(plan),
                        missing_shards)
    source = {"csv": config.csv, "roots": config.roots} if config.csv else {"folder": config.folder}
    shards = {name: {"captions": info["captions"], "images": info["images"],
                     "skipped_images": len(info["skipped"])} for name, info in infos.items()}
    return records.write_manifest(
        output_dir, shards, images_per_caption=min(mins, default=k_max), source=source,
        image_format=config.image_format, save_size=config.save_size,
        skipped_images=len(skipped), num_caption_ids=settings["num_captions"],
        complete=missing_shards == 0, missing_shards=missing_shards, settings=settings,
        **{caption_order.ORDER_KEY: caption_order.order_info()})


def _check_output_dir(output_dir: str, settings_existed: bool, finished: set[str]) -> None:
    """Shards (or a manifest) without settings.json: nothing says what they were made from,
    and adding to them could mix two data sets or layouts."""
    if settings_existed or not (finished or records.read_manifest(output_dir) is not None):
        return
    raise ValueError(f"{output_dir} holds shards ({len(finished)}) but no {SETTINGS_NAME}, so "
                     "nothing says what they were made from (another layout of import_images, "
                     "or files copied in): they cannot be completed; import into a new "
                     "output_dir")


def _prepare(config, process_index: int, process_count: int) -> dict:
    """Everything checked before this process writes anything: inputs, settings against an
    earlier run's, and (with check_first) this process's images."""
    check_config(config)
    groups = _groups(config)
    k_max = max(len(g.paths) for g in groups)
    seeds = _seeds(config, k_max)
    output_dir = config.output_dir
    settings = settings_of(config, groups, seeds)
    settings_existed = records.check_rerun_settings(
        os.path.join(output_dir, SETTINGS_NAME), settings)
    finished = _finished_shards(output_dir) if fileio.exists(output_dir) else set()
    _check_output_dir(output_dir, settings_existed, finished)
    _check_shard_infos(output_dir, finished)
    plan = shards_to_import(groups, config.captions_per_shard)
    mine = plan[process_index::process_count]
    todo = [(name, chunk) for name, chunk in mine if name not in finished]
    logging.info("importing %d captions (up to %d images each) into %d shards in %s; process "
                 "%d of %d: %d shards, %d kept from an earlier run, %d to write", len(groups),
                 k_max, len(plan), output_dir, process_index, process_count, len(mine),
                 len(mine) - len(todo), len(todo))
    if config.check_first and config.on_missing == "error":
        _check_present(config, todo)
    return dict(k_max=k_max, seeds=seeds, settings=settings, settings_existed=settings_existed,
                plan=plan, todo=todo)


def run(config, *, process_index: int | None = None,
        process_count: int | None = None) -> dict | None:
    """See `run_until_preempted`, without a SIGTERM handler; returns the manifest (or None)."""
    return _run(config, process_index, process_count, None)[0]


def run_until_preempted(config, *, process_index: int | None = None,
                        process_count: int | None = None) -> tuple[dict | None, bool]:
    """`run` under a SIGTERM handler (installed first): (manifest or None, preempted). When a
    notice arrives, every host stops after the shard it is writing, process 0 writes the
    outputs over what is on disk, and `preempted` is True on every host."""
    with preemption.PreemptionWatch(agree=False) as watch:
        try:
            return _run(config, process_index, process_count, watch)
        except preemption.PreemptedAtStartup:
            logging.warning("stopped by SIGTERM during start-up: nothing was written")
            return None, True


def _run(config, process_index, process_count, watch) -> tuple[dict | None, bool]:
    """Imports this process's shards of the images the config names. Process 0 also writes
    settings.json (first) and manifest.json + missing.txt (last, over the whole output) and
    returns the manifest; other processes return None.

    `process_index` / `process_count` default to JAX's (every process of a `jax.distributed`
    job checks, starts and fails together); set them to run one process's share on its own
    (shares run one after another; process 0 last writes the outputs over all of them)."""
    coordinated = jax.process_count() > 1
    process_index, process_count = _process(process_index, process_count)
    job = parallel.run_together(lambda: _prepare(config, process_index, process_count),
                                "import_images checks", coordinated)
    output_dir = config.output_dir

    def start():
        fileio.makedirs(output_dir)
        _remove_stale_temp_files(output_dir, job["todo"], process_index)
        if not job["settings_existed"] and (process_index == 0 or not coordinated):
            fileio.write_json_atomic(os.path.join(output_dir, SETTINGS_NAME),
                                     job["settings"])   # the same bytes from whoever writes it

    parallel.run_together(start, "import_images start", coordinated)  # shards never predate settings
    stop = (lambda: False) if watch is None else (lambda: watch.should_stop(0))
    with contextlib.nullcontext() if watch is None else watch.working():
        _, stopped = parallel.run_together(
            lambda: _import_shards(config, job["todo"], job["seeds"], stop),
            "import_images shards", coordinated)
    if coordinated:       # one host preempted: every host says so (and exits 75)
        from jax.experimental import multihost_utils
        stopped = bool(np.max(multihost_utils.process_allgather(np.array(stopped, np.int32))))
    if process_index != 0:
        return None, stopped
    manifest = write_outputs(config, job["plan"], job["settings"], job["k_max"])
    logging.info("%d captions, %d images in %d shards in %s", manifest["num_captions"],
                 manifest["num_images"], manifest["num_shards"], output_dir)
    return manifest, stopped


def main(config):
    parallel.start_job(flags.FLAGS)
    _, preempted = run_until_preempted(config)
    return cli.EXIT_RESUME if preempted else cli.EXIT_OK


if __name__ == "__main__":
    cli.define_job_flags(None)      # outputs go to --config.output_dir
    cli.run(main)
