"""Checkpoint layout shared by `train`, `convert` and `linear_probe`.

An orbax `CheckpointManager` directory `DIR/checkpoints/<step>/` with one composite item per
concern. The model part, written by both `convert` and `train`, is:

  params        StandardSave of the Flax params tree (float32)
  batch_stats   StandardSave of the BatchNorm running statistics (absent when the tree is empty)
  model_config  JsonSave of the train config's `model` fields plus `image_size`

`train` adds its own items (optimizer state, step, ...) to the same step directories; the model
loader restores only the items above, as host numpy arrays, so it works on any device layout.
"""
from __future__ import annotations

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


def _absolute(path) -> epath.Path:
    """orbax refuses relative paths ("Checkpoint path should be absolute"): a local path is
    made absolute against the working directory; gs:// and other URLs are left as they are."""
    text = os.fspath(path)
    return epath.Path(text if fileio.is_url(text) else os.path.abspath(text))


def checkpoints_dir(directory) -> epath.Path:
    """DIR -> DIR/checkpoints, the manager directory (absolute, see `_absolute`)."""
    return _absolute(directory) / CHECKPOINTS_SUBDIR


def model_save_args(params, batch_stats, model_config: dict) -> dict:
    """The composite items of the model part, for `ocp.args.Composite(**items, **more)`."""
    items = {PARAMS: ocp.args.StandardSave(params),
             MODEL_CONFIG: ocp.args.JsonSave(_json_ready(model_config))}
    if jax.tree_util.tree_leaves(batch_stats):
        items[BATCH_STATS] = ocp.args.StandardSave(batch_stats)
    return items


def save_model(directory, step: int, params, batch_stats, model_config: dict) -> epath.Path:
    """Writes params, BN statistics and the model config as step `step` of DIR/checkpoints.

    Every process must call it (orbax coordinates multi-host writes). Returns the step directory.
    """
    if "image_size" not in model_config:
        raise ValueError("model_config must carry 'image_size' (the ViT's input size)")
    manager = ocp.CheckpointManager(checkpoints_dir(directory),
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(step, args=ocp.args.Composite(
            **model_save_args(params, batch_stats, model_config)))
        manager.wait_until_finished()
    finally:
        manager.close()
    step_dir = checkpoints_dir(directory) / str(step)
    logging.info("saved model checkpoint %s", step_dir)
    return step_dir


def resolve_step_dir(path, step: Optional[int] = None) -> epath.Path:
    """DIR, DIR/checkpoints or DIR/checkpoints/<step> -> the step directory to read.

    Without `step` (and without a step in the path) the latest finished step is used. Raises
    FileNotFoundError naming the path when no checkpoint is there.
    """
    path = _absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if path.name.isdigit() and (path / MODEL_CONFIG).exists():
        if step is not None and int(path.name) != step:
            raise ValueError(f"{path} is step {path.name}, but step={step} was asked for")
        return path
    manager_dir = path if not (path / CHECKPOINTS_SUBDIR).exists() else path / CHECKPOINTS_SUBDIR
    steps = sorted(int(p.name) for p in manager_dir.iterdir()
                   if p.name.isdigit() and (p / MODEL_CONFIG).exists() and _is_finished(p))
    if not steps:
        raise FileNotFoundError(f"no model checkpoint in {path} (expected "
                                f"{CHECKPOINTS_SUBDIR}/<step>/{MODEL_CONFIG})")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no step {step} in {manager_dir}; steps there: {steps}")
    return manager_dir / str(step)


def _is_finished(step_dir: epath.Path) -> bool:
    """orbax writes to a temporary name and renames; a finished step has its metadata file."""
    return any((step_dir / name).exists()
               for name in ("_CHECKPOINT_METADATA", "commit_success.txt"))


def _restore_numpy(item_dir: epath.Path) -> Any:
    """Restores one StandardSave item as a tree of host numpy arrays (no device placement).

    Reads through the item's handler directly: the step-level metadata belongs to the manager.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(item_dir).tree
        # Flax trees are nested dicts; metadata entries may themselves be pytrees.
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree,
            is_leaf=lambda x: not isinstance(x, dict))
        return handler.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()


def load_model(path, step: Optional[int] = None) -> tuple[Any, Any, dict]:
    """Reads (params, batch_stats, model_config) of a `train` or `convert` checkpoint.

    `path` may be DIR, DIR/checkpoints or DIR/checkpoints/<step>; the latest step when `step` is
    not given. Arrays come back as numpy; `batch_stats` is {} when the checkpoint has none.
    """
    step_dir = resolve_step_dir(path, step)
    if not (step_dir / PARAMS).exists():
        raise FileNotFoundError(f"{step_dir} has no {PARAMS!r} item")
    model_config = ocp.JsonCheckpointHandler().restore(step_dir / MODEL_CONFIG)
    params = _restore_numpy(step_dir / PARAMS)
    batch_stats = {}
    if (step_dir / BATCH_STATS).exists():
        batch_stats = _restore_numpy(step_dir / BATCH_STATS)
    logging.info("loaded model checkpoint %s", step_dir)
    return params, batch_stats, dict(model_config)


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


OPT_STATE = "opt_state"
META = "meta"


class TrainCheckpointer:
    """Train-state checkpoints in the shared layout: the model part (`params`, `batch_stats`,
    `model_config`) plus `opt_state` and `meta` (step, train config) for exact resume.

    Saves are async (training goes on while the previous step is written); every process must
    call `save`; `close()` waits for the last write. A step directory appears only when complete.
    """

    def __init__(self, workdir, keep: int = 3):
        self.directory = checkpoints_dir(workdir)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

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
        """The `meta` item of `step` alone (read before the state, to check a resume)."""
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
