"""The benchmark scripts still run end to end and print their tables (tiny sizes; no timing is
checked: the numbers are for people, the tests only keep the scripts from rotting)."""
import json
import os
import subprocess
import sys

import pytest

from processes import without_tensorflow
from tiny_sd import write_tiny_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str, returncode: int = 0, without_tf: bool = False) -> str:
    """Runs a benchmark script on one CPU device, like a user; `without_tf`: in a process where
    TensorFlow is not installed (tests/without_tensorflow), as on the accelerator image."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}   # one device, like a user
    env["JAX_PLATFORMS"] = "cpu"
    if without_tf:
        env = without_tensorflow(env)
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
               "--views", "2", "--steps", "1", "--mlp_dim", "64", "--emb_dim", "16",
               "--peak_tflops", "1", without_tf=True)
    assert "ratio jax/torch images/s" in out and "utilisation" in out
    assert "GFLOP/image (model count)" in out and "data-sheet peak 1 TFLOP/s -> MFU" in out
    assert "colour stage in the JAX step" in out


def test_sizing_rejects_a_bad_projection_before_measuring(capsys):
    """The argument check that `main` runs first, before any measurement (usage error: 2)."""
    sizing = _benchmark_module("sizing.py")
    with pytest.raises(SystemExit) as stop:
        sizing._args(["--project", "H100"])
    assert stop.value.code == 2
    assert "--project 'H100': expected NAME=PEAK_TFLOPS" in capsys.readouterr().err
    assert sizing._args(["--project", "A=1.5,B=2"]).project == [("A", 1.5), ("B", 2.0)]


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
    # 4 captions x 2 uint8 views + their 12 float32 colour parameters, int32 labels
    batch = 4 * 2 * 32 * 32 * 3 + 4 * 2 * 12 * 4 + 4 * 4
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


@pytest.mark.slow
def test_memory_benchmark_counts_the_device_colour_stage():
    """The step takes uint8 views plus colour parameters, as the pipeline hands them to train,
    and finishes them itself: XLA counts the colour stage's FLOPs in the step measured, beyond
    those of the same step fed finished float32 views."""
    import jax
    import numpy as np

    from stablerep_jax import parallel, train
    from stablerep_jax.data import augment, device_augment
    memory = _memory_module()
    args = memory._args(_TINY + ["--devices", "1", "--remat", "off"])
    on = memory.measure(args)["rows"][0]
    config = memory.train_config(args, "stablerep", "tiny", False, 1)
    parts = train.build_training(config, parallel.make_mesh(jax.devices()[:1]), 100, 0)
    finished = {k: v for k, v in memory.abstract_batch(config).items() if k != augment.PARAMS_KEY}
    finished["images"] = jax.ShapeDtypeStruct(finished["images"].shape, np.float32)
    off = train.compiled_flops(parts.step_fn.lower(parts.abstract_state, finished).compile())
    views = 4 * 2
    spec = augment.AugmentSpec(size=32, recipe="strong", dtype="float32")
    stage = train.compiled_flops(jax.jit(lambda x, p: device_augment.finish_views(
        x, p, spec)).lower(jax.ShapeDtypeStruct((views, 32, 32, 3), np.uint8),
                           jax.ShapeDtypeStruct((views, 12), np.float32)).compile())
    assert stage > 0
    assert on["flops"] - off > 0.5 * stage, (on["flops"], off, stage)


def test_benchmark_batches_are_the_pipelines():
    """train_step.py's (and so sizing.py's) random batch has memory.py's shapes and dtypes,
    uint8 views with colour parameters a real view could have."""
    import argparse

    import numpy as np

    from stablerep_jax.data import augment
    bench = _benchmark_module("train_step.py")
    config = bench.make_config(argparse.Namespace(
        captions=3, views=2, image_size=16, variant="tiny", mlp_dim=8, emb_dim=4,
        dtype="bfloat16"))
    batch = bench.random_batch(config)
    specs = bench.memory.abstract_batch(config)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == \
        {k: (v.shape, v.dtype) for k, v in specs.items()}
    assert augment.PARAMS_KEY in batch and batch["images"].dtype == np.uint8
    params = bench.random_view_params(np.random.default_rng(1), (500,))
    for flag in (augment.P_JITTER, augment.P_GRAY, augment.P_BLUR):
        assert set(np.unique(params[:, flag])) == {0.0, 1.0}
    assert (np.sort(params[:, augment.P_ORDER], axis=1) == np.arange(4)).all()
    b, c, s, h = augment.JITTER
    factors = params[:, augment.P_FACTORS]
    assert (np.abs(factors[:, :3] - 1) <= max(b, c, s)).all() and (np.abs(factors[:, 3]) <= h).all()
    assert (params[:, augment.P_SIGMA] >= augment.BLUR_SIGMA[0]).all()
    assert (params[:, augment.P_SIGMA] <= augment.BLUR_SIGMA[1]).all()


def test_memory_fits_uses_each_chips_capacity():
    memory = _memory_module()
    gib = memory.GIB
    assert memory.fits(16 * gib) == ["TPU v5e", "TPU v4", "A100/H100 80GB", "TPU v5p"]
    assert memory.fits(16 * gib + 1) == ["TPU v4", "A100/H100 80GB", "TPU v5p"]
    assert memory.fits(90 * gib) == ["TPU v5p"]
    assert memory.fits(96 * gib) == []


IN_CI = os.environ.get("CI", "").lower() == "true"


def libtpu_path() -> str | None:
    """A folder holding the libtpu package ($STABLEREP_LIBTPU_PATH, which .ci/run fills), "" if
    libtpu is importable as installed, None if neither."""
    import importlib.util
    folder = os.environ.get("STABLEREP_LIBTPU_PATH", "")
    if folder and os.path.isfile(os.path.join(folder, "libtpu", "__init__.py")):
        return folder
    return "" if importlib.util.find_spec("libtpu") else None


@pytest.mark.slow
def test_remat_lowers_temporaries_on_the_tpu_compiler(tmp_path):
    """XLA's TPU compiler keeps remat's recomputation in the backward pass (the CPU compiler
    folds it back into the forward pass), so its temporaries must drop. Deviceless: needs the
    libtpu wheel, not a TPU; in a process of its own, so no other test sees a TPU plugin.
    .ci/run installs libtpu outside the venv; under CI=true its absence fails the test."""
    folder = libtpu_path()
    if folder is None:
        message = ("libtpu is not installed: set STABLEREP_LIBTPU_PATH to a folder filled by "
                   "`pip install --target DIR libtpu==0.0.42.1` (.ci/run does)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    # Activations must outweigh the rest: 4 blocks, 65 tokens, 32 x 2 images (measured: 134 MB
    # of temporaries without remat, 33 MB with it, for 21% more FLOPs; with 2 blocks or 17
    # tokens the TPU compiler's temporaries barely move).
    _run("memory.py", "--variants", "tiny", "--depth", "4", "--captions", "32", "--views", "2",
         "--image_size", "64", "--patch_size", "8", "--mlp_dim", "64", "--emb_dim", "32",
         "--dtype", "float32", "--kinds", "stablerep", "--tpu_topology", "v5e:2x2",
         "--devices", "1", "--libtpu_path", folder, "--json", str(tmp_path / "m.json"))
    result = json.loads((tmp_path / "m.json").read_text())
    assert result["platform"] == "tpu"
    off, on = result["rows"]
    assert (off["remat"], on["remat"]) == ("off", "on")
    assert on["temp"] < 0.5 * off["temp"], (on["temp"], off["temp"])
    assert on["flops"] > off["flops"]


def test_ci_installs_the_libtpu_that_this_jax_asks_for(repo_root):
    """.ci/run's libtpu pin satisfies the installed jax's own [tpu] requirement, so the remat
    test compiles with the TPU compiler this jax was released with."""
    import importlib.metadata
    import re

    from packaging.requirements import Requirement
    pin = re.search(r"^LIBTPU_VERSION=(\S+)$", (repo_root / ".ci" / "run").read_text(), re.M)
    assert pin, ".ci/run sets no LIBTPU_VERSION"
    wanted = [Requirement(r) for r in importlib.metadata.requires("jax") or []
              if r.startswith("libtpu")]
    assert wanted, "jax declares no libtpu requirement"
    assert any(req.specifier.contains(pin.group(1)) for req in wanted), (pin.group(1), wanted)


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
    assert a["train_bytes_per_device"] == 2048 // 8 * (32 * 4 + 4)   # split by rows over 8
    assert b["epoch_bytes"] == 2048 * (32 * 4 + 4)
    assert b["eval_bytes"] == 504 * (32 * 4 + 4 + 1)      # 500 padded to the 8 devices
    bench.print_epoch_timing(r)
    assert "ratio (b)/(a)" in capsys.readouterr().out


# benchmarks/accelerator.py: the prepared accelerator run, here at tiny sizes on the CPU.


@pytest.mark.slow
def test_accelerator_run_writes_every_part_and_a_summary(tmp_path):
    """The whole chain (preflight, a random SD, generate.py against diffusers' PyTorch and on
    XLA attention, train_step.py against PyTorch, the train levers, the sampler's batch sweep,
    memory.py) runs at tiny sizes in a process where TensorFlow cannot be imported, as on the
    accelerator image; every part leaves a log, the JSON parts parse, and the summary's rows
    are the parts' own numbers."""
    out = tmp_path / "results"
    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "accelerator.py"), "--tiny",
                    "--out", str(out)], cwd=REPO, check=True, timeout=1500,
                   env=without_tensorflow(dict(os.environ)))
    summary = json.loads((out / "summary.json").read_text())
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == ["preflight", "sd_model", "generate", "generate:xla", "train_step",
                           "levers:attention", "gen_sweep", "levers:batch", "levers:profile",
                           "levers:xla_flags", "memory"]
    assert all(p["status"] == "ok" for p in parts.values()), parts
    for p in parts.values():
        assert (out / p["log"]).stat().st_size > 0
    assert json.loads((out / "preflight.json").read_text())["platform"] == "cpu"
    rows = summary["rows"]
    generate = json.loads((out / "generate.json").read_text())
    headline = next(r for r in rows if r.get("vs_pytorch") and r["job"].startswith("generation"))
    assert headline["images_per_s"] == generate["ours"]["images_per_s"] > 0
    assert headline["vs_pytorch"] == pytest.approx(generate["ratio"])
    assert generate["pixel_difference"]["max"] <= 1            # float32, same latents
    assert headline["flops_per_image"] == generate["ours"]["flops_per_image"] > 0
    assert summary["measured_peak_flops"] == generate["matmul_peak_tflops"] * 1e12 > 0
    sweep = json.loads((out / "gen_sweep.json").read_text())["sweep"]
    assert [r["batch"] for r in sweep] == [2, 3]
    train = json.loads((out / "train_step.json").read_text())
    training = next(r for r in rows if r["job"].startswith("training") and r.get("vs_pytorch"))
    assert training["images_per_s"] == train["images_per_s"] > 0
    assert training["vs_pytorch"] == pytest.approx(train["vs_torch"])
    assert training["utilisation_published"] is None     # no published peak for a CPU
    text = (out / "summary.md").read_text()
    assert "top 10 ops" in text and "| job |" in text
    memory = json.loads((out / "memory.json").read_text())
    assert summary["xla_memory_analysis_peak_bytes"] == memory["rows"][0]["peak"] > 0
    assert summary["results"]["generate"] == generate       # summary.json alone holds all

    # The train levers, each part one train_levers.py process without TensorFlow.
    profile = summary["results"]["levers:profile"]["profile"]
    assert profile["platform"] == "cpu" and 0 < len(profile["top"]) <= 10
    assert profile["op_ms_per_step"] > 0 and os.path.isfile(profile["xplane"])
    shares = [op["share"] for op in profile["top"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert all(op["count"] >= 1 and op["ms_per_step"] > 0 for op in profile["top"])
    assert "top 10 ops by device time" in (out / parts["levers:profile"]["log"]).read_text()

    rows = summary["results"]["levers:batch"]["batch"]["rows"]      # one process per batch
    assert [(r["captions"], r["images_per_step"]) for r in rows] == [(3, 6)]
    assert "error" not in rows[0], rows[0]
    assert rows[0]["images_per_s_per_chip"] > 0 and rows[0]["tflops_per_sec_per_chip"] > 0
    assert rows[0]["mfu"] is None                  # no data-sheet peak for a CPU
    assert rows[0]["xla_peak_bytes"] > 0 and rows[0]["allocator_peak_bytes"] is None
    assert "| 3 x 2 | 6 |" in (out / parts["levers:batch"]["log"]).read_text()

    flag_rows = {r["setting"]: r
                 for r in summary["results"]["levers:xla_flags"]["xla_flags"]["rows"]}
    assert list(flag_rows) == ["off", "job"]      # one process each, flags in its XLA_FLAGS
    assert flag_rows["off"]["flags"] == [] and flag_rows["off"]["vs_off"] == 1.0
    for flag in flag_rows["job"]["flags"]:
        assert flag in flag_rows["job"]["xla_flags"]       # what that process's XLA read
        assert flag not in flag_rows["off"]["xla_flags"]
    assert flag_rows["job"]["images_per_s_per_chip"] > 0

    kinds = {(r["attention"], r["attention_pad_to"]): r
             for r in summary["results"]["levers:attention"]["attention"]["rows"]}
    assert list(kinds) == [("xla", 2), ("cudnn", 64)]              # as asked, in order
    assert kinds[("xla", 2)]["images_per_s_per_chip"] > 0
    assert "bfloat16" in kinds[("cudnn", 64)]["skipped"]          # float32 on a CPU


def _accelerator_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "accelerator_bench", os.path.join(REPO, "benchmarks", "accelerator.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_accelerator_part_is_killed_at_its_timeout_and_skips_are_told_apart():
    """A part past its limit is killed with its whole process group and recorded as timed out;
    exit status EXIT_UNSUPPORTED reads as skipped with the part's last line as the reason."""
    import time
    acc = _accelerator_module()
    sleeper = acc.Part("sleeper", [sys.executable, "-c",
                                   "import subprocess, sys, time; print('started', flush=True);"
                                   "subprocess.Popen([sys.executable, '-c', 'import time; "
                                   "time.sleep(60)']); time.sleep(60)"], 60)
    start = time.monotonic()
    status, detail, wall, output = acc.run_part(sleeper, 2)
    # A survivor would hold the output pipe open: the reader would wait its 10 s out.
    assert (status, output) == ("timed out", "started\n") and time.monotonic() - start < 10
    unsupported = acc.Part("unsupported", [sys.executable, "-c",
                                           "print('no cuDNN here'); raise SystemExit(3)"], 60)
    assert acc.run_part(unsupported, 30)[:2] == ("skipped", "no cuDNN here")


def test_accelerator_plan_skips_what_this_machine_cannot_run():
    """Missing packages and a non-GPU backend turn parts into skips with the reason, before
    anything is started; on a GPU with CUDA PyTorch the comparisons with PyTorch run."""
    acc = _accelerator_module()
    args = acc._args([])
    cpu = {p.name: p for p in acc.plan_parts(args, "/scratch", dict(
        platform="cpu", missing=["tensorflow", "timm"], cuda_torch=False))}
    assert cpu["train_step"].skip == "missing Python packages: timm"
    assert not cpu["levers:attention"].skip                 # nothing needs TensorFlow
    assert cpu["sd_model"].skip == "" and "--skip-torch" in cpu["generate"].argv
    assert "--skip_torch" in cpu["train_step"].argv
    only = {p.name: p.skip for p in acc.plan_parts(acc._args(["--parts", "generate,levers"]),
                                                   "/scratch", dict(platform="gpu"))}
    assert not only["generate"] and not only["generate:xla"] and not only["levers:batch"]
    assert only["gen_sweep"] == only["train_step"] == "not in --parts"
    gpu = {p.name: p for p in acc.plan_parts(args, "/scratch", dict(
        platform="gpu", missing=[], cuda_torch=True))}
    assert not any(p.skip for p in gpu.values())
    assert "--skip_torch" not in gpu["train_step"].argv
    assert gpu["generate"].env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert acc.published_peak(args, "NVIDIA H200")[0] == 989e12
    assert acc.published_peak(acc._args(["--published_peak_tflops", "700"]), "NVIDIA H200")[0] \
        == 700e12


# benchmarks/train_levers.py: the levers of the step's speed per chip, at tiny sizes on a CPU.


def _levers():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "train_levers_bench", os.path.join(REPO, "benchmarks", "train_levers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module       # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_train_levers_measure_and_profile_in_process(tmp_path):
    """The functions the subprocesses run: `measure` (MFU against a given peak) and
    `profile_step` (the top ops parsed from the .xplane.pb with jax.profiler's ProfileData)."""
    levers = _levers()
    sizes = levers.sizes_for(tiny=True)
    r = levers.measure(sizes, captions=2, peak_flops=1e12)
    assert r["images_per_step"] == 4 and r["chips"] == 1
    assert r["mfu"] == pytest.approx(r["tflops_per_sec_per_chip"] * 1e12 / 1e12)
    assert r["model_flops_per_step"] == 4 * r["model_flops_per_image"] > 0
    assert r["attention"] == "auto" and r["attention_pad_to"] == 2     # the config's default
    assert r["xla_flops_per_step_per_chip"] > 0                        # the cross-check
    p = levers.profile_step(sizes, str(tmp_path / "trace"), steps=2, top=3)
    assert len(p["top"]) == 3 and p["steps"] == 2 and p["distinct_ops"] >= 3
    assert p["xplane"].startswith(str(tmp_path / "trace"))
    totals, source = levers.op_times(p["xplane"])
    assert "host plane" in source and max(ns for ns, _ in totals.values()) > 0
    assert levers.table(p).count("\n") == 3 + 3


def test_train_levers_record_a_failing_setting_and_check_names():
    """A setting that fails (here a bad model.attention) is a row with its error, not the end
    of the sweep; unknown candidate flags stop before anything runs; tables show errors."""
    levers = _levers()
    r = levers.measure_in_subprocess(levers.sizes_for(tiny=True), attention="flash",
                                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert "model.attention='flash'" in r["error"] and r["wall_s"] > 0
    with pytest.raises(ValueError, match="unknown candidate flag"):
        levers.flag_settings(("no_such_flag",))
    from stablerep_jax import xla_flags
    settings = levers.flag_settings("all")
    assert list(settings)[:2] == ["off", "job"]
    assert len(settings) == 2 + len(xla_flags.CANDIDATE_GPU_FLAGS)
    text = levers.table(dict(lever="batch", views=6, rows=[
        dict(captions=172, images_per_step=1032, error="RESOURCE_EXHAUSTED: out of memory")]))
    assert "| 172 x 6 | 1032 | error: RESOURCE_EXHAUSTED: out of memory |" in text


@pytest.mark.slow
def test_memory_benchmark_runs_without_tensorflow(tmp_path):
    _run("memory.py", *_TINY, "--devices", "1", "--remat", "off", "--json",
         str(tmp_path / "m.json"), without_tf=True)
    row = json.loads((tmp_path / "m.json").read_text())["rows"][0]
    assert row["peak"] > 0 and row["flops"] > 0 and row["model_flops"] > 0
