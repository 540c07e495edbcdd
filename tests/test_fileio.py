"""fileio: atomic writes and JSON reads on local paths and on tf.io.gfile URLs.

TensorFlow's in-memory `ram://` filesystem goes through the same tf.io.gfile code path as
`gs://`, so every behaviour is pinned on both a local directory and a ram:// one.
"""
import os

import pytest
import tensorflow as tf

from stablerep_jax import fileio
from stablerep_jax.data import records


@pytest.fixture(params=["local", "ram"])
def directory(request, tmp_path):
    """An output directory that does not exist yet: a local one or a ram:// one."""
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("ram_dir")


def _names(directory):
    return sorted(tf.io.gfile.listdir(directory))


def test_written_files_read_back_and_replace_older_ones(directory):
    path = os.path.join(directory, "sub", "a.json")          # parent directories are created
    fileio.write_json_atomic(path, {"b": [1, 2], "a": "x"})
    assert fileio.read_json(path) == {"a": "x", "b": [1, 2]}
    fileio.write_json_atomic(path, {"a": "y"})
    assert fileio.read_json(path) == {"a": "y"}
    fileio.write_text_atomic(os.path.join(directory, "t.txt"), "caf\u00e9\n")
    with tf.io.gfile.GFile(os.path.join(directory, "t.txt"), "rb") as f:
        assert f.read() == "caf\u00e9\n".encode("utf-8")
    assert _names(directory) == ["sub", "t.txt"]
    assert _names(os.path.join(directory, "sub")) == ["a.json"]


def test_exists_and_isfile_tell_files_from_directories(directory):
    path = os.path.join(directory, "f.bin")
    assert not fileio.exists(path) and not fileio.isfile(path)
    fileio.write_bytes_atomic(path, b"\x00\x01")
    assert fileio.exists(path) and fileio.isfile(path)
    fileio.makedirs(os.path.join(directory, "d"))
    fileio.makedirs(os.path.join(directory, "d"))                # twice is fine
    assert fileio.exists(os.path.join(directory, "d"))
    assert not fileio.isfile(os.path.join(directory, "d"))


