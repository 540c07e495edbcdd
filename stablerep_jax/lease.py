"""A trainer's lease on its workdir: one trainer writes a workdir at a time.

Two trainers on one workdir (a VM thought dead after a recovery, a command started twice) both
append every metrics row and both write checkpoints until orbax fails. So `train` holds a lease,
WORKDIR/lease.json (written through `fileio`: local disks and gs:// alike):

  {"host": ..., "pid": ..., "started": <unix time>, "heartbeat": <unix time>, "token": ...}

  acquire   a trainer takes the lease when there is none, when its heartbeat is older than
            `timeout_s`, or when its holder is a process of this host that no longer runs
            (a kill left the file); otherwise it refuses (`LeaseHeld`), naming the holder.
  heartbeat a daemon thread rewrites the heartbeat every `heartbeat_s` while the lease is still
            this trainer's (it stops once another trainer has taken it over).
  check     before each checkpoint: a lease now held by another trainer (ours was stale and
            was taken over) stops this one (`LeaseLost`, naming the new holder) before it saves.
  release   the holder removes the file when it ends (finished, preempted or failed).

The file has no compare-and-swap through gfile, so two trainers starting within the same moment
can both believe they hold it; the one whose record was overwritten stops at its first
checkpoint. Heartbeats are wall-clock times of the holder's host: hosts' clocks must agree to
well within `timeout_s` (NTP does).
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from typing import Callable, Iterator, Optional

import jax
from absl import logging

from stablerep_jax import fileio, parallel

LEASE_NAME = "lease.json"


class LeaseHeld(RuntimeError):
    """Another trainer holds the workdir's lease and its heartbeat is recent."""


class LeaseLost(RuntimeError):
    """This trainer's lease was taken over by another trainer: it must stop writing."""


def lease_path(workdir: str) -> str:
    return os.path.join(workdir, LEASE_NAME)


def read_lease(workdir: str) -> Optional[dict]:
    """The lease record in `workdir`, or None when there is none (or it cannot be parsed: a
    file cut short is nobody's lease)."""
    try:
        record = fileio.read_json(lease_path(workdir))
    except FileNotFoundError:
        return None
    except ValueError:
        logging.warning("%s cannot be read as a lease: ignored", lease_path(workdir))
        return None
    return record if isinstance(record, dict) and "token" in record else None


def describe(record: dict, now: float) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.get("started", 0)))
    age = now - float(record.get("heartbeat", 0))
    return (f"host {record.get('host')!r}, pid {record.get('pid')} (started {started}, last "
            f"heartbeat {age:.0f} s ago)")


def _process_gone(record: dict) -> bool:
    """True when the holder ran on this host and its process no longer exists."""
    if record.get("host") != socket.gethostname():
        return False
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False                # exists (another user's), or cannot tell
    return False


def check_settings(timeout_s: float, heartbeat_s: float) -> None:
    """The config's `lease.timeout_s` and `lease.heartbeat_s`: a ValueError naming them."""
    if not heartbeat_s > 0 or not timeout_s >= 2 * heartbeat_s:
        raise ValueError(f"lease.timeout_s={timeout_s}, lease.heartbeat_s={heartbeat_s}: need "
                         "heartbeat_s > 0 and timeout_s >= 2 x heartbeat_s (a live trainer's "
                         "heartbeat must never look stale)")


