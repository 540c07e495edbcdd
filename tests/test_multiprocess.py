"""Two CPU processes joined by jax.distributed (loopback coordinator) train exactly like one."""
import os

import numpy as np
import pytest

from processes import run_processes
from stablerep_jax.metrics import read_metrics

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_train.py")


def _run(num_processes: int, workdir: str, *extra: int) -> list[str]:
    """Runs the processes to the end; returns each one's output."""
    return run_processes(SCRIPT, num_processes, workdir, *extra)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    _run(1, str(tmp_path / "one"))
    _run(2, str(tmp_path / "two"))
    one, two = read_metrics(str(tmp_path / "one")), read_metrics(str(tmp_path / "two"))
    assert [m["step"] for m in one] == [m["step"] for m in two] == [1, 2, 3]
    np.testing.assert_allclose([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-5)
    # Both processes took part in the checkpoint: it holds the final step.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["3"]


@pytest.mark.slow
def test_sigterm_on_one_host_stops_both_at_the_same_step(tmp_path):
    """Process 1 alone is signalled while fetching its 3rd batch; JAX's preemption sync point
    (jax.distributed's SIGTERM notifier) picks one step for both: both save it and exit cleanly
    (none hangs in a collective) long before the 8 steps are done."""
    outputs = _run(2, str(tmp_path / "run"), 8, 2)
    (saved,) = os.listdir(tmp_path / "run" / "checkpoints")
    stop = int(saved)
    assert 3 <= stop < 8
    assert [m["step"] for m in read_metrics(str(tmp_path / "run"))] == list(range(1, stop + 1))
    for out in outputs:
        assert f"stopped early by SIGTERM at step {stop} of 8" in out, out[-4000:]
