"""What a resumed training run must share with the run that wrote its checkpoints.

A checkpoint's `meta` item records the train config, the data files (names and record counts,
taken when the run first started) and the process count. On resume, `check_resume` compares
them with the new run's: a change of batch size, data, seed, schedule, loss or model would put
the data stream in the wrong place, make the learning rate jump or fail deep in orbax with a
shape error, so it stops the run before anything is written, listing every changed key with
its old and new value. Keys that only steer bookkeeping (`SAFE_TO_CHANGE`) may differ, and each
such change is logged (a smaller `keep_checkpoints` as a warning: the next save deletes the
older checkpoints beyond the new count); any other key may be allowed explicitly (train's
`--resume_allow_changes=key1,key2`).
"""
from __future__ import annotations

import json
from typing import Iterable, Sequence

from absl import logging

# Config keys (or key prefixes) that do not change the data stream, the schedule or the model.
SAFE_TO_CHANGE = ("stop_at_step", "checkpoint_every", "keep_checkpoints", "log_every",
                  "preemption_check_every", "knn", "init_from", "preset", "lease",
                  # the attention kernel: same math and the same parameter tree, any kind
                  "model.attention", "model.attention_pad_to")
# Names of the non-config parts of a run's identity, usable in --resume_allow_changes.
DATA_FILES = "data.files"          # the shards' names and record counts
PROCESS_COUNT = "process_count"    # hosts: each reads its own slice of the files

META_TRAIN_CONFIG = "train_config"
META_DATA_FILES = "data_files"
META_PROCESS_COUNT = "process_count"


class ResumeMismatch(ValueError):
    """The run in the workdir was started with other settings than this one."""


def run_identity(config_json: str, fingerprint: list, process_count: int) -> dict:
    """The meta entries that a resume is checked against."""
    return {META_TRAIN_CONFIG: config_json, META_DATA_FILES: fingerprint,
            META_PROCESS_COUNT: int(process_count)}


def parse_allowed(text: str | Sequence[str] | None) -> tuple[str, ...]:
    """`"a,b"` or `["a", "b"]` -> ("a", "b"); empty entries dropped."""
    if not text:
        return ()
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(item.strip() for item in items if item.strip())


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _covered(key: str, names: Iterable[str]) -> bool:
    """`key` is one of `names` or lies under one of them (`model` covers `model.depth`)."""
    return any(key == name or key.startswith(name + ".") for name in names)


def _missing(value) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def _change(key: str, old, new) -> str:
    """One line of a mismatch; a key only one side has says which (a config layout change)."""
    note = (" (not a key of this version's config)" if new is _ABSENT else
            " (the checkpoint's config has no such key)" if old is _ABSENT else "")
    return f"{key}: {_missing(old)} -> {_missing(new)}{note}"


def _all_changes(saved_json: str, new_json: str) -> list[tuple[str, object, object]]:
    old = _flatten(json.loads(saved_json))
    new = _flatten(json.loads(new_json))
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b:
            changes.append((key, a, b))
    return changes


def config_changes(saved_json: str, new_json: str) -> list[tuple[str, object, object]]:
    """(key, old, new) for every leaf that differs (a key only one side has included), except
    `SAFE_TO_CHANGE`."""
    return [c for c in _all_changes(saved_json, new_json) if not _covered(c[0], SAFE_TO_CHANGE)]


def bookkeeping_changes(saved_json: str, new_json: str) -> list[tuple[str, object, object]]:
    """(key, old, new) for every `SAFE_TO_CHANGE` leaf that differs: allowed, but logged."""
    return [c for c in _all_changes(saved_json, new_json) if _covered(c[0], SAFE_TO_CHANGE)]


def _log_bookkeeping_changes(saved_json: str, new_json: str) -> None:
    """Says what each allowed change does; a smaller `keep_checkpoints` deletes checkpoints the
    old run kept, so it is a warning that says how many survive."""
    for key, old, new in bookkeeping_changes(saved_json, new_json):
        if key == "keep_checkpoints" and isinstance(new, int) and new >= 1 and (
                not isinstance(old, int) or old < 0 or new < old):
            logging.warning("resuming with keep_checkpoints %s -> %s: the next save deletes all "
                            "but the newest %d finished checkpoint(s) in the workdir",
                            _missing(old), _missing(new), new)
        else:
            logging.info("resuming with %s %s -> %s (does not change the data stream, the "
                         "schedule or the model)", key, _missing(old), _missing(new))


def _describe_files(old: list, new: list) -> str:
    old_map, new_map = dict(map(tuple, old)), dict(map(tuple, new))
    parts = []
    added = sorted(set(new_map) - set(old_map))
    removed = sorted(set(old_map) - set(new_map))
    recounted = sorted(n for n in set(old_map) & set(new_map) if old_map[n] != new_map[n])
    for label, names in (("added", added), ("removed", removed)):
        if names:
            shown = ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
            parts.append(f"{len(names)} shard(s) {label}: {shown}")
    for name in recounted[:5]:
        parts.append(f"{name}: {old_map[name]} -> {new_map[name]} records")
    return "; ".join(parts)


def check_resume(saved_meta: dict, config_json: str, fingerprint: list, process_count: int,
                 allowed: Sequence[str] = (), where: str = "the checkpoint") -> None:
    """Raises ResumeMismatch listing each difference between the saved run and this one that
    `allowed` does not cover, and when the saved meta lacks an entry of `run_identity` (a
    checkpoint of another layout: there is nothing to compare against)."""
    lacking = [k for k in (META_TRAIN_CONFIG, META_DATA_FILES, META_PROCESS_COUNT)
               if k not in saved_meta]
    if lacking:
        raise ResumeMismatch(
            f"{where} records no {', '.join(lacking)} in its meta (it has: "
            f"{', '.join(sorted(saved_meta)) or 'nothing'}): it was written by another layout "
            "of train, so this run cannot be checked against it. Resume it with the version "
            "that wrote it, or start a new --workdir (--config.init_from can take its weights)")
    problems = []
    _log_bookkeeping_changes(saved_meta[META_TRAIN_CONFIG], config_json)
    for key, old, new in config_changes(saved_meta[META_TRAIN_CONFIG], config_json):
        if not _covered(key, allowed):
            problems.append(_change(key, old, new))
    saved_files = saved_meta[META_DATA_FILES]
    if [list(x) for x in saved_files] != [list(x) for x in fingerprint]:
        if not _covered(DATA_FILES, allowed):
            problems.append(f"{DATA_FILES} (the shards data.train_files matches): "
                            f"{_describe_files(saved_files, fingerprint)}")
    saved_count = saved_meta[META_PROCESS_COUNT]
    if int(saved_count) != int(process_count):
        if not _covered(PROCESS_COUNT, allowed):
            problems.append(f"{PROCESS_COUNT} (hosts, each reading its own files): "
                            f"{saved_count} -> {process_count}")
    if problems:
        names = ",".join(p.split(":", 1)[0].split(" ", 1)[0] for p in problems)
        raise ResumeMismatch(
            f"this run differs from the one that wrote {where}; resuming would change the data "
            "stream, the schedule or the model:\n  " + "\n  ".join(problems) +
            f"\nUse the original settings, or a new --workdir, or accept the changes with "
            f"--resume_allow_changes={names}")
