r"""Captions file -> K Stable Diffusion images per caption -> sharded TFRecords (+ manifest).

  python -m stablerep_jax.generate --config=configs/generate.py:sd15 \
      --config.captions=/data/cc12m/captions.txt --config.output_dir=/data/cc12m_syn

Output directory: a local path or any tf.io.gfile URL (gs://BUCKET/DIR: every host of a pod
writes its shards straight to the bucket; see `fileio.py`):
  train-SSSSS-of-NNNNN.tfrecord  shard S holds P = captions_per_shard captions drawn by a fixed
                                 seeded permutation (`data/caption_order.py`), so every shard is a
                                 random sample whatever the captions file's order; one record
                                 per caption, caption_id = its index in the file (`data/records.py`)
  settings.json                  what decides the images; a rerun with other settings stops
  manifest.json                  the finished shards with their counts (written by host 0)
  contact_sheet.png              the first captions and their images (host 0)
  summary.json                   images, seconds, images/s: totals over every run that wrote
                                 shards here, and each run (per host: summary.host-I-of-N.json)

Hosts join as in every job (`cli.define_job_flags`: JAX finds them on TPU pods and SLURM, or
--coordinator_address, --num_processes, --process_id). Shard S belongs to host S mod
process_count, so hosts never write the same file, and a host's share follows from (number of
captions, captions_per_shard, process count) alone.
Resume: a shard is written to a temporary name and renamed when complete (on GCS a copy and a
delete, which still makes the final object in one step), so a rerun keeps every file with a
final name and redoes the rest. A resume with the same devices and batch gives the same bytes
as an uninterrupted run; other batch shapes change pixels by float rounding only (bounds in
`generation/sampler.py`). summary.json keeps the earlier runs: it is rewritten after every shard
a run finishes, so even a killed run's finished shards are counted.
SIGTERM (preemption; `preemption.PreemptionWatch`, installed first): each host dispatches no
new batch, writes the shards whose images are all sampled and drops the one it was sampling
(a rerun redoes it); host 0 writes manifest.json over the shards on disk (`complete: false`),
and every host exits 75 (`cli.EXIT_RESUME`). During start-up (reading captions, loading and
compiling the model) a single process stops at once. Several hosts stop together at JAX's
preemption sync point when jax.distributed's preemption service is on (a notice to one host
reaches all); otherwise each host stops on its own notice, and all exit 75.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import os
import time
from collections.abc import Callable, Sequence

# transformers (the CLIP tokenizer) loads PyTorch when it is installed; PyTorch's triton crashes
# when its bundled LLVM loads after TensorFlow's, so the sampler is imported before records (TF).
from stablerep_jax.generation import sampler as sampler_lib  # noqa: I001  isort: skip
from stablerep_jax.generation.sd import model as sd_model  # noqa: I001  isort: skip

import jax
import numpy as np
from absl import flags, logging
from PIL import Image
from tqdm import tqdm

from stablerep_jax import cli, contact_sheet, fileio, parallel, preemption
from stablerep_jax.data import caption_order, records
from stablerep_jax.generation import captions as captions_lib

IMAGE_FORMATS = records.IMAGE_FORMATS
SETTINGS_NAME = "settings.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
SHARD_PREFIX = "train"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One output file and the ids of the captions it holds, in writing order
    (`data/caption_order.py`)."""
    index: int
    name: str
    caption_ids: np.ndarray = dataclasses.field(compare=False, repr=False)

    @property
    def num_captions(self) -> int:
        return len(self.caption_ids)

    @functools.cached_property
    def _positions(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.caption_ids.tolist())}

    def position(self, caption_id: int) -> int:
        """Where `caption_id` sits among this shard's captions."""
        return self._positions[caption_id]


def shards_to_generate(num_captions: int, captions_per_shard: int) -> list[Shard]:
    """Every shard of the output (all hosts', finished or not), the same on every host and every
    rerun: shard S holds a seeded random sample of the captions (`caption_order.caption_order`),
    not a run of them."""
    slices = caption_order.shard_slices(num_captions, captions_per_shard)
    count = len(slices)
    return [Shard(i, f"{SHARD_PREFIX}-{i:05d}-of-{count:05d}{records.SHARD_SUFFIX}", ids)
            for i, ids in enumerate(slices)]


