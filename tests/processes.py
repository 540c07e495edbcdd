"""Runs a test script as N jax.distributed processes on this machine (loopback coordinator), as
the hosts of a pod would run one job. Scripts take `PROCESS_ID NUM_PROCESSES PORT ...` first."""
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(script: str, num_processes: int, *args, timeout: int = 600) -> list[str]:
    """Starts the processes together, waits for all, asserts each exited 0; returns each one's
    output (stdout and stderr). The script sets its own device count: XLA_FLAGS is dropped."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, script, str(i), str(num_processes), port,
                               *map(str, args)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(num_processes)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    return outputs


WITHOUT_TENSORFLOW = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "without_tensorflow")


def without_tensorflow(env: dict) -> dict:
    """A copy of `env` for a subprocess in which `import tensorflow` raises ImportError
    (tests/without_tensorflow/sitecustomize.py goes first on PYTHONPATH)."""
    paths = [WITHOUT_TENSORFLOW] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}
