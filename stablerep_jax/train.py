r"""StableRep / StableRep++ pre-training, sharded over every device of every host.

  python -m stablerep_jax.train --config=configs/stablerep.py:vit_b16_cc12m_1x \
      --config.data.train_files='DATA/*.tfrecord' --workdir=WORKDIR

Read top to bottom: mesh -> data size and schedule -> model and optimizer -> sharded state
(fresh, fine-tuned from `init_from`, or resumed from WORKDIR) -> one compiled step -> loop with
logging, checkpoints, preemption and NaN guards. Rerunning the same command resumes exactly.

Exit codes (`cli`): 0 when the run reached its last step (or `stop_at_step`), 75
(`cli.EXIT_RESUME`, EX_TEMPFAIL) when SIGTERM stopped it early after saving a checkpoint (run
the same command again to resume), 1 on an error. Nothing non-finite is ever saved.

One trainer per workdir: the run holds WORKDIR/lease.json (`lease.py`: host, pid, start time,
heartbeat). A second trainer refuses, naming the holder; a lease whose heartbeat is older than
`lease.timeout_s` is taken over, and its old holder stops at its next checkpoint (saving
nothing), naming the new one.
"""
from __future__ import annotations

import dataclasses
import math
import time

import jax
from absl import flags, logging
from tqdm import tqdm

from stablerep_jax import checkpoint, cli, flops, lease, parallel, resume, xla_flags
from stablerep_jax.data import pipeline
from stablerep_jax.data.train_set import TrainSet
from stablerep_jax.metrics import MetricWriter
from stablerep_jax.preemption import PreemptedAtStartup, PreemptionWatch  # noqa: F401
from stablerep_jax.models.encoder import build_model  # noqa: F401  (this module's API)
# The step itself (state, loss, update, shardings) lives in the TF-free `train_step` module;
# these names stay importable from here.
from stablerep_jax.train_step import (  # noqa: F401
    TrainingParts, TrainState, all_finite, build_training, compiled_flops, init_variables,
    make_init_fn, make_loss_fn, make_train_step, model_flops_per_step, state_shardings,
    views_per_caption)


@dataclasses.dataclass
class TrainResult:
    step: int                      # the step the run stopped at
    total_steps: int               # 0 when SIGTERM stopped it during start-up
    last_metrics: dict
    preempted: bool = False


# --------------------------------------------------------------------------------------------
# Sizes and checks


def epoch_steps(config, dataset: TrainSet | None, process_count: int) -> int:
    """Steps per epoch, the number the input pipeline streams: `data.num_captions //
    batch_size` when that is set, else the data set's (one host: captions // batch_size, the
    reference's drop_last). `dataset` may be None only when data.num_captions is set."""
    if config.data.num_captions > 0:
        captions = int(config.data.num_captions)
        steps = captions // config.batch_size
    else:
        captions = dataset.num_records
        steps = dataset.steps_per_epoch(config.batch_size, process_count)
    if steps < 1:
        raise ValueError(f"batch_size {config.batch_size} is larger than the data set "
                         f"({captions} captions, {process_count} host(s))")
    return steps


def training_length(config, steps_per_epoch: int) -> int:
    """Total steps: `total_steps`, else `epochs` x `steps_per_epoch`."""
    total = config.total_steps if config.total_steps > 0 else int(round(config.epochs * steps_per_epoch))
    if total <= 0:
        raise ValueError(f"training would run {total} steps; set total_steps or epochs > 0")
    return total


def check_image_size(config) -> None:
    """model.image_size is the crop side; data.image_size (what the input pipeline reads)
    refers to it (configs/stablerep.py). Setting data.image_size to another value stops here
    naming the key to set instead."""
    if config.data.image_size != config.model.image_size:
        raise ValueError(f"data.image_size={config.data.image_size} differs from "
                         f"model.image_size={config.model.image_size}: set "
                         f"--config.model.image_size={config.data.image_size} and leave "
                         "data.image_size unset (it follows model.image_size)")


def check_config(config) -> None:
    if not config.data.train_files:
        raise ValueError("set --config.data.train_files to a glob of TFRecord shards")
    check_image_size(config)
    if config.model.add_language and not config.data.tokenizer:
        raise ValueError("StableRep++ (model.add_language) needs --config.data.tokenizer, "
                         "a CLIP tokenizer directory such as SD's tokenizer/")
    if views_per_caption(config) < 2:
        raise ValueError(f"n_img x num_crop = {views_per_caption(config)}: the loss needs at "
                         "least 2 views of a caption")
    for key in ("log_every", "checkpoint_every", "preemption_check_every"):
        if config[key] < 1:
            raise ValueError(f"{key}={config[key]}: must be >= 1")
    for key, meaning in (("total_steps", "the run's length in steps; 0: set by epochs"),
                         ("stop_at_step", "checkpoint and stop there; 0: run to the end")):
        if config[key] < 0:
            raise ValueError(f"{key}={config[key]}: must be > 0 ({meaning})")
    checkpoint.keep_policy(config.keep_checkpoints)
    parallel.host_local_batch_size(config.batch_size)
    lease.check_settings(config.lease.timeout_s, config.lease.heartbeat_s)