class Lease:
    """This trainer's lease on `workdir` (see the module docstring). Use as a context manager:
    acquired on entry, released on exit."""

    def __init__(self, workdir: str, timeout_s: float, heartbeat_s: float,
                 clock: Callable[[], float] = time.time):
        check_settings(timeout_s, heartbeat_s)
        self.workdir = workdir
        self.timeout_s, self.heartbeat_s = float(timeout_s), float(heartbeat_s)
        self.clock = clock
        self.record: Optional[dict] = None
        self.lost_to: Optional[dict] = None      # set by the heartbeat thread when taken over
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    # -- acquire / release

    def acquire(self) -> "Lease":
        now = self.clock()
        current = read_lease(self.workdir)
        if current is not None:
            age = now - float(current.get("heartbeat", 0))
            if _process_gone(current):
                logging.warning("taking over the lease on %s from %s: that process no longer "
                                "runs", self.workdir, describe(current, now))
            elif age <= self.timeout_s:
                raise LeaseHeld(
                    f"{self.workdir} is in use by another trainer: {describe(current, now)}. "
                    f"Two trainers on one workdir write every metrics row twice and break each "
                    f"other's checkpoints; this one stops before writing anything. If that "
                    f"trainer is gone, rerun once its heartbeat is older than "
                    f"lease.timeout_s={self.timeout_s:g} s, or remove {lease_path(self.workdir)}")
            else:
                logging.warning("taking over the lease on %s from %s: its heartbeat is older "
                                "than lease.timeout_s=%g s; that trainer stops at its next "
                                "checkpoint", self.workdir, describe(current, now),
                                self.timeout_s)
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
                       "heartbeat": now, "token": secrets.token_hex(8)}
        fileio.makedirs(self.workdir)
        fileio.write_json_atomic(lease_path(self.workdir), self.record)
        try:
            self.check()             # another trainer that wrote at the same moment wins
        except LeaseLost as e:
            raise LeaseHeld(f"{self.workdir} is in use by another trainer that started at the "
                            f"same moment ({e}); this one stops before writing anything") from e
        self._thread = threading.Thread(target=self._beat, name="workdir-lease-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stops the heartbeat and removes the lease file if it is still this trainer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.record is None:
            return
        with self._lock:
            current = read_lease(self.workdir)
            if current is not None and current.get("token") == self.record["token"]:
                fileio.remove_if_present(lease_path(self.workdir))
        self.record = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        try:
            self.release()
        except Exception as e:      # never hide the error the job is leaving with
            logging.warning("could not release the lease on %s: %s", self.workdir, e)
        return False

    # -- while held

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except Exception as e:   # a failed write (network) is retried at the next beat
                logging.warning("lease heartbeat on %s failed: %s", self.workdir, e)
            if self.lost_to is not None:
                return

    def _taken_over(self) -> Optional[dict]:
        """The record of the trainer that took the lease over, or None while it is ours (a
        lease file someone removed is written again: nobody else holds it). Under the lock."""
        current = read_lease(self.workdir)
        if current is None:
            logging.warning("%s was removed while this trainer held it: writing it again",
                            lease_path(self.workdir))
            fileio.write_json_atomic(lease_path(self.workdir), self.record)
            return None
        return None if current.get("token") == self.record["token"] else current

    def heartbeat(self) -> None:
        """Rewrites the heartbeat if the lease is still this trainer's; otherwise records who
        took it over (`lost_to`) and writes nothing."""
        with self._lock:
            if self.record is None or self.lost_to is not None:
                return
            other = self._taken_over()
            if other is not None:
                self.lost_to = other
                logging.warning("the lease on %s was taken over by %s; this trainer stops at "
                                "its next checkpoint", self.workdir, describe(other, self.clock()))
                return
            self.record = dict(self.record, heartbeat=self.clock())
            fileio.write_json_atomic(lease_path(self.workdir), self.record)

    def check(self) -> None:
        """Raises `LeaseLost`, naming the new holder, unless the lease is still this trainer's."""
        with self._lock:
            other = self.lost_to if self.lost_to is not None else self._taken_over()
            if other is None:
                return
            self.lost_to = other
        self._stop.set()
        raise LeaseLost(f"{self.workdir} was taken over by another trainer: "
                        f"{describe(other, self.clock())}; this trainer stops without saving, so "
                        "that only one trainer writes the workdir")


@contextlib.contextmanager
def hold(workdir: str, timeout_s: float, heartbeat_s: float) -> Iterator[Callable[[], None]]:
    """Holds the lease on `workdir` for a job of one or more processes (process 0 holds it;
    every process stops together when it cannot be had or is lost). Yields `check()`, to call
    on every process before each checkpoint: it raises on every process once the lease was
    taken over (`LeaseLost` on process 0, which names the new holder)."""
    lease = Lease(workdir, timeout_s, heartbeat_s) if jax.process_index() == 0 else None
    try:
        parallel.run_together(lambda: lease.acquire() if lease is not None else None,
                              "the workdir lease")
    except BaseException:         # e.g. SIGTERM during start-up: leave no lease behind
        if lease is not None:
            lease.__exit__(None, None, None)
        raise
    try:
        yield lambda: parallel.run_together(lambda: lease.check() if lease is not None else None,
                                            "the workdir lease")
    finally:
        if lease is not None:
            lease.__exit__(None, None, None)
