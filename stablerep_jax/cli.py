"""The shared command line of every job: `--config=FILE[:preset]` plus `--config.key=value`.

ml_collections' config flag reports an unknown override key as a bare AttributeError deep in
absl's parser; here every override key is checked against the loaded config first, so a typo
stops the job before it touches data with a message that names the key and its valid siblings.
"""
from __future__ import annotations

import logging as std_logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from stablerep_jax.config_utils import find_key, load_config

_CONFIG_PREFIX = "--config."

# Exit codes every job shares. A job's main returns one of them (or None for 0).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Stopped early on purpose (SIGTERM: preemption, maintenance) after saving its state: run the
# same command again to resume. 75 is EX_TEMPFAIL of sysexits.h ("try again later"); the launch
# scripts rerun a job that exits with it.
EXIT_RESUME = 75
EXIT_INTERRUPTED = 130       # Ctrl-C, as a shell reports SIGINT

# How long a finished or failed job waits for its helper threads (orbax's async saves, tf.data,
# thread pools) before it leaves with os._exit: a thread stuck after an error must never keep
# a process, and the chips it holds, alive for hours.
EXIT_GRACE_SECONDS = 60.0


def _override_keys(argv: Sequence[str]) -> list[str]:
    keys = []
    for arg in argv[1:]:
        if arg.startswith(_CONFIG_PREFIX):
            keys.append(arg[len(_CONFIG_PREFIX):].split("=", 1)[0])
    return keys


def _config_spec(argv: Sequence[str], default: str | None) -> str | None:
    spec = default
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


# Config keys that became the multi-process flags of `define_job_flags`: a stale override names
# the flag to pass instead (generate and import_images took their hosts from these keys).
MOVED_TO_FLAGS = {"process_index": "--process_id", "process_count": "--num_processes"}


def check_override_keys(config, keys: Sequence[str], spec: str) -> None:
    """Raises KeyError naming the first override key that the config does not have."""
    for dotted in keys:
        if dotted in MOVED_TO_FLAGS and dotted not in config:
            raise KeyError(
                f"--config.{dotted} is no longer a config key ({spec}): pass "
                f"{MOVED_TO_FLAGS[dotted]} instead, with --coordinator_address, --num_processes "
                "and --process_id as for every job (on TPU pods and SLURM leave them unset: "
                "JAX finds the hosts)")
        find_key(config, dotted, origin=f"from --config.{dotted} in {spec}")


_CHATTY_LIBRARIES = ("/orbax/", "/etils/", "/jax/_src/")


class _QuietLibraries(std_logging.Filter):
    """Keeps library INFO lines (orbax logs a dozen per checkpoint) out of the job's log;
    their warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or not any(part in record.pathname for part in _CHATTY_LIBRARIES))


def define_job_flags(workdir_help: str | None) -> None:
    """`--workdir` (required; None: no such flag, for jobs whose config names their output, as
    generate's and import_images' `output_dir`) and the multi-process flags that
    `parallel.start_job` reads; on TPU pods and under SLURM the process flags can stay unset
    (auto-detected)."""
    if workdir_help is not None:
        flags.DEFINE_string("workdir", None, workdir_help, required=True)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")


def _flush_outputs() -> None:
    for handler in std_logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed or broken pipe: nothing left to save
            pass


def _live_threads() -> list[threading.Thread]:
    """Threads that would keep the interpreter from exiting (non-daemon, not this one)."""
    return [t for t in threading.enumerate()
            if t is not threading.current_thread() and not t.daemon and t.is_alive()]


def _hard_exit(code: int, why: str) -> None:
    logging.error("%s; leaving with os._exit(%d)", why, code)
    _flush_outputs()
    os._exit(code)


def _arm_exit_watchdog(code: int, grace: float) -> None:
    """A daemon thread that ends the process with `code` if the normal interpreter shutdown
    (atexit hooks such as jax.distributed's, library destructors) takes longer than `grace`."""
    def watchdog():
        time.sleep(grace)
        _hard_exit(code, f"the process did not exit within {grace:.0f} s of finishing")

    threading.Thread(target=watchdog, name="exit-watchdog", daemon=True).start()


def finish(code: int, grace: float | None = None) -> None:
    """Leaves the process with `code` within about 2 x `grace` seconds (default
    `EXIT_GRACE_SECONDS`), whatever threads remain.

    Waits up to `grace` for helper threads to end on their own; if some are still alive (stuck
    after an error), exits at once with os._exit. Otherwise exits normally (atexit hooks run),
    guarded by a watchdog."""
    grace = EXIT_GRACE_SECONDS if grace is None else grace
    # The job's result is decided and its outputs written: a SIGTERM now (the second of a double
    # notice, or a process group's after the job's own handler has gone) would turn exit 75 or 0
    # into 143 during interpreter shutdown, and launchers requeue only on 75.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + grace
    for thread in _live_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = _live_threads()
    if stuck:
        _hard_exit(code, f"{len(stuck)} thread(s) still running {grace:.0f} s after the job "
                         f"ended: {', '.join(t.name for t in stuck)}")
    _arm_exit_watchdog(code, grace)
    sys.exit(code)


def call_main(main: Callable, config) -> int:
    """Runs `main(config)` and returns its exit code; a fatal error is logged (with its
    traceback) and becomes EXIT_FAILED, Ctrl-C EXIT_INTERRUPTED."""
    try:
        code = main(config)
    except KeyboardInterrupt:
        logging.error("interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except Exception as e:  # any fatal error of the job: log it, then exit promptly (finish)
        logging.exception("fatal error: %s: %s", type(e).__name__, e)
        return EXIT_FAILED
    code = EXIT_OK if code is None else int(code)
    if code == EXIT_RESUME:     # said by every job, whatever runs it (launch/run_job.sh execs it)
        logging.warning("stopped early to be resumed (exit code %d): rerun the same command "
                        "to resume", EXIT_RESUME)
    return code


def run(main: Callable, default_config: str | None = None) -> None:
    """Defines `--config`, validates overrides, parses flags and calls `main(config)`.

    `main` returns an exit code (None for 0; `EXIT_RESUME` after a preemption). Whatever
    happens, the process ends promptly with that code: see `finish`."""
    config_flag = config_flags.DEFINE_config_file(
        "config", default=default_config, help_string="config file[:preset]", lock_config=True)

    def parse(argv):
        spec = _config_spec(argv, default_config)
        keys = _override_keys(argv)
        if keys and spec:
            try:
                check_override_keys(load_config(spec), keys, spec)
            except (KeyError, ValueError, FileNotFoundError) as e:
                print(f"FATAL: {e.args[0] if e.args else e}", file=sys.stderr)
                sys.exit(EXIT_USAGE)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"FATAL: {e}", file=sys.stderr)
            sys.exit(EXIT_USAGE)

    def _main(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        if len(argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
        finish(call_main(main, config_flag.value))

    app.run(_main, flags_parser=parse)
