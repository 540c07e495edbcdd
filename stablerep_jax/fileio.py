"""Files on local disks and on any tf.io.gfile filesystem (gs://, ram://, ...), written atomically.

Jobs write their outputs through these helpers so that the same code serves a laptop directory
and a bucket that every host of a TPU pod writes to. A file is written under a temporary name
(`path + TMP_SUFFIX`, in the same directory) and renamed onto its final name when complete, so a
reader, a resumed run or another host sees either no file or the whole file, never part of one:
on local disks the rename is atomic; on GCS it is a copy then a delete, which still creates the
final object in one step. A failed write removes its temporary file. Readers of a directory skip
names ending in `TMP_SUFFIX`; a rerun overwrites a temporary file a killed run left behind.

TensorFlow is imported on first use, not at import time: modules that only write local PNGs
(the contact sheet, reports) stay cheap to import, and importing this module never puts TF's
LLVM ahead of triton's (see `generate.py`).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

TMP_SUFFIX = ".tmp"
LOCAL_FILE_MODE = 0o644      # outputs are for people and other jobs, whatever the umask


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (gs://, ram://, s3://), which only tf.io.gfile can open."""
    return "://" in path


def _gfile():
    """tf.io.gfile, imported on first use (see the module docstring for why not at import)."""
    import tensorflow as tf
    return tf.io.gfile


def _not_found():
    import tensorflow as tf
    return tf.errors.NotFoundError


def exists(path: str) -> bool:
    """Whether a file or directory exists at `path` (local or URL)."""
    return _gfile().exists(path)


def isfile(path: str) -> bool:
    """Whether `path` exists and is not a directory (one stat; no listing on buckets)."""
    try:
        return not _gfile().stat(path).is_directory
    except _not_found():
        return False


def makedirs(path: str) -> None:
    """Creates `path` and its parents if missing (on buckets: directory markers, if any)."""
    _gfile().makedirs(path)


def _remove_if_present(path: str) -> None:
    try:
        _gfile().remove(path)
    except _not_found():
        pass


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields the temporary name to write `path` under; renames it onto `path` (replacing an
    older file) when the block succeeds and removes it when the block or the rename fails.

    For writers that stream to a file name themselves (e.g. tf.io.TFRecordWriter).
    """
    tmp = path + TMP_SUFFIX
    try:
        yield tmp
        if not is_url(path):
            os.chmod(tmp, LOCAL_FILE_MODE)
        _gfile().rename(tmp, path, overwrite=True)
    except BaseException:
        _remove_if_present(tmp)
        raise


def write_bytes_atomic(path: str, data: bytes) -> str:
    """Writes `data` to `path` atomically, creating its directory if needed. Returns `path`."""
    directory = os.path.dirname(path)
    if directory:
        makedirs(directory)
    with atomic_path(path) as tmp:
        with _gfile().GFile(tmp, "wb") as f:
            f.write(data)
    return path


def write_text_atomic(path: str, text: str) -> str:
    """Writes UTF-8 `text` to `path` atomically. Returns `path`."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj) -> str:
    """Writes `obj` as indented, key-sorted JSON to `path` atomically. Returns `path`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_bytes(path: str) -> bytes:
    """The contents of the file at `path` (local or URL); a missing file raises
    FileNotFoundError and a directory IsADirectoryError, each naming the path."""
    gfile = _gfile()
    try:
        if gfile.isdir(path):
            raise IsADirectoryError(f"{path}: is a directory, not a file")
        with gfile.GFile(path, "rb") as f:
            return f.read()
    except _not_found() as e:
        raise FileNotFoundError(f"{path}: no such file") from e


def read_json(path: str):
    """The parsed JSON file at `path`; a missing file or bad JSON raises an error naming it."""
    data = read_bytes(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
