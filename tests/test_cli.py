"""The shared job runner (cli.run): exit codes come through, and a job whose error leaves a
thread stuck still exits promptly with a non-zero code (a hung process burns chip-hours)."""
import os
import subprocess
import sys
import textwrap
import time

import pytest

from stablerep_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job_script(tmp_path, body: str) -> str:
    """A tiny job run through cli.run; `body` defines `main(config)`."""
    config = tmp_path / "job_config.py"
    config.write_text(textwrap.dedent("""
        import ml_collections
        def get_config():
            c = ml_collections.ConfigDict()
            c.value = 1
            return c
    """))
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import threading
        from stablerep_jax import cli
        cli.EXIT_GRACE_SECONDS = 3.0
    """) + textwrap.dedent(body) + textwrap.dedent(f"""
        if __name__ == "__main__":
            cli.run(main, default_config={str(config)!r})
    """))
    return str(script)


def _run(script: str, *args: str, timeout: float = 120) -> tuple[int, str, float]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def test_exit_code_of_main_comes_through(tmp_path):
    script = _job_script(tmp_path, """
        def main(config):
            return cli.EXIT_RESUME if config.value == 2 else None
    """)
    code, output, _ = _run(script)
    assert code == 0 and "stopped early to be resumed" not in output
    code, output, _ = _run(script, "--config.value=2")
    assert code == cli.EXIT_RESUME == 75
    assert "stopped early to be resumed (exit code 75): rerun the same command" in output


def test_error_with_a_stuck_thread_exits_promptly_and_nonzero(tmp_path):
    """Before cli.run ended jobs itself, this process printed its traceback and then waited
    forever for the non-daemon thread (as orbax / tf.data threads did after a DataLossError)."""
    script = _job_script(tmp_path, """
        def main(config):
            stuck = threading.Event()
            threading.Thread(target=stuck.wait, name="stuck-writer").start()
            raise ValueError("corrupt shard /data/x.tfrecord")
    """)
    code, output, _ = _run(script, timeout=90)
    assert code == cli.EXIT_FAILED
    assert "ValueError: corrupt shard /data/x.tfrecord" in output      # the error is logged
    assert "stuck-writer" in output and "os._exit" in output             # and why it left so


def test_error_without_stuck_threads_exits_normally(tmp_path):
    script = _job_script(tmp_path, """
        def main(config):
            raise KeyError("no such thing")
    """)
    code, output, _ = _run(script)
    assert code == cli.EXIT_FAILED
    assert "KeyError" in output and "os._exit" not in output


def test_finished_job_with_a_stuck_thread_still_exits(tmp_path):
    script = _job_script(tmp_path, """
        def main(config):
            threading.Thread(target=threading.Event().wait, name="leftover").start()
            return cli.EXIT_RESUME
    """)
    code, output, _ = _run(script, timeout=90)
    assert code == cli.EXIT_RESUME
    assert "leftover" in output


@pytest.mark.parametrize("code", [0, 75])
def test_a_sigterm_after_the_job_has_ended_keeps_its_exit_code(tmp_path, code):
    """The second SIGTERM of a double notice, or a process group's, can arrive after the job's
    own handler has gone, during interpreter shutdown (seconds with JAX and TensorFlow loaded):
    it used to turn 75 or 0 into death by signal (143 through a shell), which launchers do not
    requeue (found by benchmarks/fault_injection.py --signals)."""
    script = _job_script(tmp_path, f"""
        import atexit, os, signal, time
        def late_notice():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
        def main(config):
            atexit.register(late_notice)
            return {code}
    """)
    returncode, output, _ = _run(script)
    assert returncode == code, output


@pytest.mark.slow
def test_train_with_a_truncated_shard_exits_nonzero_promptly(tmp_path):
    """Through the real command line: a shard cut short by 200 bytes stops training with a
    non-zero code within the timeout (it once hung at 0% CPU after the traceback)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import synthetic_records
    pattern = synthetic_records.write_dataset(str(tmp_path / "data"), num_captions=32)
    shard = sorted(p for p in os.listdir(tmp_path / "data") if p.endswith(".tfrecord"))[1]
    path = tmp_path / "data" / shard
    os.truncate(path, os.path.getsize(path) - 200)
    code, output, _ = _run_module(
        "stablerep_jax.train", "--config=configs/stablerep.py:tiny",
        f"--config.data.train_files={pattern}", "--config.total_steps=30",
        "--config.data.max_bad_fraction=0", f"--workdir={tmp_path / 'run'}", timeout=240)
    assert code == cli.EXIT_FAILED, output[-3000:]
    assert "fatal error" in output


def _run_module(module: str, *args: str, timeout: float) -> tuple[int, str, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start