# The job


def train_and_evaluate(config, workdir: str, allow_changes=(),
                       checkpoint_workdir: str | None = None) -> TrainResult:
    """Trains (or resumes) in `workdir` (local or a tf.io.gfile URL such as gs://).

    `allow_changes`: config keys (and `data.files`, `process_count`) that may differ from the run
    that wrote the checkpoints (see `resume`). `checkpoint_workdir`: where `checkpoints/` goes
    if not in `workdir` (e.g. a faster disk); metrics and TensorBoard stay in `workdir`.

    The SIGTERM handler (`preemption.PreemptionWatch`) is installed before anything else and
    removed only after the checkpoint manager has closed: a notice during start-up stops the
    run at once (`preempted`, nothing new saved), one during the steps saves and stops, and one
    during the last save waits for it."""
    with PreemptionWatch(config.preemption_check_every) as watch:
        try:
            check_config(config)           # before the lease: a wrong config writes nothing
            with lease.hold(workdir, config.lease.timeout_s,
                            config.lease.heartbeat_s) as check_lease:
                return _train_and_evaluate(config, workdir, allow_changes, checkpoint_workdir,
                                           watch, check_lease)
        except PreemptedAtStartup:
            steps = checkpoint.finished_steps(checkpoint_workdir or workdir)
            last = steps[-1] if steps else 0
            logging.warning("stopped by SIGTERM during start-up (nothing new to save; the "
                            "latest checkpoint is step %d); exiting with code %d: rerun the "
                            "same command to resume", last, cli.EXIT_RESUME)
            return TrainResult(step=last, total_steps=0, last_metrics={}, preempted=True)


def _train_and_evaluate(config, workdir: str, allow_changes, checkpoint_workdir,
                        watch: PreemptionWatch, check_lease=lambda: None) -> TrainResult:
    mesh = parallel.make_mesh()
    # The data set is resolved here once: the schedule, the resume check and the input
    # pipeline all see the shards as they are now (a shard written later is not read).
    dataset = TrainSet.resolve(config.data.train_files)
    steps_per_epoch = epoch_steps(config, dataset, jax.process_count())
    total_steps = training_length(config, steps_per_epoch)
    stop_at = min(config.stop_at_step, total_steps) if config.stop_at_step > 0 else total_steps
    logging.info("training %d steps (%d steps/epoch) on %d devices; global batch %d captions x %d views",
                 total_steps, steps_per_epoch, jax.device_count(), config.batch_size,
                 views_per_caption(config))
    parts = build_training(config, mesh, total_steps, steps_per_epoch)
    abstract_state, shardings, step_fn = parts.abstract_state, parts.shardings, parts.step_fn

    model_config = config.model.to_dict()
    ckpt = checkpoint.TrainCheckpointer(checkpoint_workdir or workdir, keep=config.keep_checkpoints)
    start_step = ckpt.latest_step()
    run_meta = resume.run_identity(config.to_json_best_effort(),
                                   dataset.fingerprint(),
                                   jax.process_count())
    if start_step is not None:
        try:   # before anything is written or restored: a wrong resume stops here
            resume.check_resume(ckpt.restore_meta(start_step), run_meta[resume.META_TRAIN_CONFIG],
                                run_meta[resume.META_DATA_FILES], jax.process_count(),
                                allowed=resume.parse_allowed(allow_changes),
                                where=f"{ckpt.directory}/{start_step}")
        except resume.ResumeMismatch:
            ckpt.close()
            raise
        state = ckpt.restore(start_step, abstract_state, shardings)
        logging.info("resumed from %s at step %d", ckpt.directory, start_step)
    else:
        start_step = 0
        state = parts.init(jax.random.PRNGKey(config.seed))
        if config.init_from:
            state = _load_initial_weights(state, config.init_from, shardings)

    data = pipeline.make_train_iterator(
        config.data, dataset, batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step, steps_per_epoch=steps_per_epoch,
        tokenizer_dir=config.data.tokenizer if config.model.add_language else None)

    knn_monitor = None
    if config.knn.every > 0:
        from stablerep_jax.knn import KnnMonitor   # the k-NN monitor pulls in eval data code
        if not config.knn.dataset:
            raise ValueError("knn.every > 0 needs --config.knn.dataset (TFDS name or folder:PATH)")
        knn_monitor = KnnMonitor.from_train_config(parts.model, config.knn,
                                                   config.model.image_size, mesh)

    writer = MetricWriter(workdir, keep_through_step=start_step)
    images_per_step = config.batch_size * views_per_caption(config)
    # Model FLOPs (PaLM's MFU count, from the model's shapes: XLA's cost analysis misses the
    # cuBLAS/cuDNN calls on GPUs) per chip per step, and the chip's data-sheet bf16 peak.
    flops_per_chip_step = model_flops_per_step(config) / jax.device_count()
    peak_flops = flops.published_peak_flops(jax.devices()[0].device_kind)
    step = start_step
    last_metrics: dict = {}
    compiled = None             # the step, compiled once (ahead of time) at the first batch
    preempted = False
    bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
               disable=jax.process_index() != 0)
    window_start, window_steps = time.perf_counter(), 0
    try:
        with watch.working():
            while step < stop_at:
                batch = parallel.global_batch(mesh, next(data))
                if compiled is None:
                    compiled = step_fn.lower(state, batch).compile()
                    logging.info("model FLOPs per step per chip: %.4g (XLA's cost analysis of "
                                 "the compiled step, a cross-check that misses custom calls: "
                                 "%.4g)", flops_per_chip_step, compiled_flops(compiled))
                state, metrics = compiled(state, batch)
                step += 1
                window_steps += 1
                bar.update(1)

                preempted = watch.should_stop(step)
                log_now = step % config.log_every == 0 or step == stop_at
                save_now = step % config.checkpoint_every == 0 or step == stop_at or preempted
                if log_now or save_now:      # one device sync per log / checkpoint step
                    _check_finite(step, state, metrics, ckpt)

                if log_now:
                    elapsed = time.perf_counter() - window_start
                    last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    step_time = elapsed / max(window_steps, 1)
                    last_metrics.update(
                        step_time=step_time, images_per_sec=images_per_step / step_time,
                        tflops_per_sec=flops_per_chip_step / step_time / 1e12,   # per chip
                        epoch=step / steps_per_epoch,
                        dropped_records=float(getattr(data, "dropped", 0)))
                    if peak_flops:
                        last_metrics["mfu"] = flops_per_chip_step / step_time / peak_flops
                    writer.write(step, last_metrics)
                    bar.set_postfix(loss=f"{last_metrics['loss']:.4f}",
                                    img_s=f"{last_metrics['images_per_sec']:.1f}")
                    window_start, window_steps = time.perf_counter(), 0

                if knn_monitor is not None and (step % config.knn.every == 0 or step == stop_at):
                    writer.write(step, knn_monitor(state.params, state.batch_stats))

                if save_now:
                    check_lease()         # taken over by another trainer: stop, save nothing
                    ckpt.save(step, state, model_config, run_meta)
                if preempted:
                    break
        ckpt.wait()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    if preempted:
        logging.warning("stopped early by SIGTERM at step %d of %d, checkpoint saved; exiting "
                        "with code %d: rerun the same command to resume", step, total_steps,
                        cli.EXIT_RESUME)
    elif step < total_steps:
        logging.info("stopped at step %d of %d (stop_at_step); rerun without it to go on",
                     step, total_steps)
    else:
        logging.info("finished at step %d of %d", step, total_steps)
    return TrainResult(step=step, total_steps=total_steps, last_metrics=last_metrics,
                       preempted=preempted)


