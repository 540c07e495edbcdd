"""The trainer's lease on its workdir (issue 22 item 7): two trainers on one workdir (a VM thought
dead after a recovery) both wrote every metrics row and broke each other's checkpoints. A second
trainer now refuses and names the holder; a lease whose heartbeat is stale is taken over and the
old holder stops at its next checkpoint, naming the new one."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from stablerep_jax import checkpoint, lease, train
from stablerep_jax.data import pipeline


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_holder(workdir, host="other-vm", pid=4242, heartbeat_age=0.0, token="theirs"):
    now = time.time()
    record = {"host": host, "pid": pid, "started": now - 3600, "heartbeat": now - heartbeat_age,
              "token": token}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, lease.LEASE_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f)
    return record


def _holder(workdir):
    return lease.read_lease(str(workdir))


class FakeClock:
    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now


def test_a_second_trainer_is_refused_and_the_holder_named(tmp_path):
    theirs = _write_holder(tmp_path, heartbeat_age=20)
    with pytest.raises(lease.LeaseHeld, match=r"in use by another trainer: host 'other-vm', pid "
                                              r"4242 \(started .*, last heartbeat 20 s ago\).*"
                                              r"lease.timeout_s=300"):
        lease.Lease(str(tmp_path), timeout_s=300, heartbeat_s=30).acquire()
    assert _holder(tmp_path) == theirs                       # untouched

    # Two trainers of this host: the live one (this process) keeps it.
    mine = lease.Lease(str(tmp_path / "here"), timeout_s=300, heartbeat_s=30).acquire()
    try:
        with pytest.raises(lease.LeaseHeld, match=rf"host '{socket.gethostname()}', pid "
                                                  rf"{os.getpid()}"):
            lease.Lease(str(tmp_path / "here"), timeout_s=300, heartbeat_s=30).acquire()
    finally:
        mine.release()
    assert not (tmp_path / "here" / lease.LEASE_NAME).exists()      # released


def test_a_stale_lease_is_taken_over_and_the_old_holder_stops_naming_the_new_one(tmp_path):
    clock = FakeClock()
    old = lease.Lease(str(tmp_path), timeout_s=10, heartbeat_s=5, clock=clock).acquire()
    old.check()                                              # held: no error
    clock.now += 11                                          # its heartbeat is now 11 s old
    new = lease.Lease(str(tmp_path), timeout_s=10, heartbeat_s=5, clock=clock).acquire()
    assert _holder(tmp_path)["token"] == new.record["token"]
    with pytest.raises(lease.LeaseLost, match=rf"taken over by another trainer: host "
                                              rf"'{socket.gethostname()}', pid {os.getpid()}.*"
                                              r"stops without saving"):
        old.check()
    old.heartbeat()                                          # the old holder writes nothing now
    assert _holder(tmp_path)["token"] == new.record["token"]
    old.release()                                            # and removes nothing
    assert _holder(tmp_path)["token"] == new.record["token"]
    new.release()
    assert _holder(tmp_path) is None


def test_the_heartbeat_keeps_a_live_lease_fresh_and_notices_a_takeover(tmp_path):
    # timeout_s is 100 beats: a busy CI machine stalling the thread must not make it look stale.
    held = lease.Lease(str(tmp_path), timeout_s=5.0, heartbeat_s=0.05).acquire()
    try:
        first = _holder(tmp_path)["heartbeat"]
        deadline = time.monotonic() + 30
        while _holder(tmp_path)["heartbeat"] == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _holder(tmp_path)["heartbeat"] > first        # rewritten by the thread
        with pytest.raises(lease.LeaseHeld):                 # fresh: refused
            lease.Lease(str(tmp_path), timeout_s=5.0, heartbeat_s=0.05).acquire()
        # Someone takes it over. The file has no compare-and-swap (the module docstring): a beat
        # between its read and its write would overwrite a record written in that moment, so the
        # takeover is written between two beats, under the lease's lock, as a real one lands
        # almost always; the thread must then read it and stop writing.
        with held._lock:
            theirs = _write_holder(tmp_path, host="new-vm", pid=7)
        deadline = time.monotonic() + 30
        while held.lost_to is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)                                      # a few more beats' time
        assert _holder(tmp_path) == theirs                   # the thread did not overwrite it
        assert held.lost_to == theirs
        with pytest.raises(lease.LeaseLost, match="host 'new-vm', pid 7"):
            held.check()
    finally:
        held.release()
    assert _holder(tmp_path) == theirs


def test_a_lease_left_by_a_dead_process_of_this_host_is_taken_at_once(tmp_path):
    """A kill (SIGKILL, OOM) leaves the file; a rerun on the same host need not wait out the
    timeout when that process is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_holder(tmp_path, host=socket.gethostname(), pid=dead.pid)
    held = lease.Lease(str(tmp_path), timeout_s=300, heartbeat_s=30).acquire()
    assert _holder(tmp_path)["pid"] == os.getpid()
    held.release()
    # A removed lease file is written again by its holder (nobody else holds it).
    held = lease.Lease(str(tmp_path), timeout_s=300, heartbeat_s=30).acquire()
    os.remove(tmp_path / lease.LEASE_NAME)
    held.check()
    assert _holder(tmp_path)["token"] == held.record["token"]
    held.release()


