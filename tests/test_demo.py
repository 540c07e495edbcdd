"""The demo: its config nests the configs of the jobs it runs (overrides reach the runs, a wrong
key is named), it runs the chain end to end at a reduced size, and its report links figures."""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

from stablerep_jax import cli, config_utils
from stablerep_jax.data import records
from stablerep_jax.demo import comparison, toy_world

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "demo.py")


def _config(preset="test"):
    return config_utils.load_config(f"{DEMO_CONFIG}:{preset}")


def _python_env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


# --------------------------------------------------------------------------------------------
# Config


def test_train_and_probe_configs_are_the_jobs_own():
    """Every key of the train and probe job configs is there, so any is one override away."""
    c = _config("default")
    train_keys = set(config_utils.load_config(
        os.path.join(REPO, "configs", "stablerep.py") + ":tiny").to_dict())
    probe_keys = set(config_utils.load_config(
        os.path.join(REPO, "configs", "linear_probe.py") + ":folder").to_dict())
    assert (set(c.train.to_dict()) == set(c.simclr.to_dict()) == set(c.simclr_real.to_dict())
            == train_keys)
    assert set(c.probe.to_dict()) == probe_keys
    assert c.probe.mode == "cached_features"
    job = comparison.train_config(c, "train", "/data/*.tfrecord")
    assert job.data.train_files == "/data/*.tfrecord" and job.total_steps == 200


def test_simclr_follows_train_except_its_views_and_its_own_overrides():
    c = _config("default")
    config_utils.apply_overrides(c, {"train.model.depth": 3, "train.total_steps": 50,
                                     "train.data.n_img": 3, "simclr.optim.blr": 5e-3,
                                     "seed": 7})
    simclr = comparison.train_config(c, "simclr", "g")
    stablerep = comparison.train_config(c, "train", "g")
    assert simclr.model.depth == stablerep.model.depth == 3
    assert simclr.total_steps == simclr.checkpoint_every == 50
    assert simclr.optim.warmup_steps == stablerep.optim.warmup_steps == 5
    assert (simclr.data.n_img, simclr.data.num_crop) == (1, 2)
    assert simclr.batch_size * 2 == stablerep.batch_size * 3   # same views per step
    assert simclr.optim.blr == 5e-3 and stablerep.optim.blr == 4.5e-3
    assert simclr.seed == stablerep.seed == c.probe.seed == c.sd.seed == 7
    # SimCLR on the real set follows SimCLR (views, batch, train's fields) but keeps its own lr.
    real = comparison.train_config(c, "simclr_real", "g")
    assert (real.data.n_img, real.data.num_crop, real.batch_size) == (1, 2, simclr.batch_size)
    assert real.model.depth == 3 and real.seed == 7
    assert real.optim.blr == 1.35e-2
    config_utils.apply_overrides(c, {"simclr.data.num_crop": 4, "simclr_real.optim.blr": 0.1})
    real = comparison.train_config(c, "simclr_real", "g")
    assert real.data.num_crop == 4 and real.optim.blr == 0.1


def test_each_run_trains_at_its_own_tuned_lr():
    """The default runs use each method's best lr of the study's grid, not StableRep's."""
    c = _config("default")
    globs = {"synthetic": "s/*", "real": "r/*"}
    blrs = {slug: comparison.run_config(c, slug, globs).optim.blr for slug in comparison.RUNS}
    assert blrs == {"stablerep": 4.5e-3, "simclr_synthetic": 1.35e-2, "simclr_real": 1.35e-2}
    assert comparison.run_config(c, "simclr_real", globs).data.train_files == "r/*"


def test_fields_the_demo_sets_must_stay_unset():
    c = _config()
    c.train.data.train_files = "/elsewhere/*.tfrecord"
    with pytest.raises(ValueError, match=r"--config.train.data.train_files='/elsewhere"):
        comparison.train_config(c, "train", "g")
    c = _config()
    c.probe.checkpoint = "/ckpt"
    with pytest.raises(ValueError, match="--config.probe.checkpoint='/ckpt'"):
        comparison.probe_encoder(c, "/x", {}, mesh=None)
    c = _config()
    c.probe.mode = "augmented"
    with pytest.raises(ValueError, match="--config.probe.mode='augmented'.*cached_features"):
        comparison.probe_encoder(c, "/x", {}, mesh=None)
    c = _config()
    c.baselines = ("simclr_real", "clip")
    with pytest.raises(ValueError, match=r"--config.baselines: unknown run\(s\) \['clip'\]"):
        comparison.run(c, "/never/written")


def test_a_best_probe_lr_at_an_end_of_the_grid_is_flagged():
    results = {"shape": {"best_top1": 0.5, "best_lr": 0.001},
               "color": {"best_top1": 0.7, "best_lr": 0.3},
               "count": {"best_top1": 0.6, "best_lr": 100.0}}
    row = comparison.method_row(results, (0.001, 0.3, 100.0), ("shape", "color"))
    assert row["mean"] == pytest.approx(0.6) and row["mean_all"] == pytest.approx(0.6)
    assert comparison.method_row(results, (0.001, 100.0), ("count",))["mean"] == 0.6
    with pytest.raises(ValueError, match=r"mean_over names \['size'\]"):
        comparison.method_row(results, (0.001, 100.0), ("size",))
    assert row["best_lr_at_grid_end"] == ["shape", "count"]
    assert row["top1"] == {"shape": 0.5, "color": 0.7, "count": 0.6}


