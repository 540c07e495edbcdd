"""Checkpoints of `train`, `convert` and `linear_probe`: one layout, read through orbax's public
`CheckpointManager` API.

Layout. A job's checkpoints live in WORKDIR/checkpoints, an orbax `CheckpointManager`
directory with one composite checkpoint per step (WORKDIR/checkpoints/<step>/<item>). The model
part, written by both `convert` (step 0) and `train`, is the items

  params        StandardSave of the Flax params tree (float32)
  batch_stats   StandardSave of the BatchNorm running statistics (absent when the tree is empty)
  model_config  JsonSave of the train config's `model` section as is (`image_size` included)

`train` adds `opt_state` and `meta` to the same steps (`TrainCheckpointer`). Which steps are
finished is the manager's answer (`all_steps`): a step a kill left half-written is never read.

Paths. Readers (`load_model`, `resolve_step_dir`) take WORKDIR. They also take the two paths
inside it that jobs print, recognised by their names alone (no files are inspected to guess):
a path whose last part is `checkpoints` is the manager directory itself, and
`.../checkpoints/<digits>` is that step. Any other path is a WORKDIR (so a WORKDIR must not
itself be named `checkpoints`).

The probe's best head is one .npz beside these (`save_probe_head` / `load_probe_head`); its
resume checkpoints (heads, SGD momentum, progress) are WORKDIR/probe_checkpoints
(`ProbeCheckpointer`), a manager of their own that model readers never open.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from stablerep_jax import fileio

CHECKPOINTS_SUBDIR = "checkpoints"
PARAMS = "params"
BATCH_STATS = "batch_stats"
MODEL_CONFIG = "model_config"
OPT_STATE = "opt_state"
META = "meta"
# `keep_checkpoints` value that keeps every finished checkpoint (orbax's LatestN(None)).
KEEP_ALL = -1


def _absolute(path) -> epath.Path:
    """orbax refuses relative paths ("Checkpoint path should be absolute"): a local path is
    made absolute against the working directory; gs:// and other URLs are left as they are."""
    text = os.fspath(path)
    return epath.Path(text if fileio.is_url(text) else os.path.abspath(text))


def checkpoints_dir(directory) -> epath.Path:
    """WORKDIR -> WORKDIR/checkpoints, the manager directory (absolute, see `_absolute`)."""
    return _absolute(directory) / CHECKPOINTS_SUBDIR


def model_save_args(params, batch_stats, model_config: dict) -> dict:
    """The composite items of the model part, for `ocp.args.Composite(**items, **more)`."""
    items = {PARAMS: ocp.args.StandardSave(params),
             MODEL_CONFIG: ocp.args.JsonSave(_json_ready(model_config))}
    if jax.tree_util.tree_leaves(batch_stats):
        items[BATCH_STATS] = ocp.args.StandardSave(batch_stats)
    return items


def save_model(directory, step: int, params, batch_stats, model_config: dict) -> epath.Path:
    """Writes params, BN statistics and the model config as step `step` of WORKDIR/checkpoints.

    Every process must call it (orbax coordinates multi-host writes). Returns the step directory.
    """
    if "image_size" not in model_config:
        raise ValueError("model_config must carry 'image_size' (the ViT's input size)")
    options = ocp.CheckpointManagerOptions(create=True)
    with ocp.CheckpointManager(checkpoints_dir(directory), options=options) as manager:
        manager.save(step, args=ocp.args.Composite(
            **model_save_args(params, batch_stats, model_config)))
        manager.wait_until_finished()
    step_dir = checkpoints_dir(directory) / str(step)
    logging.info("saved model checkpoint %s", step_dir)
    return step_dir


# --------------------------------------------------------------------------------------------
# Reading


def locate(path, step: Optional[int] = None) -> tuple[epath.Path, Optional[int]]:
    """(manager directory, step or None for the latest) that `path` names, by the path rule of
    the module docstring. A step in the path and a different `step` argument is an error."""
    path = _absolute(path)
    if path.name.isdigit() and path.parent.name == CHECKPOINTS_SUBDIR:
        if step is not None and int(path.name) != int(step):
            raise ValueError(f"{path} is step {path.name}, but step={step} was asked for")
        return path.parent, int(path.name)
    if path.name == CHECKPOINTS_SUBDIR:
        return path, step
    return path / CHECKPOINTS_SUBDIR, step


