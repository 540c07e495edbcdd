"""The benchmark scripts still run end to end and print their tables (tiny sizes; no timing is
checked: the numbers are for people, the tests only keep the scripts from rotting)."""
import json
import os
import subprocess
import sys

import pytest

from tiny_sd import write_tiny_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, returncode: int = 0) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one device, like a user
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == returncode, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_sizing_measures_both_jobs_and_prices_cc12m(tmp_path):
    model = write_tiny_sd(str(tmp_path / "sd"))
    out = _run("sizing.py", "--sd_model", model, "--gen_resolution", "32", "--gen_steps", "2",
               "--gen_batch", "2", "--gen_repeats", "1", "--variant", "tiny", "--image_size",
               "32", "--train_captions", "2", "--views", "2", "--train_steps", "1",
               "--dtype", "float32", "--project", "X=100", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    for job in ("generation", "training"):
        assert result[job]["images_per_s"] > 0 and result[job]["flops_per_image"] > 0
        assert f"| {job} |" in out
    # Chip-hours follow from the rates: 10M captions x 10 images; 15 epochs x 10M x 2 views.
    hours = result["cc12m_chip_hours"]
    assert hours["generation"] == pytest.approx(1e8 / result["generation"]["images_per_s"] / 3600)
    assert hours["training"] == pytest.approx(3e8 / result["training"]["images_per_s"] / 3600)
    assert "projection: 100 TFLOP/s peak x 40%, not measured" in out


@pytest.mark.slow
def test_train_step_benchmark_compares_with_pytorch():
    pytest.importorskip("timm")
    out = _run("train_step.py", "--variant", "tiny", "--image_size", "32", "--captions", "2",
               "--views", "2", "--steps", "1", "--mlp_dim", "64", "--emb_dim", "16")
    assert "ratio jax/torch images/s" in out and "utilisation" in out


def test_sizing_rejects_a_bad_projection_before_measuring():
    out = _run("sizing.py", "--project", "H100", returncode=2)
    assert "--project 'H100': expected NAME=PEAK_TFLOPS" in out
    assert "matmul peak" not in out


def _memory_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("memory_bench",
                                                  os.path.join(REPO, "benchmarks", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_TINY = ["--variants", "tiny", "--depth", "2", "--captions", "4", "--views", "2",
         "--image_size", "32", "--patch_size", "8", "--mlp_dim", "64", "--emb_dim", "32",
         "--dtype", "float32", "--kinds", "stablerep"]


@pytest.mark.slow
def test_memory_benchmark_reports_per_device_bytes_of_the_real_step(tmp_path):
    """Arguments per device = replicated params + this device's ZeRO-1 share of the moments +
    its slice of the batch (computed here from the shardings); remat costs FLOPs; the table and
    the JSON carry every row."""
    import jax
    import numpy as np

    from stablerep_jax import parallel, train
    memory = _memory_module()
    args = memory._args(_TINY + ["--devices", "2", "--json", str(tmp_path / "m.json")])
    results = memory.measure(args)
    off, on = results["rows"]
    assert (off["remat"], on["remat"], results["devices"]) == ("off", "on", 2)
    config = memory.train_config(args, "stablerep", "tiny", False, 2)
    parts = train.build_training(config, parallel.make_mesh(jax.devices()[:2]), 100, 0)

    def device_bytes(abstract, sharding):
        return np.prod(sharding.shard_shape(abstract.shape)) * abstract.dtype.itemsize

    state = sum(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        device_bytes, parts.abstract_state, parts.shardings)))
    batch = 4 * 2 * 32 * 32 * 3 * 4 + 4 * 4      # 4 captions x 2 float32 images, int32 labels
    assert off["argument"] == state + batch
    assert off["argument"] == on["argument"]
    assert off["peak"] == off["argument"] + off["output"] - off["alias"] + off["temp"]
    assert on["flops"] > 1.1 * off["flops"] > 0          # remat recomputes the blocks' forward
    # A bigger per-device batch needs more temporaries, never fewer.
    bigger = memory.measure(memory._args(_TINY + ["--devices", "2", "--captions", "16",
                                                  "--remat", "off"]))["rows"][0]
    assert bigger["temp"] > off["temp"]
    text = memory.table(results)
    assert "| ViT-tiny stablerep | on |" in text and "(+" in text
    memory.main(_TINY + ["--devices", "2", "--remat", "off", "--json", str(tmp_path / "m.json")])
    assert json.loads((tmp_path / "m.json").read_text())["rows"][0]["argument"] == off["argument"]


def test_memory_fits_uses_each_chips_capacity():
    memory = _memory_module()
    gib = memory.GIB
    assert memory.fits(16 * gib) == ["TPU v5e", "TPU v4", "A100/H100 80GB", "TPU v5p"]
    assert memory.fits(16 * gib + 1) == ["TPU v4", "A100/H100 80GB", "TPU v5p"]
    assert memory.fits(90 * gib) == ["TPU v5p"]
    assert memory.fits(96 * gib) == []


@pytest.mark.slow
def test_remat_lowers_temporaries_on_the_tpu_compiler():
    """XLA's TPU compiler keeps remat's recomputation in the backward pass (the CPU compiler
    folds it back into the forward pass), so its temporaries must drop. Deviceless: needs the
    libtpu wheel, not a TPU."""
    import importlib.util
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install libtpu): no TPU compiler here")
    memory = _memory_module()
    # Activations must outweigh the rest: 4 blocks, 65 tokens, 32 x 2 images (measured: 134 MB
    # of temporaries without remat, 33 MB with it, for 21% more FLOPs).
    args = memory._args(["--variants", "tiny", "--depth", "4", "--captions", "32", "--views", "2",
                         "--image_size", "64", "--patch_size", "8", "--mlp_dim", "64",
                         "--emb_dim", "32", "--dtype", "float32", "--kinds", "stablerep",
                         "--tpu_topology", "v5e:2x2", "--devices", "1"])
    off, on = memory.measure(args)["rows"]
    assert on["temp"] < 0.5 * off["temp"], (on["temp"], off["temp"])
    assert on["flops"] > off["flops"]


