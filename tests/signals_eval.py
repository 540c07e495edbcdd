"""A `knn` or `linear_probe` command line run that receives one SIGTERM at a chosen moment, for
tests/test_knn.py and tests/test_linear_probe.py. Run in its own process: before the fixes it
pins, the signal killed these jobs (exit 143) and the probe had nothing to resume from.

  python tests/signals_eval.py JOB WHEN FLAGS...

JOB: `knn` or `linear_probe`; FLAGS: the job's own command line (--config=..., --workdir=...).
WHEN: `train_features` (as the training split's features start being extracted) or
`epoch:N` (as the metrics of epoch N are logged). The job runs as `python -m
stablerep_jax.JOB` does, so the exit code is the job's (75 when it stopped to be resumed).
"""
import os
import runpy
import signal
import sys

job, when = sys.argv[1:3]
sys.argv = [f"stablerep_jax.{job}", *sys.argv[3:]]

from stablerep_jax import features, metrics  # noqa: E402


def sigterm(why: str) -> None:
    print(f"signals_eval: sending SIGTERM ({why})", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


if when == "train_features":
    real_extract = features.extract_features

    def extract(*args, **kwargs):
        if "train" in kwargs.get("desc", args[5] if len(args) > 5 else ""):
            sigterm("extracting the training features")
        return real_extract(*args, **kwargs)
    features.extract_features = extract
elif when.startswith("epoch:"):
    epoch = int(when.split(":")[1])
    real_write = metrics.MetricWriter.write

    def write(self, step, scalars):
        real_write(self, step, scalars)
        if step == epoch:
            sigterm(f"after epoch {epoch}")
    metrics.MetricWriter.write = write
else:
    raise SystemExit(f"unknown WHEN {when!r}")

runpy.run_module(f"stablerep_jax.{job}", run_name="__main__", alter_sys=True)