def _reader(manager_dir: epath.Path) -> ocp.CheckpointManager:
    """A read-only manager that knows every item this package writes (so its metadata can be
    read without warnings about unknown items). Read-only: a probe may run beside training."""
    handlers = {PARAMS: ocp.PyTreeCheckpointHandler(), BATCH_STATS: ocp.PyTreeCheckpointHandler(),
                OPT_STATE: ocp.PyTreeCheckpointHandler(), MODEL_CONFIG: ocp.JsonCheckpointHandler(),
                META: ocp.JsonCheckpointHandler()}
    options = ocp.CheckpointManagerOptions(create=False, read_only=True, save_interval_steps=0)
    return ocp.CheckpointManager(manager_dir, options=options, item_handlers=handlers)


def _finished(manager: ocp.CheckpointManager) -> list[int]:
    """The manager's finished steps, ascending (orbax leaves out a step still being written or
    left half-written by a kill: it lives under a temporary name until it is complete)."""
    return sorted(int(s) for s in manager.all_steps())


def finished_steps(path) -> list[int]:
    """The finished steps (ascending) of the checkpoints `path` names; [] when there are none."""
    manager_dir, _ = locate(path)
    if not manager_dir.exists():
        return []
    with _reader(manager_dir) as manager:
        return _finished(manager)


def _open(path, step: Optional[int]) -> tuple[ocp.CheckpointManager, int]:
    """(reader, step to read) for `path` and `step` (see `resolve_step_dir`); the caller closes
    the reader."""
    manager_dir, step = locate(path, step)
    if not manager_dir.exists():
        if not _absolute(path).exists():
            raise FileNotFoundError(f"checkpoint path {_absolute(path)} does not exist")
        raise FileNotFoundError(f"no model checkpoint in {manager_dir} (no such directory)")
    manager = _reader(manager_dir)
    try:
        return manager, _pick_step(_finished(manager), manager_dir, step)
    except FileNotFoundError:
        manager.close()
        raise


def _pick_step(steps: list[int], manager_dir: epath.Path, step: Optional[int]) -> int:
    """`step` if it is among the finished `steps`, else the latest; errors say what is there."""
    if not steps:
        raise FileNotFoundError(f"no model checkpoint in {manager_dir} (expected "
                                f"<step>/{PARAMS} there, written by train or convert)")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(f"no step {step} in {manager_dir}; finished steps there: {steps}")
    return int(step)


def resolve_step_dir(path, step: Optional[int] = None) -> epath.Path:
    """The step directory to read: `step`, the step in the path, or the latest finished one.

    FileNotFoundError names the path when it holds no finished checkpoint, and lists the steps
    that are there when the asked-for step is not one of them.
    """
    manager, step = _open(path, step)
    with manager:
        return epath.Path(manager.directory) / str(step)


def _numpy_restore(tree_metadata) -> ocp.args.PyTreeRestore:
    """Restore args that bring every array of a saved tree back as host numpy (no device
    placement, so any device layout, or none, can read a checkpoint)."""
    restore_args = jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_metadata.tree,
        is_leaf=lambda x: not isinstance(x, dict))   # Flax trees are nested dicts
    return ocp.args.PyTreeRestore(restore_args=restore_args)


def load_model(path, step: Optional[int] = None) -> tuple[Any, Any, dict]:
    """Reads (params, batch_stats, model_config) of a `train` or `convert` checkpoint.

    `path`: see the module docstring; the latest finished step unless `step` is given (or is
    in the path). Arrays come back as numpy; `batch_stats` is {} when the checkpoint has none.
    """
    manager, step = _open(path, step)
    step_dir = epath.Path(manager.directory) / str(step)
    with manager:
        items = manager.metadata(step).item_metadata
        missing = [name for name in (PARAMS, MODEL_CONFIG) if name not in items]
        if missing:
            raise FileNotFoundError(f"{step_dir} has no {' or '.join(missing)} "
                                    f"item (items there: {sorted(items)})")
        wanted = {PARAMS: _numpy_restore(items[PARAMS]), MODEL_CONFIG: ocp.args.JsonRestore()}
        if BATCH_STATS in items:
            wanted[BATCH_STATS] = _numpy_restore(items[BATCH_STATS])
        restored = manager.restore(step, args=ocp.args.Composite(**wanted))
    logging.info("loaded model checkpoint %s", step_dir)
    batch_stats = restored[BATCH_STATS] if BATCH_STATS in wanted else {}
    return restored[PARAMS], batch_stats, dict(restored[MODEL_CONFIG])