def test_a_failed_write_leaves_no_temporary_file_and_keeps_the_old_one(directory):
    path = os.path.join(directory, "f.txt")
    fileio.write_text_atomic(path, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with fileio.atomic_path(path) as tmp:
            with tf.io.gfile.GFile(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("killed mid-write")
    assert _names(directory) == ["f.txt"]
    with tf.io.gfile.GFile(path) as f:
        assert f.read() == "old"


def test_a_failed_shard_write_leaves_neither_shard_nor_temporary_file(directory):
    def failing():
        yield records.CaptionRecord("a cat", 0, [b"img"], [0])
        raise RuntimeError("killed mid-shard")

    fileio.makedirs(directory)
    path = os.path.join(directory, "train-00000-of-00001.tfrecord")
    with pytest.raises(RuntimeError, match="mid-shard"):
        records.write_shard(path, failing())
    assert _names(directory) == []
    assert records.write_shard(path, [records.CaptionRecord("a cat", 0, [b"img"], [0])]) == 1
    assert [r.caption for r in records.read_records(path)] == ["a cat"]
    assert _names(directory) == ["train-00000-of-00001.tfrecord"]


def test_read_json_names_the_file_it_cannot_read(directory):
    missing = os.path.join(directory, "none.json")
    with pytest.raises(FileNotFoundError, match="none.json: no such file"):
        fileio.read_json(missing)
    bad = os.path.join(directory, "bad.json")
    fileio.write_text_atomic(bad, "{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        fileio.read_json(bad)


def test_captions_files_are_read_from_urls_too(directory):
    """generate's captions may sit in the same bucket as its output; errors still name the file."""
    from stablerep_jax.generation import captions as captions_lib
    path = os.path.join(directory, "captions.txt")
    fileio.write_text_atomic(path, "a red cat\n\na blue dog\n")
    got = captions_lib.read_captions(path)
    assert got.texts == ("a red cat", "a blue dog") and got.blank_skipped == 1
    with pytest.raises(FileNotFoundError, match="none.txt' does not exist"):
        captions_lib.read_captions(os.path.join(directory, "none.txt"))
    fileio.makedirs(os.path.join(directory, "dir.txt"))
    with pytest.raises(IsADirectoryError, match="dir.txt' is a directory"):
        captions_lib.read_captions(os.path.join(directory, "dir.txt"))


def test_local_files_are_world_readable_whatever_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        path = fileio.write_bytes_atomic(str(tmp_path / "sheet.png"), b"png")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == fileio.LOCAL_FILE_MODE == 0o644


def test_temporary_names_are_unique_per_write_and_skipped_by_readers(tmp_path):
    path = str(tmp_path / "train-00000-of-00001.tfrecord")
    names = {fileio.temp_name(path) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith(path + ".") and name.endswith(fileio.TMP_SUFFIX)
        assert f"-{os.getpid()}-" in name and os.path.dirname(name) == str(tmp_path)
    assert records.TMP_SUFFIX == fileio.TMP_SUFFIX           # what shard readers filter on


def test_a_concurrent_writers_failure_leaves_the_other_writers_file_alone(directory):
    """Two hosts writing the same file (a pod where every host runs the job): one fails, the
    other still completes its write."""
    path = os.path.join(directory, "manifest.json")
    fileio.makedirs(directory)
    with fileio.atomic_path(path) as survivor:
        with tf.io.gfile.GFile(survivor, "w") as f:
            f.write("whole")
        with pytest.raises(RuntimeError, match="host 1 died"):
            with fileio.atomic_path(path) as failing:
                assert failing != survivor
                with tf.io.gfile.GFile(failing, "w") as f:
                    f.write("ha")
                raise RuntimeError("host 1 died")
        assert tf.io.gfile.exists(survivor)
    assert _names(directory) == ["manifest.json"]
    with tf.io.gfile.GFile(path) as f:
        assert f.read() == "whole"


def test_local_files_reach_the_disk_before_their_final_name(tmp_path, monkeypatch):
    """fsync of the whole temporary file happens before the rename, so a host crash never
    leaves an empty or partial file under the final name; then the directory is synced."""
    path = str(tmp_path / "summary.json")
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((target, os.path.isfile(target) and os.path.getsize(target),
                       os.path.exists(path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    fileio.write_bytes_atomic(path, b"x" * 1000)
    assert len(synced) == 2
    (tmp_name, size, final_existed), (directory, _, _) = synced
    assert tmp_name.endswith(fileio.TMP_SUFFIX) and size == 1000 and not final_existed
    assert directory == str(tmp_path)


def test_stale_temporary_files_of_given_names_are_removed(directory):
    """A killed writer's temporary file is never reused by the rerun (names are unique), so
    the rerun removes the ones for the files it writes, and nothing else."""
    fileio.makedirs(directory)
    shard = os.path.join(directory, "train-00001-of-00002.tfrecord")
    other = os.path.join(directory, "train-00000-of-00002.tfrecord")
    dead = [fileio.temp_name(shard), shard + fileio.TMP_SUFFIX]       # today's and older names
    alive = [fileio.temp_name(other), os.path.join(directory, "train.tmp")]
    for path in dead + alive + [shard]:
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(b"partial")
    assert [fileio.final_name_of(os.path.basename(p)) for p in dead + alive] == [
        os.path.basename(shard)] * 2 + [os.path.basename(other), "train"]
    assert fileio.final_name_of("train-00000-of-00002.tfrecord") is None
    removed = fileio.remove_stale_temp_files(directory, [os.path.basename(shard)])
    assert removed == sorted(os.path.basename(p) for p in dead)
    assert _names(directory) == sorted(os.path.basename(p) for p in alive + [shard])
    assert fileio.remove_stale_temp_files(os.path.join(directory, "none"), ["x"]) == []


def test_a_directory_that_cannot_be_synced_does_not_fail_the_write(tmp_path, monkeypatch):
    """Some FUSE mounts (gcsfuse) answer EINVAL to fsync on a directory: the file is still
    synced before its rename, and the write succeeds."""
    import errno
    real_fsync = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(errno.EINVAL, "Invalid argument")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = fileio.write_text_atomic(str(tmp_path / "a.txt"), "kept")
    assert open(path).read() == "kept"
