"""Weighted k-NN: matches a plain numpy reading of the InstDisc/DINO rule, sharded (8 devices,
padded chunks) equals one device, and the job and the training monitor agree."""
import json
import os

import jax
import numpy as np
import pytest

from stablerep_jax import config_utils, fileio, features as features_lib, knn, parallel
from stablerep_jax.data import eval_data

import probe_fixtures as F


def reference_knn(train_f, train_l, test_f, num_classes, k, temperature):
    """Straight from the definition: cosine similarity, k nearest, votes weighted exp(sim/T)."""
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(test_f.astype(np.float64)) @ unit(train_f.astype(np.float64)).T
    scores = np.zeros((len(test_f), num_classes))
    for t in range(len(test_f)):
        for j in np.argsort(-sims[t])[:k]:
            scores[t, train_l[j]] += np.exp(sims[t, j] / temperature)
    return scores


def _data(seed, n_train=300, n_test=37, dim=24, classes=5, spread=1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    train_l, test_l = rng.integers(0, classes, n_train), rng.integers(0, classes, n_test)
    train_f = (centres[train_l] + spread * rng.normal(size=(n_train, dim))).astype(np.float32)
    test_f = (centres[test_l] + spread * rng.normal(size=(n_test, dim))).astype(np.float32)
    return train_f, train_l, test_f, test_l


def test_scores_match_the_definition():
    train_f, train_l, test_f, _ = _data(0, spread=3.0)
    ours = np.asarray(knn.knn_scores(train_f, train_l, test_f, 5, 20, 0.07))
    ref = reference_knn(train_f, train_l, test_f, 5, 20, 0.07)
    np.testing.assert_allclose(ours, ref, rtol=2e-4)


def test_accuracy_on_clusters_and_on_noise():
    train_f, train_l, test_f, test_l = _data(1, spread=0.3)
    assert knn.knn_classify(train_f, train_l, test_f, test_l, 5)["knn_top1"] == 1.0
    rng = np.random.default_rng(2)
    noise = knn.knn_classify(rng.normal(size=(400, 16)), rng.integers(0, 4, 400),
                             rng.normal(size=(400, 16)), rng.integers(0, 4, 400), 4)
    assert noise["knn_top1"] < 0.25 + 0.1          # chance 0.25, sd 0.022 on 400 samples


def test_sharded_padded_chunks_equal_one_device():
    """37 test rows in chunks of 16 over 8 devices: the last chunk is padded and masked."""
    train_f, train_l, test_f, test_l = _data(3, spread=3.0)
    eight = knn.knn_classify(train_f, train_l, test_f, test_l, 5, chunk=16,
                             mesh=parallel.make_mesh())
    one = knn.knn_classify(train_f, train_l, test_f, test_l, 5, chunk=1024,
                           mesh=parallel.make_mesh(jax.devices()[:1]))
    assert eight == one
    scores = reference_knn(train_f, train_l, test_f, 5, 20, 0.07)
    assert eight["knn_top1"] == pytest.approx(np.mean(np.argmax(scores, 1) == test_l))
    assert eight["knn_top1"] * 37 == pytest.approx(round(eight["knn_top1"] * 37))


def test_k_larger_than_the_training_set():
    train_f, train_l, test_f, test_l = _data(4, n_train=6)
    result = knn.knn_classify(train_f, train_l, test_f, test_l, 5, k=20)
    assert result["knn_k"] == 6
    with pytest.raises(ValueError, match="0 train"):
        knn.knn_classify(train_f[:0], train_l[:0], test_f, test_l, 5)


def test_job_and_monitor_agree(tmp_path):
    encoder_dir = F.save_tiny_encoder(str(tmp_path / "encoder"))
    folder = F.write_tinted_folder(str(tmp_path / "folder"), 8, 4)
    c = config_utils.load_config(os.path.join(F.REPO, "configs", "linear_probe.py") + ":folder")
    c.checkpoint, c.dataset, c.extract_batch_size = encoder_dir, f"folder:{folder}", 16
    result = knn.run(c, str(tmp_path / "work"))
    with open(tmp_path / "work" / "knn_results.json", encoding="utf-8") as f:
        assert json.load(f)["knn_top1"] == result["knn_top1"]
    assert result["num_train"] == 48 and result["num_test"] == 24 and result["knn_k"] == 20
    assert result["knn_top1"] >= 0.75            # the tint separates the classes (chance 1/6)

    # The monitor `train` builds from its own `knn` fields, fed the params it holds.
    train_cfg = config_utils.load_config(os.path.join(F.REPO, "configs", "stablerep.py") + ":tiny")
    train_cfg.knn.dataset = f"folder:{folder}"
    encoder = features_lib.load_encoder(encoder_dir)
    mesh = parallel.make_mesh()
    monitor = knn.KnnMonitor.from_train_config(encoder.model, train_cfg.knn, F.IMAGE_SIZE, mesh,
                                               batch_size=16)
    variables = features_lib.replicate(encoder.variables, mesh)
    assert monitor(variables["params"], variables["batch_stats"])["knn_top1"] == result["knn_top1"]


def test_monitor_needs_a_dataset():
    with pytest.raises(ValueError, match="set --config.dataset"):
        eval_data.load_eval_dataset(None)


def test_job_writes_to_a_ram_workdir(tmp_path, ram_dir):
    """knn_results.json goes through fileio: a ram:// workdir (the gs:// code path); the encoder
    checkpoint stays local (orbax does not know ram://)."""
    encoder_dir = F.save_tiny_encoder(str(tmp_path / "encoder"))
    folder = F.write_tinted_folder(str(tmp_path / "folder"), 4, 2)
    c = config_utils.load_config(os.path.join(F.REPO, "configs", "linear_probe.py") + ":folder")
    c.checkpoint, c.dataset, c.extract_batch_size = encoder_dir, f"folder:{folder}", 16
    result = knn.run(c, ram_dir)
    assert fileio.read_json(f"{ram_dir}/knn_results.json") == result
    assert not os.path.exists("ram:")            # nothing went to a local folder named "ram:"


def test_sigterm_exits_75_and_writes_nothing(tmp_path):
    """`python -m stablerep_jax.knn` got SIGTERM while extracting features: it used to die with
    143 (or, on two hosts, run on to the end); it now stops before the next batch, writes
    nothing and exits 75 so that launchers requeue it."""
    import subprocess
    import sys
    encoder_dir = F.save_tiny_encoder(str(tmp_path / "encoder"))
    folder = F.write_tinted_folder(str(tmp_path / "folder"), 4, 2)
    work = tmp_path / "work"
    run = subprocess.run(
        [sys.executable, os.path.join(F.REPO, "tests", "signals_eval.py"), "knn",
         "train_features", "--config=configs/linear_probe.py:folder",
         f"--config.checkpoint={encoder_dir}", f"--config.dataset=folder:{folder}",
         "--config.extract_batch_size=16", f"--workdir={work}"],
        cwd=F.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 75, run.stdout[-3000:]
    assert "signals_eval: sending SIGTERM" in run.stdout
    assert "stopped by SIGTERM (knn train features: stopped after 0 batches)" in run.stdout
    assert "stopped early to be resumed (exit code 75)" in run.stdout
    assert not (work / "knn_results.json").exists()