def test_sd_generator_runs_generate_with_the_demo_fields(tmp_path, monkeypatch):
    """generator=sd: `config.sd` (generate's own config) follows the demo's model, K, stored
    size and seed, and gets the toy grammar's captions and WORKDIR/data."""
    from stablerep_jax import generate

    seen = []
    monkeypatch.setattr(generate, "run", seen.append)
    c = _config()
    config_utils.apply_overrides(c, {"generator": "sd", "model": "/models/sd", "seed": 4,
                                     "images_per_caption": 3, "sd.num_inference_steps": 7})
    c.num_captions = 12
    globs = comparison.make_data(c, str(tmp_path))
    (gen,) = seen
    assert (gen.model, gen.images_per_caption, gen.save_size, gen.seed) == ("/models/sd", 3, 40, 4)
    assert gen.num_inference_steps == 7 and gen.output_dir == str(tmp_path / "synthetic")
    with open(gen.captions, encoding="utf-8") as f:
        assert f.read().splitlines() == [s.text for s in toy_world.sample_captions(12, 4)]
    # The "real" set stays the toy renderer's: one image of each of the same captions.
    real = records.read_manifest(str(tmp_path / "real"))
    assert real["images_per_caption"] == 1 and real["num_captions"] == 12
    assert globs["real"] == str(tmp_path / "real" / "*.tfrecord")


def test_a_wrong_nested_key_stops_the_demo_naming_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "stablerep_jax.demo", "--config=configs/demo.py:test",
         "--config.train.model.dept=4", f"--workdir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, env=_python_env(), timeout=300)
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr[-2000:]
    assert "unknown config key 'train.model.dept'" in proc.stderr
    assert not os.listdir(tmp_path)


# --------------------------------------------------------------------------------------------
# End to end


