"""The XLA flags the training job sets, in one place: what each is for, how to override them.

XLA reads `XLA_FLAGS` once, when JAX starts its backend (the first computation or device
query), so `apply()` runs first thing in `train`'s main. The flags are GPU flags; every XLA
build parses them (an unknown name is a fatal error at start-up, which tests/test_xla_flags.py
checks for on the CPU) and other platforms ignore them.

Override with the environment variable `STABLEREP_XLA_GPU_FLAGS`:
  unset                 the job's flags (`GPU_FLAGS`)
  "" or "none"          none of ours (XLA's defaults plus whatever XLA_FLAGS already holds)
  "--xla_a=1 --xla_b"   these instead of ours
A flag already in `XLA_FLAGS` (by name) keeps the value given there: ours never override the
user's. `benchmarks/train_levers.py --xla_flags` measures the step with and without them, and
with each of `CANDIDATE_GPU_FLAGS` on top (one process per setting).
"""
from __future__ import annotations

import logging
import os
import shlex
from typing import Mapping, MutableMapping, Sequence

ENV = "STABLEREP_XLA_GPU_FLAGS"

# The job's flags: flag -> why. launch/gpu_slurm.sh and launch/train_gpu.yaml export the same.
GPU_FLAGS: dict[str, str] = {
    "--xla_gpu_enable_latency_hiding_scheduler=true":
        "schedule the data-parallel collectives (gradient all-reduce, ZeRO-1 reduce-scatter and "
        "all-gather of the moments) to overlap with compute",
}

# Flags worth measuring on top of the job's (benchmarks/train_levers.py), not set by default.
CANDIDATE_GPU_FLAGS: dict[str, str] = {
    "triton_gemm_off": "--xla_gpu_enable_triton_gemm=false",          # cuBLAS for every GEMM
    "command_buffer_off": "--xla_gpu_enable_command_buffer=",         # no CUDA graphs
    "autotune_4": "--xla_gpu_autotune_level=4",                       # autotune every GEMM
}

_OFF = ("", "none")


def flag_name(flag: str) -> str:
    """`--xla_x=1` -> `--xla_x`."""
    return flag.split("=", 1)[0]


def job_flags(environ: Mapping[str, str] | None = None) -> list[str]:
    """The flags the job adds: `GPU_FLAGS`, or what `STABLEREP_XLA_GPU_FLAGS` says instead."""
    environ = os.environ if environ is None else environ
    if ENV not in environ:
        return list(GPU_FLAGS)
    text = environ[ENV].strip()
    return [] if text.lower() in _OFF else shlex.split(text)


def merge(existing: str, flags: Sequence[str]) -> str:
    """`existing` XLA_FLAGS with each of `flags` whose name it does not hold yet appended."""
    present = {flag_name(f) for f in shlex.split(existing or "")}
    added = [f for f in flags if flag_name(f) not in present]
    return " ".join(x for x in [(existing or "").strip(), *added] if x)


def apply(environ: MutableMapping[str, str] | None = None) -> str:
    """Adds the job's flags to `XLA_FLAGS` in `environ` (default os.environ) and returns the
    result. Call it before JAX starts its backend; afterwards XLA would not see them, and
    this logs a warning saying so."""
    environ = os.environ if environ is None else environ
    value = merge(environ.get("XLA_FLAGS", ""), job_flags(environ))
    if value:
        environ["XLA_FLAGS"] = value
    if environ is os.environ and _backend_started():
        logging.getLogger(__name__).warning(
            "xla_flags.apply() after JAX started its backend: XLA_FLAGS=%r takes effect only in "
            "new processes", value)
    return value


def _backend_started() -> bool:
    try:
        from jax._src import xla_bridge   # private; only for the warning above
        return bool(xla_bridge.backends_are_initialized())
    except Exception:   # an older/newer JAX without it: no warning
        return False