def _benchmark_module(script: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(script.replace(".py", "_bench"),
                                                  os.path.join(REPO, "benchmarks", script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_epoch_timing_trains_the_same_heads_on_device_and_through_the_host(capsys):
    """--epoch-timing's two cached-features paths (today's on-device epoch, and the host round
    trip it replaced) learn separable random data, to the same accuracy and the same heads (same
    init and data order); (b) uploads the permuted features every epoch, (a) only the order."""
    import numpy as np

    bench = _benchmark_module("probe_sweep.py")
    args = bench.make_parser().parse_args([
        "--epoch-timing", "--num", "2048", "--dim", "32", "--classes", "10", "--batch", "256",
        "--lrs", "2", "--epochs", "3", "--test-num", "500", "--signal", "1"])
    r = bench.epoch_timing(args)
    a, b = r["on_device"], r["host_round_trip"]
    assert r["steps"] == 8
    for v in (a, b):
        assert len(v["epoch_s"]) == 3 and len(v["eval_s"]) == 2
        assert v["top1"].max() > 0.9                              # chance: 0.1
    np.testing.assert_allclose(a["kernel"], b["kernel"], rtol=1e-4, atol=1e-5)
    assert np.max(np.abs(a["top1"] - b["top1"])) <= 1 / 500
    assert a["epoch_bytes"] == 2048 * 4
    assert b["epoch_bytes"] == 2048 * (32 * 4 + 4)
    assert b["eval_bytes"] == 504 * (32 * 4 + 4 + 1)      # 500 padded to the 8 devices
    bench.print_epoch_timing(r)
    assert "ratio (b)/(a)" in capsys.readouterr().out
