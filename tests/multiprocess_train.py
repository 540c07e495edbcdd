"""One process of a multi-process training run on CPU, for tests/test_multiprocess.py.

  python tests/multiprocess_train.py PROCESS_ID NUM_PROCESSES PORT WORKDIR [STEPS [SIGTERM_AT]]

The 8 CPU devices are split evenly over the processes; every process feeds its own rows of the
same deterministic global batches, so a 2-process run must match a 1-process run exactly.
With SIGTERM_AT, the last process (only) sends itself SIGTERM while fetching that step's batch,
as one preempted host of a pod would be; JAX's preemption sync point makes every host stop at
the same step.
"""
import os
import signal
import sys

process_id, num_processes, port, workdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
total_steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
sigterm_at = int(sys.argv[6]) if len(sys.argv) > 6 else -1
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # noqa: E402

from stablerep_jax import config_utils, parallel, train  # noqa: E402
from stablerep_jax.data import pipeline, train_set  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_iterator(data_config, dataset, *, batch_size, seed, process_index, process_count,
                       start_step=0, tokenizer_dir=None, steps_per_epoch=None):
    """Global batch of step s from a fixed RNG; this process yields only its rows."""
    views = data_config.n_img * data_config.num_crop
    size = data_config.image_size
    rows = batch_size // process_count
    step = start_step
    while True:
        rng = np.random.default_rng([seed, step])
        images = rng.normal(size=(batch_size, views, size, size, 3)).astype(np.float32)
        labels = np.arange(batch_size, dtype=np.int32)
        lo = process_index * rows
        if step == sigterm_at and process_index == process_count - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        yield {"images": images[lo:lo + rows], "labels": labels[lo:lo + rows]}
        step += 1


def main():
    if num_processes > 1:
        parallel.initialize_distributed(f"localhost:{port}", num_processes, process_id)
    pipeline.make_train_iterator = synthetic_iterator
    # No shards behind "synthetic": a data set of two 1000-caption files, never read.
    train.TrainSet.resolve = lambda pattern: train_set.TrainSet(
        pattern=pattern, files=(f"{pattern}-0", f"{pattern}-1"), counts=(1000, 1000),
        manifests={}, label_offsets={})
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = "synthetic"
    config.total_steps = total_steps
    config.checkpoint_every = total_steps
    config.preemption_check_every = 2
    train.train_and_evaluate(config, workdir)


if __name__ == "__main__":
    main()
