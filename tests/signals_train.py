"""A tiny `train` run that receives SIGTERMs at chosen moments, for tests/test_train.py. Run in
its own process: before the fixes it pins, such a signal killed the process (exit 143).

  python tests/signals_train.py WORKDIR TRAIN_FILES WHEN

WHEN: `startup` (one SIGTERM while the data files are counted, before the first step) or
`final_save` (one at step 3, then a second one as the run starts waiting for its last
checkpoint, that is while the step-3 checkpoint is still being written) or `kill_in_save` (checkpoints every 2
steps; SIGKILL while the last one, step 8, is being written: no handler can help, a temporary
directory is left). Exits 75 when the run reports itself preempted, as `python -m
stablerep_jax.train` does.
"""
import os
import signal
import sys

workdir, train_files, when = sys.argv[1:4]
os.environ["JAX_PLATFORMS"] = "cpu"

from stablerep_jax import checkpoint, cli, config_utils, train  # noqa: E402
from stablerep_jax.data import pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigterm(why: str) -> None:
    print(f"signals_train: sending SIGTERM ({why})", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


def main() -> int:
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config_utils.apply_overrides(config, {"data.train_files": train_files, "data.permute_window": 16,
                                          "total_steps": 8, "checkpoint_every": 100})
    if when == "startup":
        real_resolve = train.TrainSet.resolve

        def resolve(pattern):
            sigterm("while counting the data files")
            return real_resolve(pattern)
        train.TrainSet.resolve = resolve
    elif when == "final_save":
        real_iterator = pipeline.make_train_iterator

        def iterator(*args, **kwargs):
            for step, batch in enumerate(real_iterator(*args, **kwargs), start=1):
                if step == 3:
                    sigterm("first notice, at step 3")
                yield batch
        pipeline.make_train_iterator = iterator
        real_wait = checkpoint.TrainCheckpointer.wait

        def wait(self):
            sigterm("second notice, while the last checkpoint is written")
            real_wait(self)
        checkpoint.TrainCheckpointer.wait = wait
    elif when == "kill_in_save":
        config.checkpoint_every = 2

        def killing_wait(self):
            print("signals_train: SIGKILL while step 8 is written", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.TrainCheckpointer.wait = killing_wait
    else:
        raise SystemExit(f"unknown WHEN {when!r}")
    result = train.train_and_evaluate(config, workdir)
    print(f"signals_train: step={result.step} preempted={result.preempted}", flush=True)
    return cli.EXIT_RESUME if result.preempted else 0


if __name__ == "__main__":
    sys.exit(main())