def _linked_pngs(report: str, directory) -> list[str]:
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    for name in names:
        with Image.open(os.path.join(directory, name)) as image:
            assert image.format == "PNG", name
            image.load()                     # decodes the whole file
            assert min(image.size) >= 100, (name, image.size)
    return names


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """With a relative --workdir, as the README's quick start runs it (orbax wants absolute
    checkpoint paths; the demo once failed there)."""
    config = _config()
    monkeypatch.chdir(tmp_path)
    summary = comparison.run(config, "stablerep_demo")
    out = tmp_path / "stablerep_demo"
    saved = json.loads((out / "demo_results.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    # A row per method, each its own encoder's probes: one sweep per attribute on the same
    # held-out renders. (The test preset is too small for a quality margin; the default
    # preset's and the study's numbers are in the README.)
    attributes = list(config.probe_attributes)
    names = {"stablerep": "StableRep (synthetic)", "simclr_synthetic": "SimCLR (synthetic)",
             "simclr_real": "SimCLR (real)", "random_init": "random init"}
    assert list(summary["methods"]) == list(names.values())
    for slug, name in names.items():
        probes = json.loads((out / "probe" / f"{slug}.json").read_text())
        row = saved["methods"][name]
        assert sorted(probes) == sorted(attributes) == sorted(row["top1"])
        for attribute, result in probes.items():
            assert result["best_top1"] == row["top1"][attribute], (name, attribute)
            assert result["num_classes"] == len(toy_world.ATTRIBUTE_VALUES[attribute])
            assert result["num_test"] == config.probe_test_images
        assert row["mean_all"] == pytest.approx(sum(row["top1"].values()) / len(attributes))
        assert row["mean"] == pytest.approx(
            sum(row["top1"][a] for a in config.mean_over) / len(config.mean_over))
    assert [saved["methods"][n]["data"] for n in names.values()] == [
        "synthetic", "synthetic", "real", None]
    # Different encoders: their features (hence probe accuracies) differ.
    assert len({json.dumps(saved["methods"][n]["top1"]) for n in names.values()}) == 4
    assert saved["probe_top1_trained"] == saved["methods"]["StableRep (synthetic)"]["mean"]
    assert saved["probe_top1_random"] == saved["methods"]["random init"]["mean"]
    assert saved["views_per_step"] == {"StableRep (synthetic)": 32, "SimCLR (synthetic)": 32,
                                       "SimCLR (real)": 32}
    assert saved["mean_over"] == ["shape", "color", "count", "size"]
    # Where the minutes went: every stage, once, each within the whole run's wall time.
    assert list(summary["stage_seconds"]) == [
        "data", "train stablerep", "train simclr_synthetic", "train simclr_real", "probe set",
        "probe stablerep", "probe simclr_synthetic", "probe simclr_real", "probe random_init"]
    assert 0 < sum(saved["stage_seconds"].values()) <= saved["seconds"] + 1

    # The data: the same captions, K synthetic images each and one real image each.
    manifests = {name: records.read_manifest(str(out / "data" / name))
                 for name in ("synthetic", "real")}
    assert manifests["synthetic"]["images_per_caption"] == config.images_per_caption
    assert manifests["real"]["images_per_caption"] == 1
    texts = {name: (out / "data" / name / "captions.txt").read_text() for name in manifests}
    assert texts["synthetic"] == texts["real"]

    # The report: the table with every method's mean, and the linked figures (contact sheet,
    # loss curves, probe per lr, the toy renderer's throughput), each a PNG that decodes.
    report = (out / "report.md").read_text()
    linked = _linked_pngs(report, out)
    assert set(linked) == {"contact_sheet.png", "loss_curves.png", "probe_per_lr.png",
                           "generation_throughput.png"}
    assert set(saved["figures"].values()) == set(linked) - {"contact_sheet.png"}
    for name, row in saved["methods"].items():
        assert re.search(rf"\| {re.escape(name)} \|.*\| \*\*{row['mean']:.1%}\*\* \| "
                         rf"{row['mean_all']:.1%} \|", report)
    runs = json.loads((out / "data" / "synthetic" / "summary.json").read_text())["runs"]
    assert [r["images"] for r in runs] == [config.num_captions * config.images_per_caption]

    # Training really ran and logged a falling loss curve for every objective.
    for run in ("stablerep", "simclr_synthetic", "simclr_real"):
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["loss"] for line in lines]
        assert len(losses) == config.train.total_steps // config.train.log_every
        assert sum(losses[-3:]) < sum(losses[:3])
    # A rerun reuses data and checkpoints (train resumes at its final step: no new steps).
    again = comparison.run(config, "stablerep_demo")
    assert again["methods"] == summary["methods"]
    assert len(json.loads((out / "data" / "synthetic" / "summary.json").read_text())["runs"]) == 1


@pytest.mark.slow
def test_demo_stops_on_sigterm_without_probing(tmp_path):
    """`python -m stablerep_jax.demo`, SIGTERM while it trains: exit code 75 (resume), and
    neither the second encoder nor any probe of the half-trained one runs. The nested flags
    reach the run: the saved StableRep encoder has the depth asked for."""
    import signal
    import time

    from stablerep_jax import checkpoint

    command = [sys.executable, "-m", "stablerep_jax.demo", "--config=configs/demo.py:test",
               "--config.train.total_steps=5000", "--config.train.model.depth=1",
               f"--workdir={tmp_path}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO, env=_python_env())
    metrics = tmp_path / "stablerep" / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "the demo never logged a training step"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=180)[0]
    assert proc.returncode == cli.EXIT_RESUME, output[-3000:]
    assert not (tmp_path / "simclr_synthetic").exists()
    assert not (tmp_path / "probe").exists()
    assert not (tmp_path / "demo_results.json").exists()
    params, _, model_config = checkpoint.load_model(str(tmp_path / "stablerep"))
    assert model_config["depth"] == 1
    assert {key for key in _keys(params) if key.startswith("blocks_")} == {"blocks_0"}


def _keys(tree) -> set:
    """Every key of a nested dict, at any depth."""
    if not isinstance(tree, dict):
        return set()
    return set(tree).union(*(_keys(value) for value in tree.values()))


@pytest.mark.slow
def test_demo_writes_every_output_to_a_url_workdir(tmp_path, monkeypatch, ram_dir):
    """A bucket workdir (ram:// here, gs:// for users): data, metrics, probe results, figures
    and the report land on the URL, and nothing lands in a local folder named after the scheme.
    Only the orbax checkpoints stay local (`checkpoint_dir`): TensorStore cannot write ram://."""
    import tensorflow as tf

    from stablerep_jax import fileio

    config = _config()
    config.num_captions = 24
    config.train.total_steps = 4
    config.train.log_every = 2
    config.train.batch_size = 8
    config.baselines = ()
    config.probe_train_images = 8
    config.probe_test_images = 8
    config.probe.epochs = 2
    config.checkpoint_dir = str(tmp_path / "checkpoints")
    monkeypatch.chdir(tmp_path)
    summary = comparison.run(config, ram_dir)

    saved = fileio.read_json(f"{ram_dir}/demo_results.json")
    assert saved == json.loads(json.dumps(summary))
    report = fileio.read_bytes(f"{ram_dir}/report.md").decode("utf-8")
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert fileio.read_bytes(f"{ram_dir}/{name}")[:8] == b"\x89PNG\r\n\x1a\n", name
    assert len(tf.io.gfile.glob(f"{ram_dir}/data/synthetic/*.tfrecord")) >= 1
    assert len(tf.io.gfile.glob(f"{ram_dir}/data/real/*.tfrecord")) >= 1
    assert fileio.exists(f"{ram_dir}/data/probe_set/probe_set.json")
    assert [json.loads(line)["step"] for line in fileio.read_bytes(
        f"{ram_dir}/stablerep/metrics.jsonl").decode().splitlines()] == [2, 4]
    assert sorted(fileio.read_json(f"{ram_dir}/probe/stablerep.json")) == sorted(
        config.probe_attributes)
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]     # no local "ram:" folder
