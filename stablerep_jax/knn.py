r"""Weighted k-NN classification on frozen features (InstDisc / DINO protocol): a monitor and a job.

  python -m stablerep_jax.knn --config=configs/linear_probe.py:cifar10 \
      --config.checkpoint=RUN_DIR --config.data_dir=/data/tfds --workdir=/tmp/knn

Each test feature votes with its k nearest training features (cosine similarity) weighted by
exp(sim / T); k=20 and T=0.07 as in DINO. `knn_classify` works on features already extracted
(it lives in `features`, shared with the linear probe); `KnnMonitor` extracts features from a
dataset for a model's current params, for use during training every N steps. The job writes
WORKDIR/knn_results.json.

SIGTERM (preemption; `preemption.PreemptionWatch`, installed first): the job has nothing worth
keeping until its features are complete, so it drops them: it stops before the next extraction
batch (every host at the same one: JAX's preemption sync point), writes nothing and exits 75
(`cli.EXIT_RESUME`); the rerun starts over. During start-up a single process stops at once.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import time

import jax
from absl import flags, logging

from stablerep_jax import features as features_lib
from stablerep_jax import fileio, parallel, preemption
from stablerep_jax.data import eval_data
from stablerep_jax.features import knn_classify, knn_scores  # noqa: F401  (this job's API)


class KnnMonitor:
    """k-NN accuracy of a model's current params on a labelled dataset (training monitor).

    Build once (dataset checks, compiled encoder); call with the params at any step. `batch_size`
    is the global batch of the frozen encoder (`features.split_features` rounds it down to a
    multiple of the devices).
    """

    def __init__(self, model, data: eval_data.EvalDataset, image_size: int, mesh, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256):
        self.data, self.mesh, self.image_size = data, mesh, int(image_size)
        self.k, self.temperature = int(k), float(temperature)
        self.batch_size = int(batch_size)
        self.encode = features_lib.make_encode_fn(model, mesh)

    @classmethod
    def from_train_config(cls, model, knn_config, image_size: int, mesh,
                          batch_size: int = 256) -> "KnnMonitor":
        """From `train`'s `knn` fields (dataset, data_dir, k, temperature)."""
        data = eval_data.load_eval_dataset(knn_config.dataset, knn_config.data_dir)
        return cls(model, data, image_size, mesh, knn_config.k, knn_config.temperature, batch_size)

    def features(self, variables, split, desc: str, stop=None):
        return features_lib.split_features(self.encode, variables, split, self.image_size,
                                           self.batch_size, self.mesh, desc, stop)

    def __call__(self, params, batch_stats=None, stop=None) -> dict:
        """{"knn_top1", "knn_top5", ...} for these params (replicated or host arrays).
        `stop()`, asked before each extraction batch, may end it (`features.Stopped`)."""
        variables = {"params": params, "batch_stats": batch_stats or {}}
        train_f, train_l, _ = self.features(variables, self.data.train, "knn train features",
                                            stop)
        test_f, test_l, _ = self.features(variables, self.data.test, "knn test features", stop)
        return knn_classify(train_f, train_l, test_f, test_l, self.data.num_classes, self.k,
                            self.temperature, self.mesh)


def run(config, workdir: str, mesh=None) -> dict:
    """The k-NN job on a checkpoint: writes and returns WORKDIR/knn_results.json. No SIGTERM
    handler: see `run_until_preempted`."""
    return _run(config, workdir, mesh, None)


def run_until_preempted(config, workdir: str, mesh=None) -> tuple[dict | None, bool]:
    """`run` under a SIGTERM handler (installed first): (results or None, preempted). A
    notice stops every host before its next extraction batch; nothing is written."""
    with preemption.PreemptionWatch() as watch:
        try:
            return _run(config, workdir, mesh, watch), False
        except preemption.PreemptedAtStartup:
            logging.warning("stopped by SIGTERM during start-up: nothing was written")
        except features_lib.Stopped as e:
            logging.warning("stopped by SIGTERM (%s): nothing was written; the rerun starts "
                            "over", e)
        return None, True


def _run(config, workdir: str, mesh, watch) -> dict:
    start = time.time()
    data = eval_data.load_eval_dataset(config.dataset, config.data_dir, config.train_split,
                                       config.test_split, config.image_key, config.label_key)
    encoder = features_lib.load_encoder(config.checkpoint, config.checkpoint_step,
                                        config.image_size)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    monitor = KnnMonitor(encoder.model, data, encoder.image_size, mesh, config.knn.k,
                         config.knn.temperature, config.extract_batch_size)
    variables = features_lib.replicate(encoder.variables, mesh)
    stop = None
    if watch is not None:
        checks = itertools.count(1)       # the same sequence on every host (sync point)
        stop = lambda: watch.should_stop(next(checks))  # noqa: E731
    with contextlib.nullcontext() if watch is None else watch.working():
        result = monitor(variables["params"], variables["batch_stats"], stop)
    result.update(dataset=data.name, checkpoint=str(config.checkpoint),
                  num_train=data.train.num_examples, num_test=data.test.num_examples,
                  num_classes=data.num_classes, seconds=round(time.time() - start, 1))
    if jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, "knn_results.json"), result)
    logging.info("k-NN (k=%d, T=%g) top-1 %.4f on %s", result["knn_k"], config.knn.temperature,
                 result["knn_top1"], data.name)
    return result


def main(config):
    from stablerep_jax import cli
    parallel.start_job(flags.FLAGS)
    _, preempted = run_until_preempted(config, flags.FLAGS.workdir)
    return cli.EXIT_RESUME if preempted else cli.EXIT_OK


if __name__ == "__main__":
    from stablerep_jax import cli
    cli.define_job_flags("knn_results.json goes here")
    cli.run(main)