def test_the_lease_goes_through_fileio_on_a_url(ram_dir):
    """ram:// stands in for gs://: the lease is read, written and removed through tf.io.gfile."""
    held = lease.Lease(ram_dir, timeout_s=300, heartbeat_s=30).acquire()
    assert lease.read_lease(ram_dir)["token"] == held.record["token"]
    with pytest.raises(lease.LeaseHeld, match=f"{ram_dir} is in use by another trainer"):
        lease.Lease(ram_dir, timeout_s=300, heartbeat_s=30).acquire()
    held.release()
    assert lease.read_lease(ram_dir) is None
    assert not os.path.exists("ram:")


# --------------------------------------------------------------------------------------------
# In train


from test_train import tiny_config as _config, train_files  # noqa: E402,F401  (a fixture)


def test_lease_settings_are_checked_before_anything_is_written(tmp_path):
    config = _config("unused", **{"lease.timeout_s": 10.0, "lease.heartbeat_s": 30.0})
    with pytest.raises(ValueError, match=r"lease.timeout_s=10.0, lease.heartbeat_s=30.0"):
        train.train_and_evaluate(config, str(tmp_path / "work"))
    assert not (tmp_path / "work").exists()


def test_train_refuses_a_workdir_another_trainer_holds(train_files, tmp_path):
    _write_holder(tmp_path, heartbeat_age=5)
    with pytest.raises(lease.LeaseHeld, match="host 'other-vm', pid 4242"):
        train.train_and_evaluate(_config(train_files, total_steps=4), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [lease.LEASE_NAME]    # nothing else written


def test_a_trainer_whose_lease_was_taken_over_stops_at_its_next_checkpoint(
        train_files, tmp_path, monkeypatch):
    """A stale lease (a trainer hung for longer than lease.timeout_s) is taken over; the run
    that held it, when it comes back, stops before its next save and names the new holder,
    leaving the checkpoints and the lease to the new trainer. A finished run releases its
    lease."""
    _write_holder(tmp_path, heartbeat_age=1000)               # stale: taken over
    real = pipeline.make_train_iterator

    def iterator(*args, **kwargs):
        for step, batch in enumerate(real(*args, **kwargs), start=1):
            if step == 3:                                     # meanwhile, another trainer
                _write_holder(tmp_path, host="new-vm", pid=777, token="new")
            yield batch
    monkeypatch.setattr(pipeline, "make_train_iterator", iterator)
    config = _config(train_files, total_steps=8, checkpoint_every=2)
    with pytest.raises(lease.LeaseLost, match=r"taken over by another trainer: host 'new-vm', "
                                              r"pid 777 .*stops without saving"):
        train.train_and_evaluate(config, str(tmp_path))
    assert checkpoint.finished_steps(str(tmp_path)) == [2]     # step 4 was not saved
    assert _holder(tmp_path)["token"] == "new"                 # the new holder's, kept

    monkeypatch.undo()
    os.remove(tmp_path / lease.LEASE_NAME)
    result = train.train_and_evaluate(_config(train_files, total_steps=8, checkpoint_every=2,
                                              stop_at_step=4), str(tmp_path))
    assert result.step == 4 and _holder(tmp_path) is None        # released at the end
