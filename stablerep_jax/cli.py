"""The shared command line of every job: `--config=FILE[:preset]` plus `--config.key=value`.

ml_collections' config flag reports an unknown override key as a bare AttributeError deep in
absl's parser; here every override key is checked against the loaded config first, so a typo
stops the job before it touches data with a message that names the key and its valid siblings.
"""
from __future__ import annotations

import logging as std_logging
import sys
from typing import Callable, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from stablerep_jax.config_utils import load_config

_CONFIG_PREFIX = "--config."


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


def check_override_keys(config, keys: Sequence[str], spec: str) -> None:
    """Raises KeyError naming the first override key that the config does not have."""
    for dotted in keys:
        node, path = config, []
        for name in dotted.split("."):
            path.append(name)
            if not hasattr(node, "keys") or name not in node:
                parent = ".".join(path[:-1]) or "<top level>"
                valid = sorted(node.keys()) if hasattr(node, "keys") else []
                raise KeyError(
                    f"unknown config key {'.'.join(path)!r} (from --config.{dotted}) in {spec}; "
                    f"keys under {parent}: {', '.join(valid)}")
            node = node[name]


_CHATTY_LIBRARIES = ("/orbax/", "/etils/", "/jax/_src/")


class _QuietLibraries(std_logging.Filter):
    """Keeps library INFO lines (orbax logs a dozen per checkpoint) out of the job's log;
    their warnings and errors still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return (record.levelno >= std_logging.WARNING
                or not any(part in record.pathname for part in _CHATTY_LIBRARIES))


def define_job_flags(workdir_help: str) -> None:
    """`--workdir` (required) and the multi-process flags that `parallel.start_job` reads;
    on TPU pods and under SLURM the process flags can stay unset (auto-detected)."""
    flags.DEFINE_string("workdir", None, workdir_help, required=True)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process)")
    flags.DEFINE_integer("num_processes", None, "number of processes (multi-process)")
    flags.DEFINE_integer("process_id", None, "this process's index (multi-process)")


def run(main: Callable, default_config: str | None = None) -> None:
    """Defines `--config`, validates overrides, parses flags and calls `main(config)`."""
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
                sys.exit(2)
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            print(f"FATAL: {e}", file=sys.stderr)
            sys.exit(2)

    def _main(argv):
        logging.get_absl_handler().addFilter(_QuietLibraries())
        if len(argv) > 1:
            raise app.UsageError(f"unexpected positional arguments: {argv[1:]}")
        main(config_flag.value)

    app.run(_main, flags_parser=parse)
