"""Preemption notices (SIGTERM: TPU maintenance, spot reclaim, SLURM's time limit) for long jobs.

`PreemptionWatch` is entered first thing in a job and left last, after its checkpoint manager
has closed, so no SIGTERM ever meets Python's default action (death, exit 143) while the job
runs. What a notice does depends on the phase:

  start-up   (restore, counting records, building the pipeline: minutes on a pod reading gs://)
             one process: `PreemptedAtStartup` is raised at once; the job has nothing new to
             save and exits 75 (`cli.EXIT_RESUME`). Several processes: the notice is kept
             until the first agreement point, so that every host stops together.
  working    (`with watch.working():`) a flag, read by `should_stop` at each unit of work.
  closing    (after `working()`: the last save and the manager's close) logged, never fatal: a
             second notice cannot cut the final checkpoint in half.

Several processes: JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`,
fed by jax.distributed's own SIGTERM notifier; asked at every step, it answers True at one step
agreed by all hosts) owns SIGTERM, so no Python handler is installed. If JAX's preemption
service is off, the hosts all-gather their SIGTERM flags every `every` steps instead (all hosts
run the same steps, so they meet). Jobs whose hosts share no steps pass `agree=False`.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

STARTING, WORKING, CLOSING = "start-up", "working", "closing"


class PreemptedAtStartup(BaseException):
    """SIGTERM arrived before the first unit of work (one process): nothing new to save.

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way (library
    code retrying a read, say) swallows it."""


class PreemptionWatch:
    """Has a preemption notice arrived? Answers the same at the same step on every host, so all
    of them save and stop together (see the module docstring)."""

    def __init__(self, every: int = 1, agree: bool = True):
        """`agree=False`: each process answers for itself (no sync point, no all-gather), for
        jobs whose processes share no steps (import_images: each host its own shards); this
        process's handler then replaces jax.distributed's notifier."""
        self.every = max(1, int(every))
        self.multi_host = jax.process_count() > 1
        self.agree = agree
        self.use_sync_point = (agree and self.multi_host
                               and bool(jax.config.jax_enable_preemption_service))
        self.phase = STARTING
        self.notices = 0
        self._previous = None

    def __enter__(self):
        # With the sync point, jax.distributed's notifier owns SIGTERM: a Python handler would
        # replace it and the other hosts would never hear of the notice.
        if not self.use_sync_point and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.notices += 1
        if self.phase == STARTING and not self.multi_host:
            logging.warning("SIGTERM during start-up, before the first step: stopping now, "
                            "nothing new to save")
            self.phase = CLOSING         # a further notice while stopping is only logged
            raise PreemptedAtStartup()
        if self.phase == CLOSING:
            logging.warning("SIGTERM while the last checkpoint is written: finishing it first")
        elif self.notices > 1:
            logging.warning("SIGTERM again (%d notices): already stopping at the next "
                            "checkpoint", self.notices)
        else:
            logging.warning("SIGTERM received: saving a checkpoint and stopping")

    @contextlib.contextmanager
    def working(self):
        """The phase in which a notice only sets the flag `should_stop` reads; after it, the
        closing phase lasts until the watch is left."""
        self.phase = WORKING
        try:
            yield self
        finally:
            self.phase = CLOSING

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        return False

    @property
    def notified(self) -> bool:
        """Whether this process got a notice (not agreed with other hosts)."""
        return self.notices > 0

    def should_stop(self, step: int) -> bool:
        if self.use_sync_point:
            return multihost_utils.reached_preemption_sync_point(step)
        if not self.multi_host or not self.agree:
            return self.notified
        if step % self.every:
            return False
        flags_all = multihost_utils.process_allgather(np.array(self.notified, np.int32))
        return bool(np.max(flags_all))
