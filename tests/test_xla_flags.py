"""The XLA flags the train job sets (stablerep_jax.xla_flags): every one is a flag this XLA knows
(an unknown one kills the process at start-up), the environment overrides them, a user's own
XLA_FLAGS value wins, and train's main applies them before JAX starts its backend."""
import os
import subprocess
import sys

import pytest

from stablerep_jax import xla_flags


def test_every_flag_is_known_to_this_xla():
    """XLA parses all flags on every platform: a CPU process with every job and candidate flag
    set starts and computes (a misspelt one would abort with 'Unknown flag in XLA_FLAGS')."""
    every = list(xla_flags.GPU_FLAGS) + list(xla_flags.CANDIDATE_GPU_FLAGS.values())
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(every)}
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; "
                           "print(float(jnp.ones(3).sum()))"], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]
    bad = {**env, "XLA_FLAGS": "--xla_gpu_no_such_flag=true"}
    proc = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(1)"],
                          env=bad, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "Unknown flag" in proc.stderr


def test_the_environment_overrides_the_jobs_flags():
    assert xla_flags.job_flags({}) == list(xla_flags.GPU_FLAGS)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla_flags.GPU_FLAGS
    for off in ("", "none", " None "):
        assert xla_flags.job_flags({xla_flags.ENV: off}) == []
    assert xla_flags.job_flags({xla_flags.ENV: "--xla_a=1 --xla_b=2"}) == ["--xla_a=1",
                                                                           "--xla_b=2"]


def test_apply_appends_without_overriding_the_users_flags():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 "
                        "--xla_gpu_enable_latency_hiding_scheduler=false"}
    value = xla_flags.apply(env)
    assert value == env["XLA_FLAGS"] == ("--xla_force_host_platform_device_count=8 "
                                         "--xla_gpu_enable_latency_hiding_scheduler=false")
    env = {xla_flags.ENV: "--xla_gpu_enable_triton_gemm=false"}
    assert xla_flags.apply(env) == "--xla_gpu_enable_triton_gemm=false" == env["XLA_FLAGS"]
    env = {}
    xla_flags.apply(env)
    assert env["XLA_FLAGS"] == " ".join(xla_flags.GPU_FLAGS)
    env = {xla_flags.ENV: "none"}
    assert xla_flags.apply(env) == "" and "XLA_FLAGS" not in env
    assert xla_flags.merge("--a=1", ["--a=2", "--b"]) == "--a=1 --b"


def test_train_main_applies_the_flags_before_starting_jax(monkeypatch):
    from stablerep_jax import parallel, train
    calls = []
    monkeypatch.setattr(xla_flags, "apply", lambda: calls.append("xla_flags"))

    def start_job(flag_values):
        calls.append("start_job")
        raise RuntimeError("stop here")
    monkeypatch.setattr(parallel, "start_job", start_job)
    with pytest.raises(RuntimeError, match="stop here"):
        train.main(None)
    assert calls == ["xla_flags", "start_job"]