def _check_finite(step: int, state: TrainState, metrics: dict, ckpt) -> None:
    """Raises FloatingPointError unless the loss and the new params, BN statistics and optimizer
    state are all finite: a state that fails this is never saved, so the latest checkpoint is
    the last one whose parameters are all finite."""
    ok, loss = jax.device_get((all_finite((state.params, state.batch_stats, state.opt_state,
                                            metrics["loss"])), metrics["loss"]))
    if bool(ok):
        return
    loss = float(loss)
    what = (f"non-finite loss {loss}" if not math.isfinite(loss) else
            f"non-finite parameters or optimizer state (loss {loss})")
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"the last checkpoint with all-finite parameters is step {last} in {ckpt.directory}"
             if last is not None else "no checkpoint was written")
    raise FloatingPointError(f"{what} at step {step}; stopping ({where})")


def _load_initial_weights(state: TrainState, path: str, shardings: TrainState) -> TrainState:
    """Fine-tunes from a `convert` or `train` checkpoint: its params must match this model."""
    params, batch_stats, _ = checkpoint.load_model(path)
    merged = checkpoint.merge_matching(state.params, params, source_name=path)
    merged_stats = checkpoint.merge_matching(state.batch_stats, batch_stats or {}, source_name=path,
                                             allow_missing=True)
    state = state.replace(params=merged, batch_stats=merged_stats)
    logging.info("initial weights from %s", path)
    return jax.device_put(state, shardings)


def main(config) -> int:
    """The command line job: exit code 0 when done, `cli.EXIT_RESUME` when preempted."""
    xla_flags.apply()          # before JAX starts its backend: XLA reads its flags only then
    parallel.start_job(flags.FLAGS)
    result = train_and_evaluate(config, flags.FLAGS.workdir,
                                allow_changes=resume.parse_allowed(flags.FLAGS.resume_allow_changes),
                                checkpoint_workdir=flags.FLAGS.checkpoint_workdir)
    return cli.EXIT_RESUME if result.preempted else cli.EXIT_OK


if __name__ == "__main__":
    cli.define_job_flags("checkpoints, metrics.jsonl and TensorBoard go here")
    flags.DEFINE_string("resume_allow_changes", "",
                        "comma-separated config keys (or data.files, process_count) that may "
                        "differ from the run being resumed; any other change stops the run")
    flags.DEFINE_string("checkpoint_workdir", None,
                        "put checkpoints/ here instead of in --workdir (same layout)")
    cli.run(main)
