"""Files on local disks and on any tf.io.gfile filesystem (gs://, ram://, ...), written atomically.

Jobs write their outputs through these helpers so that the same code serves a laptop directory
and a bucket that every host of a TPU pod writes to. A file is written under a temporary name
unique to this process and this write (`temp_name`: `path.<host>-<pid>-<random>.tmp`, in the same
directory) and renamed onto its final name when complete, so a reader, a resumed run or another
host sees either no file or the whole file, never part of one, and two hosts writing the same
file never touch each other's temporary file. On local disks the data is flushed to the disk
(fsync) before the rename and the directory after it, so a host crash cannot leave an empty or
partial file under a final name; the rename is atomic. On GCS a rename is a copy then a delete,
which still creates the final object in one step. A failed write removes its temporary file.
Readers of a directory skip names ending in `TMP_SUFFIX`; a process killed mid-write (kill -9,
host crash) leaves its temporary file behind, which no reader matches and which the writer of
that file removes when it runs again (`remove_stale_temp_files`).

TensorFlow is imported on first use, not at import time: modules that only write local PNGs
(the contact sheet, reports) stay cheap to import, and importing this module never puts TF's
LLVM ahead of triton's (see `generate.py`). Where TensorFlow is not installed, local paths go
through `os` instead (same atomic writes); URLs then raise ModuleNotFoundError.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
from collections.abc import Iterator, Sequence

TMP_SUFFIX = ".tmp"
LOCAL_FILE_MODE = 0o644      # outputs are for people and other jobs, whatever the umask


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (gs://, ram://, s3://), which only tf.io.gfile can open."""
    return "://" in path


class _LocalFiles:
    """The part of tf.io.gfile this module uses, on local paths only: what `_gfile` gives where
    TensorFlow is not installed (the accelerator image has none), so that local outputs need
    no TensorFlow. A URL there is an error that says what is missing."""

    @staticmethod
    def _local(path: str) -> str:
        if is_url(path):
            raise ModuleNotFoundError(f"{path}: URLs are opened through tf.io.gfile, and "
                                      "TensorFlow is not installed (pip install tensorflow-cpu)",
                                      name="tensorflow")
        return path

    @classmethod
    def exists(cls, path):
        return os.path.exists(cls._local(path))

    @classmethod
    def isdir(cls, path):
        return os.path.isdir(cls._local(path))

    @classmethod
    def stat(cls, path):
        class Stat:
            is_directory = os.path.isdir(cls._local(path))
        os.stat(path)                       # FileNotFoundError when missing
        return Stat

    @classmethod
    def makedirs(cls, path):
        os.makedirs(cls._local(path), exist_ok=True)

    @classmethod
    def remove(cls, path):
        os.remove(cls._local(path))

    @classmethod
    def listdir(cls, path):
        return os.listdir(cls._local(path))

    @classmethod
    def rename(cls, src, dst, overwrite=False):
        if not overwrite and os.path.exists(cls._local(dst)):
            raise FileExistsError(f"{dst}: exists")
        os.replace(cls._local(src), dst)

    @classmethod
    def GFile(cls, path, mode="r"):  # noqa: N802  (tf.io.gfile's name)
        return open(cls._local(path), mode)


def _tensorflow():
    """TensorFlow, or None where it is not installed."""
    try:
        import tensorflow as tf
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        return None
    return tf


def _gfile():
    """tf.io.gfile, imported on first use (see the module docstring for why not at import);
    local files only (`_LocalFiles`) where TensorFlow is not installed."""
    tf = _tensorflow()
    return _LocalFiles if tf is None else tf.io.gfile


def _not_found():
    tf = _tensorflow()
    return FileNotFoundError if tf is None else tf.errors.NotFoundError


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


def remove_if_present(path: str) -> None:
    """Deletes the file at `path`; nothing happens when there is none."""
    try:
        _gfile().remove(path)
    except _not_found():
        pass


def temp_name(path: str) -> str:
    """A temporary name for writing `path`, unique to this host, process and call, in the same
    directory and ending in `TMP_SUFFIX` (so readers that skip that suffix skip it)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32].strip("-") or "host"
    return f"{path}.{host}-{os.getpid()}-{secrets.token_hex(6)}{TMP_SUFFIX}"


_TEMP_TAG = re.compile(r"\.[A-Za-z0-9-]+-\d+-[0-9a-f]{12}$")    # what temp_name appends


def final_name_of(temp: str) -> str | None:
    """The final name a temporary file was written for (`temp_name`'s, or older versions'
    NAME.tmp); None for a name that is not a temporary file."""
    if not temp.endswith(TMP_SUFFIX):
        return None
    base = temp[:-len(TMP_SUFFIX)]
    tag = _TEMP_TAG.search(base)
    return base[:tag.start()] if tag else base


def remove_stale_temp_files(directory: str, names: Sequence[str]) -> list[str]:
    """Removes the temporary files in `directory` written for the final file names `names`
    by runs that were killed mid-write; returns the removed names.

    A rerun never reuses a dead run's temporary name, so without this every kill during a
    write would leave a partial file for good. Only pass names that no other live process
    writes (e.g. this host's own shards, or process 0's outputs)."""
    if not exists(directory):
        return []
    wanted = set(names)
    stale = sorted(n for n in _gfile().listdir(directory) if final_name_of(n) in wanted)
    for name in stale:
        remove_if_present(os.path.join(directory, name))
    return stale


def _fsync(path: str) -> None:
    """Flushes a local file's (or directory's) data and metadata to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path: str) -> None:
    """Makes a rename in `path` survive a crash; filesystems that cannot sync a directory
    (some FUSE mounts say EINVAL) keep the rename unsynced rather than failing the write."""
    try:
        _fsync(path)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary name (`temp_name`) to write `path` under; when the block succeeds,
    syncs it to the disk (local files) and renames it onto `path` (replacing an older file);
    when the block or the rename fails, removes it.

    For writers that stream to a file name themselves (e.g. tf.io.TFRecordWriter): they must
    have closed the file when the block ends.
    """
    tmp = temp_name(path)
    try:
        yield tmp
        if not is_url(path):
            os.chmod(tmp, LOCAL_FILE_MODE)
            _fsync(tmp)
        _gfile().rename(tmp, path, overwrite=True)
    except BaseException:
        remove_if_present(tmp)
        raise
    if not is_url(path):
        _fsync_directory(os.path.dirname(os.path.abspath(path)))


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