def merge_matching(target, source, source_name: str = "checkpoint", allow_missing: bool = False):
    """Returns `target` with every leaf replaced by `source`'s leaf at the same path.

    Shapes must agree (an error names the path and both shapes). Paths of `target` missing from
    `source` are an error listing them, unless `allow_missing` (then target's leaves are kept).
    Paths only in `source` are an error too: silently dropping weights hides a wrong model.
    """
    target_flat = _flatten(target)
    source_flat = _flatten(source)
    missing = sorted(set(target_flat) - set(source_flat))
    unexpected = sorted(set(source_flat) - set(target_flat))
    problems = []
    if missing and not allow_missing:
        problems.append(f"missing in {source_name}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"not in this model: {', '.join(unexpected)}")
    for key in sorted(set(target_flat) & set(source_flat)):
        t_shape, s_shape = np.shape(target_flat[key]), np.shape(source_flat[key])
        if t_shape != s_shape:
            problems.append(f"{key}: {source_name} has shape {s_shape}, the model {t_shape}")
    if problems:
        raise ValueError("weights do not match the model:\n  " + "\n  ".join(problems))

    def pick(path, leaf):
        key = _path_str(path)
        if key not in source_flat:
            return leaf
        return np.asarray(source_flat[key], dtype=getattr(leaf, "dtype", None))

    return jax.tree_util.tree_map_with_path(pick, target)


def _path_str(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _flatten(tree) -> dict:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {_path_str(path): leaf for path, leaf in flat}


def _json_ready(value):
    """Tuples -> lists, numpy scalars -> Python, so the config survives JSON unchanged."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value



def _workdir_of(manager_dir: epath.Path) -> str:
    return os.fspath(manager_dir.parent) if manager_dir.name == CHECKPOINTS_SUBDIR else \
        os.fspath(manager_dir)


def keep_policy(keep) -> ocp.checkpoint_managers.LatestN:
    """The orbax preservation policy for train's `keep_checkpoints`: the newest `keep` finished
    checkpoints, or all of them for `KEEP_ALL` (-1). Any other value below 1 is a ValueError
    naming the key: 0 would delete each checkpoint as soon as it is written."""
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or (
            keep < 1 and keep != KEEP_ALL):
        raise ValueError(
            f"keep_checkpoints={keep!r}: must be >= 1 (how many of the newest finished "
            f"checkpoints to keep) or {KEEP_ALL} (keep all of them); with {keep!r} every "
            "checkpoint would be deleted as soon as it is written and a rerun would start over")
    return ocp.checkpoint_managers.LatestN(None if keep == KEEP_ALL else int(keep))


class TrainCheckpointer:
    """Train-state checkpoints in the shared layout: the model part (`params`, `batch_stats`,
    `model_config`) plus `opt_state` and `meta` (step, train config) for exact resume.

    Saves are async (training goes on while the previous step is written); every process must
    call `save`; `close()` waits for the last write. A step directory appears only when complete.
    """

    def __init__(self, workdir, keep: int = 3):
        """`keep`: the newest finished checkpoints kept (`keep_policy`; `KEEP_ALL` keeps all).

        Temporary directories that killed saves left (`<step>.orbax-checkpoint-tmp*`, each the
        state's size) are removed as the manager opens (orbax's `cleanup_tmp_directories`, in
        the background on the primary host; the first save waits for it). Only a trainer opens
        a workdir this way: readers are read-only and never remove anything."""
        self.directory = checkpoints_dir(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=keep_policy(keep),
                                                 create=True, enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, step: int, state, model_config: dict, run_meta: dict) -> None:
        """Starts writing `step` (async). `run_meta` (JSON-ready: the train config and what a
        resume is checked against, see `resume.run_identity`) goes into `meta` with the step."""
        self._manager.save(step, args=ocp.args.Composite(
            **model_save_args(state.params, state.batch_stats, model_config),
            **{OPT_STATE: ocp.args.StandardSave(state.opt_state),
               META: ocp.args.JsonSave({**_json_ready(run_meta), "step": int(step)})}),
            force=True)

    def restore_meta(self, step: int) -> dict:
        """The `meta` item of `step` alone (read before the state, to check a resume).

        A step without one is not a train checkpoint (`convert` writes params alone): a
        ValueError says so and how to start from those weights instead."""
        step_dir = self.directory / str(step)
        if not (step_dir / META).exists():
            items = (sorted(p.name for p in step_dir.iterdir() if p.is_dir())
                     if step_dir.exists() else [])
            raise ValueError(
                f"{step_dir} is not a train checkpoint: it has no {META!r} item (the run's "
                f"step and settings; items there: {', '.join(items) or 'none'}), as written by "
                "`convert`. To train from these weights, pass "
                f"--config.init_from={_workdir_of(self.directory)} and a new, empty --workdir")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{META: ocp.args.JsonRestore()}))
        return dict(restored[META])

    def restore(self, step: int, abstract_state, shardings):
        """Restores `step` straight into `shardings` (each device reads only its shard)."""
        def target(tree, tree_shardings):
            return jax.tree_util.tree_map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                tree, tree_shardings)

        items = {PARAMS: ocp.args.StandardRestore(target(abstract_state.params, shardings.params)),
                 OPT_STATE: ocp.args.StandardRestore(
                     target(abstract_state.opt_state, shardings.opt_state)),
                 META: ocp.args.JsonRestore()}
        has_stats = bool(jax.tree_util.tree_leaves(abstract_state.batch_stats))
        if has_stats:
            items[BATCH_STATS] = ocp.args.StandardRestore(
                target(abstract_state.batch_stats, shardings.batch_stats))
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if int(restored[META]["step"]) != step:
            raise ValueError(f"{self.directory}/{step}: its meta says step {restored[META]['step']}")
        return abstract_state.replace(
            step=jax.device_put(np.asarray(step, np.int32), shardings.step),
            params=restored[PARAMS],
            batch_stats=restored[BATCH_STATS] if has_stats else abstract_state.batch_stats,
            opt_state=restored[OPT_STATE])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# --------------------------------------------------------------------------------------------
# The probe's resume checkpoints

PROBE_CHECKPOINTS_SUBDIR = "probe_checkpoints"
PROBE_HEADS = "heads"            # the stacked heads and their SGD momentum (replicated arrays)
PROBE_BEST_HEAD = "best_head"    # host copy of the head at the best (epoch, lr) so far
PROBE_PROGRESS = "progress"      # epoch, losses, evaluations, best top-1, settings (JSON)


class ProbeCheckpointer:
    """The linear probe's state after an epoch, for an exact resume: WORKDIR/probe_checkpoints,
    an orbax `CheckpointManager` with one composite checkpoint per epoch (the newest kept;
    temporary directories of killed saves are removed as it opens). Every process calls
    `save`; saves are synchronous (a few heads: small next to an epoch)."""

    def __init__(self, workdir):
        self.directory = _absolute(workdir) / PROBE_CHECKPOINTS_SUBDIR
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=keep_policy(1), create=True,
                                                 enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=True))

    def latest_epoch(self) -> Optional[int]:
        return self._manager.latest_step()

    def save(self, epoch: int, heads: dict, progress: dict, best_head: Optional[dict]) -> None:
        """`heads`: name -> array (the `HeadState` fields); `progress`: JSON-ready;
        `best_head`: name -> numpy array, or None before the first evaluation."""
        items = {PROBE_HEADS: ocp.args.StandardSave(heads),
                 PROBE_PROGRESS: ocp.args.JsonSave({
                     **_json_ready(progress), "epoch": int(epoch),
                     "has_best_head": best_head is not None,
                     "best_head_keys": sorted(best_head) if best_head is not None else []})}
        if best_head is not None:
            items[PROBE_BEST_HEAD] = ocp.args.PyTreeSave(   # restored as numpy: PyTree args
                {k: np.asarray(v) for k, v in best_head.items()})
        self._manager.save(epoch, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def restore_progress(self, epoch: int) -> dict:
        restored = self._manager.restore(epoch, args=ocp.args.Composite(
            **{PROBE_PROGRESS: ocp.args.JsonRestore()}))
        return dict(restored[PROBE_PROGRESS])

    def restore(self, epoch: int, heads_target: dict) -> tuple[dict, dict, Optional[dict]]:
        """(heads, progress, best head or None) of `epoch`; `heads_target`: name ->
        jax.ShapeDtypeStruct with the sharding to restore into."""
        progress = self.restore_progress(epoch)
        items = {PROBE_HEADS: ocp.args.StandardRestore(heads_target)}
        if progress.get("has_best_head"):
            items[PROBE_BEST_HEAD] = ocp.args.PyTreeRestore(restore_args={
                name: ocp.RestoreArgs(restore_type=np.ndarray)
                for name in progress["best_head_keys"]})
        restored = self._manager.restore(epoch, args=ocp.args.Composite(**items))
        best = restored[PROBE_BEST_HEAD] if progress.get("has_best_head") else None
        return dict(restored[PROBE_HEADS]), progress, (
            {k: np.asarray(v) for k, v in best.items()} if best is not None else None)

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# --------------------------------------------------------------------------------------------
# The probe's best head


def save_probe_head(path: str, head: dict, meta: dict) -> str:
    """One .npz holding a linear head's arrays and its JSON `meta` (under the key `meta_json`),
    written atomically through `fileio` (local path, gs://, ram://). Returns `path`."""
    buffer = io.BytesIO()
    np.savez(buffer, **head, meta_json=np.array(json.dumps(meta, sort_keys=True)))
    return fileio.write_bytes_atomic(path, buffer.getvalue())


def load_probe_head(path: str) -> tuple[dict, dict]:
    """(head arrays, meta) of a `save_probe_head` file."""
    with np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta_json"]))
        return {k: archive[k] for k in archive.files if k != "meta_json"}, meta
