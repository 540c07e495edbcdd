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