def host_shards(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """This host's disjoint share: shard S goes to host S mod process_count."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: need "
                         "0 <= process_index < process_count")
    return [s for s in shards if s.index % process_count == process_index]


def remove_stale_temp_files(output_dir: str, names: Sequence[str]) -> list[str]:
    """Removes the temporary files that killed runs left behind for these final names (this
    host's own files, which no other host writes; see `fileio.remove_stale_temp_files`):
    temporary names are unique per process, so a rerun never overwrites a dead run's partial
    shard. Returns the removed names."""
    stale = fileio.remove_stale_temp_files(output_dir, names)
    if stale:
        logging.info("removed %d temporary files left by interrupted runs: %s", len(stale),
                     ", ".join(stale[:5]) + (" ..." if len(stale) > 5 else ""))
    return stale


def is_finished(output_dir: str, shard: Shard) -> bool:
    """A shard is finished when its final name exists (a `.tmp` file never counts)."""
    return fileio.isfile(os.path.join(output_dir, shard.name))


def settings_of(config, captions: captions_lib.Captions) -> dict:
    """Every config value an image or the shard layout depends on (not batch or devices)."""
    return {
        "model": config.model, "dtype": config.dtype,
        "captions_sha256": captions.fingerprint(), "num_captions": len(captions),
        "images_per_caption": config.images_per_caption, "seed": config.seed,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": float(config.guidance_scale), "scheduler": config.scheduler,
        "negative_prompt": config.negative_prompt, "resolution": config.resolution,
        "save_size": config.save_size, "image_format": config.image_format,
        "jpeg_quality": config.jpeg_quality if config.image_format == "jpeg" else None,
        "captions_per_shard": config.captions_per_shard,
        caption_order.ORDER_KEY: caption_order.order_info(),
    }


def sampling_settings(config) -> sampler_lib.SamplingSettings:
    return sampler_lib.SamplingSettings(
        num_inference_steps=config.num_inference_steps,
        guidance_scale=float(config.guidance_scale), resolution=config.resolution,
        scheduler=config.scheduler, negative_prompt=config.negative_prompt, dtype=config.dtype)


def check_config(config) -> None:
    """Field checks that need no file: each error names the field and its value."""
    if not config.captions:
        raise ValueError("set --config.captions to a captions file (.txt, .csv or .tsv)")
    if not config.output_dir:
        raise ValueError("set --config.output_dir")
    if not config.model:
        raise ValueError("set --config.model to a hub id or a local diffusers directory")
    if config.image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={config.image_format!r}: choose one of {IMAGE_FORMATS}")
    for field, low in (("images_per_caption", 1), ("per_device_batch", 1),
                       ("captions_per_shard", 1), ("num_workers", 1), ("seed", 0),
                       ("save_size", 0), ("num_devices", 0), ("stop_after_shards", 0),
                       ("max_captions", 0), ("contact_sheet_captions", 0)):
        if config[field] < low:
            raise ValueError(f"{field}={config[field]}: must be >= {low}")
    if not 1 <= config.jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality={config.jpeg_quality}: must be in [1, 100]")
    if config.seed + config.images_per_caption - 1 > sampler_lib.MAX_SEED:
        raise ValueError(f"seed={config.seed}: seed + images_per_caption must stay below 2**31")
    sampling_settings(config).check()


def encode_image(image: np.ndarray, *, save_size: int, image_format: str,
                 jpeg_quality: int) -> bytes:
    """uint8 [H, W, 3] -> JPEG/PNG bytes, resized to save_size x save_size when it differs."""
    img = Image.fromarray(image)
    if save_size and img.size != (save_size, save_size):
        img = img.resize((save_size, save_size), Image.Resampling.BICUBIC)
    return records.encode_image(img, image_format, jpeg_quality)


def _summary_name(index: int, count: int) -> str:
    return "summary.json" if count == 1 else f"summary.host-{index:05d}-of-{count:05d}.json"


# Counts that add up over the runs of one output directory (one entry of summary["runs"] each).
_SUMMED = ("images", "captions", "shards_written", "seconds", "truncated_captions",
           "compile_seconds", "wall_seconds")


def earlier_runs(summary_path: str) -> list[dict]:
    """The runs an existing summary file lists (none when there is no file)."""
    try:
        summary = fileio.read_json(summary_path)
    except FileNotFoundError:
        return []
    if not isinstance(summary, dict):
        raise ValueError(f"{summary_path}: expected a JSON object, found {type(summary).__name__}")
    if not isinstance(summary.get("runs"), list):
        raise ValueError(f"{summary_path} has no 'runs' list: it was written by another layout "
                         "of generate, whose counts this run cannot add to; move it aside (the "
                         "shards stay and are kept) or use a new output_dir")
    return list(summary["runs"])


def summarize(runs: Sequence[dict], host: dict) -> dict:
    """summary.json: every run, their summed counts, and rates over the summed sampling time
    (per device: over the summed device-seconds, so runs on different device counts add up)."""
    totals = {key: sum(run.get(key, 0) for run in runs) for key in _SUMMED}
    device_seconds = sum(run.get("seconds", 0.0) * run.get("devices", 0) for run in runs)
    return dict(host, **totals, runs=list(runs),
                images_per_s=totals["images"] / totals["seconds"] if totals["seconds"] else 0.0,
                images_per_s_per_device=(totals["images"] / device_seconds if device_seconds
                                         else 0.0))


class _ShardWriter:
    """Encodes images on a thread pool as they arrive and writes each shard once all of its
    images are encoded, on a single writer thread, so the devices never wait for the disk."""

    def __init__(self, config, output_dir: str, captions: captions_lib.Captions,
                 on_written: Callable[[Shard], None] | None = None):
        self.config, self.output_dir, self.captions = config, output_dir, captions
        self.on_written = on_written
        self.k = config.images_per_caption
        self.seeds = sampler_lib.image_seeds(config.seed, self.k)
        self.encoders = concurrent.futures.ThreadPoolExecutor(config.num_workers)
        self.writer = concurrent.futures.ThreadPoolExecutor(1)
        self.encoded: dict[int, list] = collections.defaultdict(list)
        self.writes: collections.deque = collections.deque()
        self.written: list[str] = []

    def add(self, shard: Shard, image: np.ndarray) -> None:
        future = self.encoders.submit(encode_image, image, save_size=self.config.save_size,
                                      image_format=self.config.image_format,
                                      jpeg_quality=self.config.jpeg_quality)
        pending = self.encoded[shard.index]
        pending.append(future)
        if len(pending) == shard.num_captions * self.k:
            futures = self.encoded.pop(shard.index)
            self.writes.append((shard, self.writer.submit(self._write, shard, futures)))
        self._reap(limit=2)

    def _write(self, shard: Shard, futures: list) -> str:
        images = [f.result() for f in futures]
        recs = [records.CaptionRecord(
            caption=self.captions.texts[cid], caption_id=cid,
            images=images[i * self.k:(i + 1) * self.k], seeds=self.seeds)
            for i, cid in enumerate(shard.caption_ids.tolist())]
        records.write_shard(os.path.join(self.output_dir, shard.name), recs)
        logging.info("wrote %s (%d captions)", shard.name, len(recs))
        return shard.name

    def _reap(self, limit: int) -> None:
        """Collects finished writes (raising their errors); waits while more than `limit` wait."""
        while self.writes and (self.writes[0][1].done() or len(self.writes) > limit):
            shard, write = self.writes.popleft()
            self.written.append(write.result())
            if self.on_written is not None:
                self.on_written(shard)

    def backlog(self) -> int:
        return sum(not f.done() for fs in self.encoded.values() for f in fs)

    def close(self, wait_for_writes: bool = True) -> None:
        """Waits for the shards already complete to be written (unless `wait_for_writes` is
        False); images of shards still incomplete (a stop) are dropped, never written."""
        try:
            if wait_for_writes:
                self._reap(limit=0)
        finally:
            self.encoders.shutdown(wait=True, cancel_futures=True)
            self.writer.shutdown(wait=True, cancel_futures=not wait_for_writes)


def _work_items(shards: Sequence[Shard], k: int):
    """(shard, caption_id, image index) in output order: caption by caption, its K images."""
    for shard in shards:
        for cid in shard.caption_ids.tolist():
            for j in range(k):
                yield shard, cid, j


def _batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def generate_shards(sampler: sampler_lib.Sampler, shards: Sequence[Shard], config,
                    output_dir: str, captions: captions_lib.Captions,
                    on_progress: Callable[[dict], None] | None = None,
                    stop: Callable[[int], bool] | None = None) -> dict:
    """Samples and writes the given shards; returns counts and timings of this run.

    `on_progress` gets the same counts, so far, each time a shard has been written.
    `stop(n)` is asked before the n-th batch (0, 1, ...) is dispatched: when it says True, no
    further batch is dispatched, the batches in flight are finished, the shards whose images
    are all sampled are written and the rest are dropped; the counts then say `stopped`."""
    k = config.images_per_caption
    seeds = sampler_lib.image_seeds(config.seed, k)
    tokens: dict[int, np.ndarray] = {}      # token ids of the shards being dispatched
    stats = collections.Counter()
    total = sum(s.num_captions for s in shards) * k
    start = time.perf_counter()

    def counts() -> dict:
        return {"images": stats["captions"] * k, "captions": stats["captions"],
                "shards_written": stats["shards"], "seconds": time.perf_counter() - start,
                "truncated_captions": stats["truncated_captions"]}
    stopped = False

    def written(shard: Shard) -> None:
        stats["shards"] += 1
        stats["captions"] += shard.num_captions
        if on_progress is not None:
            on_progress(counts())

    writer = _ShardWriter(config, output_dir, captions, on_written=written)
    bar = tqdm(total=total, desc="generate", unit="img", mininterval=2.0, smoothing=0.1)
    in_flight: collections.deque = collections.deque()
    ok = False

    def finish(batch_items, handle):
        images, n = handle
        images = np.asarray(images)[:n]
        for (shard, _, _), image in zip(batch_items, images):
            writer.add(shard, image)
        bar.update(n)

    try:
        for n, batch in enumerate(_batches(_work_items(shards, k), sampler.batch_size)):
            if stop is not None and stop(n):
                stopped = True
                break
            for shard in dict.fromkeys(s for s, _, _ in batch):   # a batch may span shards
                if shard.index not in tokens:
                    ids, truncated = sampler.prompt_ids(
                        [captions.texts[c] for c in shard.caption_ids.tolist()])
                    tokens[shard.index] = ids
                    stats["truncated_captions"] += int(truncated.sum())
            ids = np.stack([tokens[s.index][s.position(cid)] for s, cid, _ in batch])
            last = batch[-1][0].index
            tokens = {last: tokens[last]}          # earlier shards are fully dispatched
            handle = sampler.dispatch(ids, [seeds[j] for _, _, j in batch],
                                      [cid for _, cid, _ in batch])
            in_flight.append((batch, handle))
            if len(in_flight) > 1:        # keep one batch queued behind the running one
                finish(*in_flight.popleft())
            while writer.backlog() > 4 * sampler.batch_size + 64:
                time.sleep(0.01)          # encoding lags: hold back, bounded memory
        while in_flight:
            finish(*in_flight.popleft())
        writer.close()
        ok = True
    finally:
        bar.close()
        if not ok:
            writer.close(wait_for_writes=False)
    if stopped:
        logging.warning("stopped (SIGTERM) after %d of this host's %d shards to generate; "
                        "every written shard is complete, the one being sampled was dropped",
                        stats["shards"], len(shards))
    return dict(counts(), stopped=stopped)


def write_manifest(output_dir: str, shards: Sequence[Shard], config, settings: dict) -> dict:
    """manifest.json from the finished shards on disk; counts follow from the shard plan."""
    k = config.images_per_caption
    finished = {s.name: {"captions": s.num_captions, "images": s.num_captions * k}
                for s in shards if is_finished(output_dir, s)}
    missing = len(shards) - len(finished)
    manifest = records.write_manifest(
        output_dir, finished, images_per_caption=k, complete=missing == 0,
        missing_shards=missing, total_captions=settings["num_captions"],
        num_caption_ids=settings["num_captions"],
        **{caption_order.ORDER_KEY: settings[caption_order.ORDER_KEY]},
        image_format=config.image_format, save_size=config.save_size or config.resolution,
        settings=settings)
    if missing:
        logging.warning("manifest.json lists %d of %d shards; %d are not finished yet (rerun "
                        "host 0 when every host is done)", len(finished), len(shards), missing)
    return manifest


def write_contact_sheet(output_dir: str, shards: Sequence[Shard], num_captions: int) -> str | None:
    """contact_sheet.png from the first finished shard: its first captions and their images."""
    for shard in shards:
        if is_finished(output_dir, shard):
            rows = records.read_records(os.path.join(output_dir, shard.name), limit=num_captions)
            return contact_sheet.save_contact_sheet(
                os.path.join(output_dir, CONTACT_SHEET_NAME),
                [(f"{r.caption_id}: {r.caption}", r.images) for r in rows])
    return None


def _run_entry(stats: dict, sampler: sampler_lib.Sampler | None, *, started: str,
               wall_start: float, finished: bool) -> dict:
    """One run's counts, rates and devices: an entry of summary.json's `runs`."""
    devices = len(sampler.devices) if sampler is not None else 0
    rate = stats["images"] / stats["seconds"] if stats["seconds"] else 0.0
    return dict(
        stats, started=started, finished=finished, images_per_s=rate,
        images_per_s_per_device=rate / devices if devices else 0.0,
        compile_seconds=sampler.compile_seconds if sampler is not None else 0.0,
        wall_seconds=time.perf_counter() - wall_start, devices=devices,
        device_kind=sampler.devices[0].device_kind if sampler is not None else None,
        per_device_batch=sampler.per_device_batch if sampler is not None else None)


def run(config, *, sampler: sampler_lib.Sampler | None = None,
        process_index: int | None = None, process_count: int | None = None) -> dict:
    """Generates this host's missing shards and (host 0) the manifest; returns this run's
    summary (summary.json also lists the earlier runs and their totals).

    `sampler` reuses an already built sampler (its model and settings must match the config).
    `process_index` / `process_count` default to JAX's; set them to run one host's share in a
    single process (hosts run that way one after another; host 0 last writes the full manifest).
    Every input problem raises before the model is loaded or anything is written.
    No SIGTERM handler: see `run_until_preempted`.
    """
    return _run(config, sampler, process_index, process_count, None)


def run_until_preempted(config, *, sampler: sampler_lib.Sampler | None = None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> tuple[dict | None, bool]:
    """`run` under a SIGTERM handler (`preemption.PreemptionWatch`, installed first): returns
    (this run's summary or None, preempted). A notice stops each host before its next batch;
    the shards complete by then are written, host 0 writes the manifest over the shards on
    disk (`complete: false`) and `preempted` is True on every host. A notice during start-up
    (one process) stops at once: (None, True)."""
    # The sync point is no collective, so hosts with unequal shares can ask it; without JAX's
    # preemption service each host answers for itself (an all-gather would hang on a host
    # that has finished its share).
    agree = bool(jax.config.jax_enable_preemption_service)
    with preemption.PreemptionWatch(agree=agree) as watch:
        try:
            summary = _run(config, sampler, process_index, process_count, watch)
        except preemption.PreemptedAtStartup:
            logging.warning("stopped by SIGTERM during start-up: no shard was started")
            return None, True
        return summary, summary["preempted"]


def _run(config, sampler, process_index, process_count, watch) -> dict:
    wall_start = time.perf_counter()
    check_config(config)
    captions = captions_lib.read_captions(config.captions, config.caption_column)
    if config.max_captions:
        captions = dataclasses.replace(captions, texts=captions.texts[:config.max_captions])
    sd_model.check_model(config.model)
    output_dir = config.output_dir
    settings = settings_of(config, captions)
    settings_path = os.path.join(output_dir, SETTINGS_NAME)
    settings_written = records.check_rerun_settings(settings_path, settings)
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    shards = shards_to_generate(len(captions), config.captions_per_shard)
    mine = host_shards(shards, process_index, process_count)
    todo = [s for s in mine if not is_finished(output_dir, s)]
    if config.stop_after_shards:
        todo = todo[:config.stop_after_shards]
    logging.info("%d captions (%d blank lines skipped) -> %d shards; host %d of %d: %d shards, "
                 "%d already finished, %d to generate", len(captions), captions.blank_skipped,
                 len(shards), process_index, process_count, len(mine),
                 sum(is_finished(output_dir, s) for s in mine), len(todo))

    summary_path = os.path.join(output_dir, _summary_name(process_index, process_count))
    runs = earlier_runs(summary_path)
    host = dict(blank_lines_skipped=captions.blank_skipped, process_index=process_index,
                process_count=process_count, shards_total=len(shards), shards_this_host=len(mine))
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    def save_summary(stats: dict, finished: bool) -> dict:
        entry = _run_entry(stats, sampler, started=started, wall_start=wall_start,
                           finished=finished)
        fileio.write_json_atomic(summary_path, summarize([*runs, entry], host))
        return entry

    own_files = [s.name for s in mine] + [os.path.basename(summary_path)]
    if process_index == 0:
        own_files += [SETTINGS_NAME, records.MANIFEST_NAME, CONTACT_SHEET_NAME]
    remove_stale_temp_files(output_dir, own_files)
    fileio.makedirs(output_dir)
    if process_index == 0 and not settings_written:
        fileio.write_json_atomic(settings_path, settings)

    stats = {"images": 0, "captions": 0, "shards_written": 0, "seconds": 0.0,
             "truncated_captions": 0}
    stopped = False
    if todo:
        if sampler is None:
            devices = jax.local_devices()
            if config.num_devices:
                devices = devices[:config.num_devices]
            sampler = sampler_lib.make_sampler(
                config.model, sampling_settings(config), devices=devices,
                per_device_batch=config.per_device_batch, attention=config.attention)
        elif sampler.settings != sampling_settings(config) or sampler.model != config.model:
            raise ValueError(f"the given sampler ({sampler.model!r}, {sampler.settings}) does not "
                             f"match the config ({config.model!r}, {sampling_settings(config)})")
        sampler.compile()
        stop = None if watch is None else watch.should_stop
        with contextlib.nullcontext() if watch is None else watch.working():
            stats = generate_shards(sampler, todo, config, output_dir, captions,
                                    on_progress=lambda counts: save_summary(counts, False),
                                    stop=stop)
        stopped = stats.pop("stopped")

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("stablerep_jax.generate: shards written")
        if watch is not None:     # one host stopped: every host says so (and exits 75)
            stopped = bool(np.max(multihost_utils.process_allgather(
                np.array(stopped, np.int32))))
    if process_index == 0:
        write_manifest(output_dir, shards, config, settings)
        if config.contact_sheet_captions:
            write_contact_sheet(output_dir, shards, config.contact_sheet_captions)

    if stats["images"]:
        entry = save_summary(stats, not stopped)
    else:     # a no-op rerun adds no run and keeps the numbers
        entry = _run_entry(stats, sampler, started=started, wall_start=wall_start, finished=True)
        if not fileio.exists(summary_path):
            fileio.write_json_atomic(summary_path, summarize([], host))
    summary = dict(host, **entry, preempted=stopped)
    logging.info("generated %d images in %.1f s (%.2f images/s, %.2f per device); %d captions "
                 "truncated to %d tokens", stats["images"], stats["seconds"], entry["images_per_s"],
                 summary["images_per_s_per_device"], stats["truncated_captions"],
                 sampler.max_length if sampler is not None else 77)
    return summary


def main(config):
    parallel.start_job(flags.FLAGS)
    _, preempted = run_until_preempted(config)
    return cli.EXIT_RESUME if preempted else cli.EXIT_OK


if __name__ == "__main__":
    cli.define_job_flags(None)      # outputs go to --config.output_dir
    cli.run(main)
