"""generate: captions -> K images per caption with a tiny random Stable Diffusion (saved as a
diffusers PyTorch pipeline folder and loaded by our Flax modules, the path users take) on 8
simulated devices -> TFRecords.

Pins: every caption gets K decodable, distinct images of the saved size; images do not depend on
device count, batch size, padding, host split or resume point; bad inputs fail before any model
or device work. Samplers are built once per module (compilation dominates on CPU).
"""
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stablerep_jax import config_utils, contact_sheet, fileio, generate
from stablerep_jax.data import records
from stablerep_jax.data.train_set import TrainSet
from stablerep_jax.generation import captions as captions_lib
from stablerep_jax.generation import sampler as sampler_lib
from processes import run_processes
from tiny_sd import write_tiny_sd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = " ".join(["photograph"] * 90)             # > 77 tokens: truncated and counted
CAPTIONS = ["a red cat", "", "a blue dog on grass", "a red cat", LONG, "a tree", "   ",
            "two boats", "a yellow house"]           # 7 kept (ids 0..6), 2 blank
KEPT = [c for c in CAPTIONS if c.strip()]
K = 2


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _write_captions(path, lines=CAPTIONS):
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _config(model, captions, output_dir, **fields):
    config = config_utils.load_config(os.path.join(REPO, "configs", "generate.py") + ":tiny")
    overrides = {"model": model, "captions": captions, "output_dir": str(output_dir),
                 "images_per_caption": K, "captions_per_shard": 3, **fields}
    return config_utils.apply_overrides(config, overrides)


def _read_output(output_dir):
    """caption_id -> record, over every finished shard in the directory (local or a URL)."""
    out = {}
    for name in sorted(tf.io.gfile.listdir(str(output_dir))):
        if name.endswith(records.SHARD_SUFFIX):
            for rec in records.read_records(os.path.join(output_dir, name)):
                assert rec.caption_id not in out, f"caption {rec.caption_id} written twice"
                out[rec.caption_id] = rec
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_sd(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="module")
def captions_file(tmp_path_factory):
    return _write_captions(tmp_path_factory.mktemp("captions") / "captions.txt")


def _sampler(model, devices, per_device_batch, **settings):
    config = _config(model, "unused.txt", "unused")
    config_utils.apply_overrides(config, settings)
    return sampler_lib.make_sampler(model, generate.sampling_settings(config), devices=devices,
                                    per_device_batch=per_device_batch)


@pytest.fixture(scope="module")
def sampler8(model):
    """8 devices x 1 image: the reference layout of this module."""
    assert jax.local_device_count() == 8
    return _sampler(model, jax.local_devices(), 1)


@pytest.fixture(scope="module")
def reference(model, captions_file, sampler8, tmp_path_factory):
    """An uninterrupted single-host PNG run: (output dir, summary, records by caption id)."""
    out = tmp_path_factory.mktemp("reference")
    summary = generate.run(_config(model, captions_file, out), sampler=sampler8)
    return out, summary, _read_output(out)


def test_every_caption_gets_k_distinct_decodable_images_of_the_saved_size(
        model, captions_file, sampler8, tmp_path):
    out = tmp_path / "out"
    summary = generate.run(_config(model, captions_file, out, image_format="jpeg",
                                   save_size=16), sampler=sampler8)
    recs = _read_output(out)
    assert sorted(recs) == list(range(len(KEPT)))
    for cid, rec in recs.items():
        assert rec.caption == KEPT[cid]
        assert rec.seeds == [0, 1]
        images = [_decode(b) for b in rec.images]
        assert len(images) == K and all(im.shape == (16, 16, 3) for im in images)
        assert rec.images[0][:3] == b"\xff\xd8\xff"                           # JPEG
        assert np.abs(images[0].astype(int) - images[1]).mean() > 10, f"caption {cid}: K alike"
    same_text = [_decode(recs[i].images[0]).astype(int) for i in (0, 2)]      # "a red cat" x2
    assert KEPT[0] == KEPT[2] and np.abs(same_text[0] - same_text[1]).mean() > 10

    manifest = records.read_manifest(str(out))
    assert manifest["complete"] and manifest["num_shards"] == 3
    assert (manifest["num_captions"], manifest["num_images"]) == (7, 14)
    assert manifest["images_per_caption"] == K
    assert TrainSet.resolve(str(out / "*.tfrecord")).counts == (3, 3, 1)
    assert summary["images"] == 14 and summary["devices"] == 8
    assert summary["blank_lines_skipped"] == 2 and summary["truncated_captions"] == 1
    assert summary["images_per_s"] > 0
    assert json.loads((out / "summary.json").read_text())["images"] == 14
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == contact_sheet.contact_sheet([("x", [np.zeros((4, 4, 3))] * K)] * 3).size
    assert not [n for n in os.listdir(out) if n.endswith(records.TMP_SUFFIX)]


def test_padding_a_batch_changes_no_image(model, sampler8):
    ids, _ = sampler8.prompt_ids(["a red cat", "a tree", "two boats"] * 3)
    seeds, cids = list(range(8)), [5, 6, 7, 8, 9, 10, 11, 12]
    full = sampler8.sample(ids[:8], seeds, cids)
    part = sampler8.sample(ids[:3], seeds[:3], cids[:3])     # 5 padded rows
    np.testing.assert_array_equal(part, full[:3])


# Bounds on how much an image may change with the batch shape (device count x per-device batch),
# in levels of 0..255. Other shapes compile to other kernels, so float rounding differs; measured
# with `benchmarks/generate.py --layouts` (README, generate section): float32 at most 1 level
# (4 of 98,304 values), bfloat16 max 3, mean 0.36, 35% of values changed (2026-12-04). A
# batch-dependent latent or prompt would change images by tens of levels on average (see the
# K-distinct check above), so these bounds still catch that.
FP32_MAX_LEVELS, FP32_MEAN_LEVELS = 2, 0.05
BF16_MAX_LEVELS, BF16_MEAN_LEVELS = 8, 1.5


@pytest.mark.parametrize("devices,per_device_batch", [(1, 3), (8, 2)])
def test_float32_images_depend_on_the_batch_shape_by_rounding_only(
        model, captions_file, reference, devices, per_device_batch, tmp_path):
    sampler = _sampler(model, jax.local_devices()[:devices], per_device_batch)
    out = tmp_path / "out"
    generate.run(_config(model, captions_file, out), sampler=sampler)
    recs = _read_output(out)
    assert sorted(recs) == sorted(reference[2])
    for cid, rec in recs.items():
        for mine, ref in zip(rec.images, reference[2][cid].images):
            diff = np.abs(_decode(mine).astype(int) - _decode(ref))
            assert diff.max() <= FP32_MAX_LEVELS and diff.mean() < FP32_MEAN_LEVELS, (
                f"caption {cid}: max diff {diff.max()}, mean {diff.mean():.3f}")


@pytest.fixture(scope="module")
def bf16_wide(model):
    """bfloat16, the default dtype: 8 devices x 1 image."""
    return _sampler(model, jax.local_devices(), 1, dtype="bfloat16")


@pytest.mark.slow
def test_bfloat16_images_depend_on_the_batch_shape_within_the_stated_bound(model, bf16_wide):
    """Two bfloat16 compilations (~40 s on 2 cores): 8 devices x 1 image vs 1 device x 4."""
    wide = bf16_wide
    deep = _sampler(model, jax.local_devices()[:1], 4, dtype="bfloat16")
    ids, _ = wide.prompt_ids(["a red cat", "a blue dog on grass", "a tree", "two boats"] * 2)
    seeds, cids = [0] * 4 + [1] * 4, [0, 1, 2, 3] * 2
    one_call = wide.sample(ids, seeds, cids)
    two_calls = np.concatenate([deep.sample(ids[:4], seeds[:4], cids[:4]),
                                deep.sample(ids[4:], seeds[4:], cids[4:])])
    diff = np.abs(one_call.astype(int) - two_calls)
    assert diff.max() <= BF16_MAX_LEVELS and diff.mean() <= BF16_MEAN_LEVELS, (
        f"max diff {diff.max()}, mean {diff.mean():.3f}")


@pytest.mark.slow
def test_a_bfloat16_resume_with_the_same_devices_and_batch_is_bit_exact(
        model, captions_file, bf16_wide, tmp_path):
    """The default dtype (float32 is pinned by the fast resume test below); one bfloat16
    compilation, ~30 s on 2 cores."""
    wide = bf16_wide
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    generate.run(_config(model, captions_file, whole, dtype="bfloat16"), sampler=wide)
    generate.run(_config(model, captions_file, resumed, dtype="bfloat16", stop_after_shards=1),
                 sampler=wide)
    second = generate.run(_config(model, captions_file, resumed, dtype="bfloat16"), sampler=wide)
    assert second["shards_written"] == 2
    expected, got = _read_output(whole), _read_output(resumed)
    assert sorted(got) == sorted(expected) == list(range(len(KEPT)))
    for cid, rec in got.items():
        assert rec.images == expected[cid].images, f"caption {cid}: bytes differ after resume"


def test_a_killed_run_resumes_to_the_uninterrupted_output(model, captions_file, sampler8,
                                                           reference, tmp_path):
    out = tmp_path / "out"
    first = generate.run(_config(model, captions_file, out, stop_after_shards=1),
                         sampler=sampler8)
    assert first["shards_written"] == 1
    names = sorted(n for n in os.listdir(out) if n.endswith(records.SHARD_SUFFIX))
    assert names == ["train-00000-of-00003.tfrecord"]
    partial = records.read_manifest(str(out))
    assert not partial["complete"] and partial["num_captions"] == 3
    # Kills during shard writes leave temporary files behind (older versions' NAME.tmp, and
    # today's per-process names); the rerun removes them with the shards it redoes.
    (out / ("train-00001-of-00003.tfrecord" + records.TMP_SUFFIX)).write_bytes(b"half a shard")
    with open(fileio.temp_name(str(out / "train-00002-of-00003.tfrecord")), "wb") as f:
        f.write(b"another half")

    second = generate.run(_config(model, captions_file, out), sampler=sampler8)
    assert second["shards_written"] == 2 and second["captions"] == 4   # shard 0 kept
    recs = _read_output(out)
    assert sorted(recs) == sorted(reference[2])
    for cid, rec in recs.items():
        ref = reference[2][cid]
        assert (rec.caption, rec.seeds, rec.images) == (ref.caption, ref.seeds, ref.images)
    assert records.read_manifest(str(out))["shards"] == records.read_manifest(
        str(reference[0]))["shards"]
    assert not [n for n in os.listdir(out) if n.endswith(records.TMP_SUFFIX)]


def _same_output(out, expected_dir):
    """Every shard of an uninterrupted run's output, record for record (bytes of the images)."""
    got, expected = _read_output(out), _read_output(expected_dir)
    assert sorted(got) == sorted(expected)
    for cid, rec in got.items():
        ref = expected[cid]
        assert (rec.caption, rec.seeds, rec.images) == (ref.caption, ref.seeds, ref.images)
    assert records.read_manifest(str(out))["shards"] == records.read_manifest(
        str(expected_dir))["shards"]
    assert not [n for n in os.listdir(out) if n.endswith(records.TMP_SUFFIX)]


@pytest.fixture(scope="module")
def long_run(model, sampler8, tmp_path_factory):
    """30 captions (10 shards of 3, 60 images: 8 batches of 8 on sampler8) and the output of an
    uninterrupted run: (captions file, output dir)."""
    root = tmp_path_factory.mktemp("long")
    captions = _write_captions(root / "captions.txt",
                               [f"{c} number {i}" for i, c in enumerate(KEPT[:6] * 5)])
    generate.run(_config(model, captions, root / "straight"), sampler=sampler8)
    return captions, root / "straight"


def test_sigterm_drops_the_shard_being_sampled_and_a_rerun_completes(
        model, sampler8, long_run, tmp_path, monkeypatch):
    """generate ignored preemption (143 from SIGTERM). A notice now stops it before its next
    batch: the batches in flight finish, the shards they complete are written, the shard
    being sampled is dropped, host 0 writes the manifest over the shards on disk (incomplete)
    and the run says it was preempted (exit 75); the rerun equals an uninterrupted run."""
    import signal
    captions, straight = long_run
    real_dispatch, calls = sampler8.dispatch, []

    def dispatch_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_dispatch(*args, **kwargs)
    monkeypatch.setattr(sampler8, "dispatch", dispatch_then_sigterm)
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGTERM)
    summary, preempted = generate.run_until_preempted(_config(model, captions, out),
                                                      sampler=sampler8)
    assert signal.getsignal(signal.SIGTERM) is handler          # the watch put it back
    # Batches 0 and 1 (images 0-15) were in flight: shards 0 (images 0-5) and 1 (6-11) are
    # written, shard 2 (4 of its 6 images sampled) is dropped.
    assert preempted and summary["preempted"] and len(calls) == 2
    assert (summary["shards_written"], summary["captions"]) == (2, 6)
    names = sorted(n for n in os.listdir(out) if n.endswith(records.SHARD_SUFFIX))
    assert names == ["train-00000-of-00010.tfrecord", "train-00001-of-00010.tfrecord"]
    manifest = records.read_manifest(str(out))
    assert not manifest["complete"] and sorted(manifest["shards"]) == names
    assert not [n for n in os.listdir(out) if n.endswith(records.TMP_SUFFIX)]
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [(r["shards_written"], r["finished"]) for r in runs] == [(2, False)]
    monkeypatch.undo()

    rerun, preempted = generate.run_until_preempted(_config(model, captions, out),
                                                    sampler=sampler8)
    assert not preempted and rerun["shards_written"] == 8
    assert records.read_manifest(str(out))["complete"]
    _same_output(out, straight)


def test_sigterm_during_startup_stops_before_any_shard(model, captions_file, tmp_path,
                                                       monkeypatch):
    """Start-up (captions, model, compilation: minutes on a pod) ends at once on a notice."""
    import signal
    real_read = captions_lib.read_captions

    def read_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_read(*args, **kwargs)
    monkeypatch.setattr(captions_lib, "read_captions", read_then_sigterm)
    out = tmp_path / "out"
    assert generate.run_until_preempted(_config(model, captions_file, out)) == (None, True)
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_through_the_command_line_exits_75_and_a_rerun_completes(
        model, sampler8, long_run, tmp_path):
    """`python -m stablerep_jax.generate` (8 devices x 1 image, the batch shape of sampler8)
    gets SIGTERM once it has written its first shard: exit 75 (launch/generate_tpu.yaml
    recovers on 75 only), an incomplete manifest; the rerun's output equals an uninterrupted
    run's, byte for byte."""
    import signal
    captions, straight = long_run
    out = tmp_path / "out"
    command = [sys.executable, "-m", "stablerep_jax.generate", "--config=configs/generate.py:tiny",
               f"--config.model={model}", f"--config.captions={captions}",
               f"--config.output_dir={out}", f"--config.images_per_caption={K}",
               "--config.captions_per_shard=3"]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    for line in proc.stdout:                 # absl logs each shard it writes
        lines.append(line)
        if "wrote train-00000-of-00010.tfrecord" in line:
            proc.send_signal(signal.SIGTERM)
            break
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, output[-3000:]
    assert "stopped early to be resumed (exit code 75)" in output
    manifest = records.read_manifest(str(out))
    assert not manifest["complete"] and 1 <= manifest["num_shards"] < 10
    rerun = generate.run(_config(model, captions, out), sampler=sampler8)
    assert rerun["shards_written"] == 10 - manifest["num_shards"]
    _same_output(out, straight)


def test_a_summary_of_another_layout_is_refused_not_folded_in(tmp_path):
    """summary.json without its 'runs' list (a layout that kept one run's totals) is an error
    naming the file, not counted as one run."""
    path = str(tmp_path / "summary.json")
    assert generate.earlier_runs(path) == []
    fileio.write_json_atomic(path, {"runs": [{"images": 4}], "images": 4})
    assert generate.earlier_runs(path) == [{"images": 4}]
    fileio.write_json_atomic(path, {"images": 14, "seconds": 2.0, "devices": 8})
    with pytest.raises(ValueError, match=r"summary.json has no 'runs' list: .*another layout "
                                         r"of generate.*move it aside"):
        generate.earlier_runs(path)


@pytest.mark.slow
def test_sigterm_to_one_of_two_hosts_stops_both(model, sampler8, long_run, tmp_path):
    """Two processes: JAX's preemption notifier used to swallow the SIGTERM and the job ran on
    to the end. Host 0 alone is signalled after its first shard; the preemption sync point
    stops both hosts at one agreed batch, host 0 writes an incomplete manifest, both exit 75,
    and a rerun completes the output with every caption once."""
    import signal
    from processes import free_port
    captions, _ = long_run
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = os.path.join(REPO, "tests", "multiprocess_generate.py")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, script, str(i), "2", port, model, captions,
                               str(out)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if "wrote train-00000-of-00010.tfrecord" in line:
            procs[0].send_signal(signal.SIGTERM)
            break
    outputs = ["".join(lines) + procs[0].communicate(timeout=300)[0],
               procs[1].communicate(timeout=300)[0]]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 75, output[-3000:]
        assert "stopped (SIGTERM) after" in output, output[-3000:]
    manifest = records.read_manifest(str(out))
    assert not manifest["complete"] and manifest["num_shards"] < 10
    generate.run(_config(model, captions, out), sampler=sampler8)
    assert records.read_manifest(str(out))["complete"]
    assert sorted(_read_output(out)) == list(range(30))         # every caption, once


def test_summary_keeps_every_run_and_a_failed_runs_finished_shards(
        model, captions_file, sampler8, tmp_path, monkeypatch):
    """A resume adds its run to summary.json instead of replacing the earlier ones; a run that
    dies after writing a shard has already counted it (the summary follows every shard)."""
    out = tmp_path / "out"
    generate.run(_config(model, captions_file, out, stop_after_shards=1), sampler=sampler8)
    write_shard, writes = records.write_shard, []

    def die_at_second_shard(path, recs):
        writes.append(path)
        if len(writes) == 2:
            raise RuntimeError("simulated crash while writing a shard")
        return write_shard(path, recs)

    monkeypatch.setattr(records, "write_shard", die_at_second_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate.run(_config(model, captions_file, out), sampler=sampler8)
    monkeypatch.setattr(records, "write_shard", write_shard)
    partial = json.loads((out / "summary.json").read_text())
    assert [(r["shards_written"], r["finished"]) for r in partial["runs"]] == [(1, True),
                                                                             (1, False)]
    generate.run(_config(model, captions_file, out), sampler=sampler8)
    generate.run(_config(model, captions_file, out), sampler=sampler8)      # nothing left to do

    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert [r["shards_written"] for r in runs] == [1, 1, 1] and runs[-1]["finished"]
    assert summary["shards_written"] == summary["shards_total"] == 3
    assert (summary["captions"], summary["images"]) == (len(KEPT), len(KEPT) * K)
    assert sum(r["captions"] for r in runs) == len(_read_output(out))
    seconds = sum(r["seconds"] for r in runs)
    assert summary["seconds"] == pytest.approx(seconds)
    assert summary["images_per_s"] == pytest.approx(summary["images"] / seconds)
    assert summary["images_per_s_per_device"] == pytest.approx(summary["images"] / seconds / 8)


def test_two_hosts_write_disjoint_shards_that_hold_every_caption_once(
        model, captions_file, sampler8, reference, tmp_path):
    out = tmp_path / "out"
    host1 = generate.run(_config(model, captions_file, out), sampler=sampler8,
                         process_index=1, process_count=2)
    after_host1 = sorted(n for n in os.listdir(out) if n.endswith(records.SHARD_SUFFIX))
    assert after_host1 == ["train-00001-of-00003.tfrecord"] and host1["captions"] == 3
    assert not (out / records.MANIFEST_NAME).exists()            # host 0 writes it
    assert (out / "summary.host-00001-of-00002.json").exists()

    host0 = generate.run(_config(model, captions_file, out), sampler=sampler8,
                         process_index=0, process_count=2)
    assert host0["captions"] == 4                                 # shards 0 and 2
    recs = _read_output(out)                                      # asserts no duplicates
    assert sorted(recs) == list(range(len(KEPT)))
    assert all(recs[c].images == reference[2][c].images for c in recs)
    assert records.read_manifest(str(out))["complete"]


@pytest.mark.slow
def test_two_jax_processes_split_the_shards_and_host0_writes_the_manifest(
        model, captions_file, reference, tmp_path):
    """Two processes of the command line join jax.distributed through the flags every job takes
    (2 CPU devices each) and write disjoint shards; host 0 waits at the barrier for both before
    the manifest and the contact sheet; images match one host."""
    out = tmp_path / "out"
    outputs = run_processes(os.path.join(REPO, "tests", "multiprocess_generate.py"), 2,
                            model, captions_file, out)
    for i, output in enumerate(outputs):
        assert f"process {i} of 2; 2 local of 4 global devices" in output, output[-3000:]
    hosts = [json.loads((out / f"summary.host-0000{i}-of-00002.json").read_text())
             for i in range(2)]
    assert [(h["process_index"], h["process_count"]) for h in hosts] == [(0, 2), (1, 2)]
    assert [(h["shards_written"], h["captions"]) for h in hosts] == [(2, 4), (1, 3)]
    manifest = records.read_manifest(str(out))
    assert manifest["complete"] and len(manifest["shards"]) == 3
    assert (out / generate.CONTACT_SHEET_NAME).exists()
    recs = _read_output(out)                                        # asserts no duplicates
    assert sorted(recs) == list(range(len(KEPT)))
    assert all(recs[c].images == reference[2][c].images for c in recs)


def test_output_dir_may_be_a_gfile_url_where_reruns_resume(model, captions_file, sampler8,
                                                          reference, ram_dir):
    """ram:// takes the same tf.io.gfile path as gs://: every output file lands there, the shards
    read back, a killed run resumes and a finished one is left as it is."""
    first = generate.run(_config(model, captions_file, ram_dir, stop_after_shards=1),
                         sampler=sampler8)
    assert first["shards_written"] == 1 and not records.read_manifest(ram_dir)["complete"]
    second = generate.run(_config(model, captions_file, ram_dir), sampler=sampler8)
    assert (second["shards_written"], second["images"]) == (2, 8)
    shards = {f"train-{i:05d}-of-00003.tfrecord" for i in range(3)}
    assert set(tf.io.gfile.listdir(ram_dir)) == shards | {
        "manifest.json", "settings.json", "summary.json", "contact_sheet.png"}

    recs = _read_output(ram_dir)
    assert sorted(recs) == sorted(reference[2])
    assert all(recs[c].images == reference[2][c].images for c in recs)
    manifest = records.read_manifest(ram_dir)
    assert manifest["complete"] and manifest["shards"] == records.read_manifest(
        str(reference[0]))["shards"]
    assert fileio.read_json(f"{ram_dir}/settings.json") == fileio.read_json(
        str(reference[0] / "settings.json"))
    with tf.io.gfile.GFile(f"{ram_dir}/contact_sheet.png", "rb") as f:
        sheet = np.asarray(Image.open(io.BytesIO(f.read())))
    np.testing.assert_array_equal(sheet, np.asarray(Image.open(reference[0] / "contact_sheet.png")))

    third = generate.run(_config(model, captions_file, ram_dir), sampler=sampler8)
    assert (third["shards_written"], third["images"]) == (0, 0)
    summary = fileio.read_json(f"{ram_dir}/summary.json")    # both runs; a no-op adds nothing
    assert (summary["images"], [r["images"] for r in summary["runs"]]) == (14, [6, 8])
    with pytest.raises(ValueError, match=r"guidance_scale: 2.0 -> 7.5"):
        generate.run(_config(model, captions_file, ram_dir, guidance_scale=7.5))


def test_a_rerun_with_other_settings_stops_and_names_them(model, captions_file, reference):
    config = _config(model, captions_file, reference[0], guidance_scale=7.5)
    with pytest.raises(ValueError, match=r"guidance_scale: 2.0 -> 7.5"):
        generate.run(config)


@pytest.mark.parametrize("scheduler", ["pndm", "dpm-solver"])
def test_other_schedulers_sample_distinct_finite_images(model, scheduler):
    sampler = _sampler(model, jax.local_devices()[:2], 1, scheduler=scheduler)
    ids, _ = sampler.prompt_ids(["a red cat", "a red cat"])
    images = sampler.sample(ids, [0, 1], [0, 0])
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.abs(images[0].astype(int) - images[1]).mean() > 10


# ---------------------------------------------------------------- bad inputs: clear and early

def _bad_input_cases(tmp_path, model):
    missing = str(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("a cat\ncaf\xe9 au lait\n".encode("latin-1"))
    csv_file = tmp_path / "caps.csv"
    csv_file.write_text("url,text\nhttp://x,a cat\n")
    good = _write_captions(tmp_path / "good.txt", ["a cat"])
    not_sd = tmp_path / "not_sd"
    not_sd.mkdir()
    return {
        "missing captions": ({"captions": missing}, FileNotFoundError, "nope.txt.*does not exist"),
        "empty captions": ({"captions": str(empty)}, ValueError, "empty.txt.*is empty"),
        "blank captions": ({"captions": str(blank)}, ValueError, "blank.txt.*no captions"),
        "not utf-8": ({"captions": str(latin1)}, ValueError, "latin1.txt.*not UTF-8.*line 2"),
        "csv column": ({"captions": str(csv_file)}, ValueError, "no column 'caption'.*'text'"),
        "missing model": ({"captions": good, "model": str(tmp_path / "no_model")},
                          FileNotFoundError, "no_model.*no such directory"),
        "not a model": ({"captions": good, "model": str(not_sd)}, FileNotFoundError,
                        "not_sd.*model_index.json"),
        "bad format": ({"captions": good, "image_format": "gif"}, ValueError, "image_format='gif'"),
        "bad scheduler": ({"captions": good, "scheduler": "euler"}, ValueError,
                          "scheduler='euler'"),
        "bad resolution": ({"captions": good, "resolution": 30}, ValueError, "resolution=30"),
    }


@pytest.mark.parametrize("case", ["missing captions", "empty captions", "blank captions",
                                  "not utf-8", "csv column", "missing model", "not a model",
                                  "bad format", "bad scheduler", "bad resolution"])
def test_bad_inputs_fail_before_any_work_with_a_clear_error(case, model, tmp_path):
    fields, error, message = _bad_input_cases(tmp_path, model)[case]
    out = tmp_path / "out"
    config = _config(model, "", out)
    config_utils.apply_overrides(config, fields)
    with pytest.raises(error, match=message):
        generate.run(config)
    assert not out.exists()


def test_command_line_reports_a_missing_captions_file(model, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "stablerep_jax.generate", "--config=configs/generate.py:tiny",
         f"--config.model={model}", f"--config.captions={tmp_path / 'none.txt'}",
         f"--config.output_dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "none.txt' does not exist" in result.stderr
    assert not (tmp_path / "out").exists()


def test_command_line_names_the_flag_that_replaced_a_process_key(tmp_path):
    """Hosts come from the flags every job takes; the config keys that once set them are gone,
    and a command that still passes one stops before any work, naming the flag to use."""
    result = subprocess.run(
        [sys.executable, "-m", "stablerep_jax.generate", "--config=configs/generate.py:tiny",
         f"--config.output_dir={tmp_path / 'out'}", "--config.process_count=2"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--config.process_count is no longer a config key" in result.stderr
    assert "pass --num_processes instead" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stale, flag", [("process_index", "--process_id"),
                                         ("process_count", "--num_processes")])
def test_each_stale_process_key_names_its_flag(stale, flag):
    """The check the command line above runs on its overrides, for each old key."""
    from stablerep_jax import cli, config_utils
    config = config_utils.load_config(os.path.join(REPO, "configs", "generate.py") + ":tiny")
    with pytest.raises(KeyError, match=rf"--config.{stale} is no longer a config key.*pass "
                                       rf"{flag} instead"):
        cli.check_override_keys(config, [stale], "configs/generate.py:tiny")
    cli.check_override_keys(config, ["seed"], "configs/generate.py:tiny")   # a real key passes


# ---------------------------------------------------------------- captions files, tokens, sheet

def test_table_captions_use_the_named_column_and_count_blanks(tmp_path):
    path = tmp_path / "caps.tsv"
    path.write_text('url\ttext\nu1\ta "quoted" cat\n\nu2\t  \nu3\ta dog\n', encoding="utf-8")
    caps = captions_lib.read_captions(str(path), caption_column="text")
    assert caps.texts == ('a "quoted" cat', "a dog") and caps.blank_skipped == 2
    csv_path = tmp_path / "caps.csv"
    csv_path.write_text('caption,url\n"a cat, sitting",u1\nа кот,u2\n', encoding="utf-8")
    assert captions_lib.read_captions(str(csv_path)).texts == ("a cat, sitting", "а кот")
    with pytest.raises(ValueError, match="unknown extension '.json'"):
        captions_lib.read_captions(str(tmp_path / "caps.json"))


def test_tokens_match_the_pipeline_and_long_captions_are_truncated(model, sampler8):
    texts = ["a red cat", LONG, ""]
    ids, truncated = captions_lib.sd_prompt_ids(sampler8.tokenizer, texts)
    # diffusers' pipeline: pad to max_length, truncate (the end token is the last one kept).
    theirs = sampler8.tokenizer(texts, padding="max_length", truncation=True,
                                max_length=sampler8.max_length, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, theirs)
    assert truncated.tolist() == [False, True, False]
    assert ids[1, -1] == sampler8.tokenizer.eos_token_id


def test_contact_sheet_puts_each_image_in_its_row_beside_its_caption():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows = [(f"caption {i}", [np.full((20, 30, 3), c, np.uint8)] * (i + 1))
            for i, c in enumerate(colors)]
    sheet = np.asarray(contact_sheet.contact_sheet(rows, thumb_size=32))
    for r, color in enumerate(colors):
        for c in range(3):
            left, top, right, bottom = contact_sheet.cell_box(r, c, thumb_size=32)
            centre = sheet[(top + bottom) // 2, (left + right) // 2]
            assert tuple(centre) == (color if c <= r else (255, 255, 255))
        label = sheet[4 + r * 36:4 + r * 36 + 32, 4:64 + 4]
        assert (label < 128).any(), f"row {r}: no caption text drawn"
    with pytest.raises(ValueError, match="no rows"):
        contact_sheet.contact_sheet([])


def _pytorch_images(model, settings, texts, latents, dtype="float32"):
    import torch
    from tiny_sd import torch_pipeline
    pipe = torch_pipeline(model, torch_dtype=getattr(torch, dtype))
    images = pipe(prompt=texts, num_inference_steps=settings.num_inference_steps,
                  guidance_scale=settings.guidance_scale, height=settings.resolution,
                  width=settings.resolution, output_type="np",
                  latents=torch.from_numpy(latents).to(getattr(torch, dtype))).images
    return np.round(np.asarray(images, np.float32) * 255).astype(int)


PARITY = (["a red cat", "a red cat", "two boats"], [0, 1, 0], [0, 0, 5])


@pytest.mark.torch
def test_sampler_matches_the_diffusers_pytorch_pipeline(model, sampler8):
    """Same weights, prompts and initial latents: our Flax modules and DDIM loop compute what
    diffusers' PyTorch StableDiffusionPipeline (the reference's generator) computes: float32
    within 1 level of 255 (measured: identical)."""
    texts, seeds, cids = PARITY
    ids, _ = sampler8.prompt_ids(texts)
    ours = sampler8.sample(ids, seeds, cids)
    theirs = _pytorch_images(model, sampler8.settings, texts,
                             sampler8.initial_latents(seeds, cids))
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.mark.torch
def test_bfloat16_sampler_stays_near_the_float32_pytorch_pipeline(model, bf16_wide):
    """bfloat16 params and compute (the default) against PyTorch in float32: measured max 3,
    mean 0.38 levels on this model; the bound leaves room for other CPUs' rounding."""
    texts, seeds, cids = PARITY
    ids, _ = bf16_wide.prompt_ids(texts)
    ours = bf16_wide.sample(ids, seeds, cids)
    theirs = _pytorch_images(model, bf16_wide.settings, texts,
                             bf16_wide.initial_latents(seeds, cids))
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 12 and diff.mean() < 1.5, (diff.max(), diff.mean())


@pytest.mark.torch
@pytest.mark.parametrize("size, serialization", [("sd2", True), ("tiny", False)])
def test_sd2_layout_and_bin_weights_match_the_pytorch_pipeline(tmp_path, size, serialization):
    """SD 2.x's layout (linear projections, per-block heads, upcast attention, GELU text
    encoder), and a folder holding only PyTorch `.bin` weights, load and sample as diffusers
    does."""
    model = write_tiny_sd(str(tmp_path / "sd"), size=size, safe_serialization=serialization)
    weights = [f for f in os.listdir(os.path.join(model, "unet")) if "model" in f]
    assert all(f.endswith(".safetensors" if serialization else ".bin") for f in weights)
    sampler = _sampler(model, jax.local_devices()[:1], 3)
    texts, seeds, cids = PARITY
    ids, _ = sampler.prompt_ids(texts)
    ours = sampler.sample(ids, seeds, cids)
    theirs = _pytorch_images(model, sampler.settings, texts, sampler.initial_latents(seeds, cids))
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


@pytest.mark.slow
@pytest.mark.torch
def test_sd15_shaped_model_matches_the_pytorch_pipeline(tmp_path):
    """Stable Diffusion v1.5's architecture (860M UNet, 12-layer CLIP, 4-block VAE) with random
    weights, at 64 px and 2 DDIM steps in float32: the real model's every layer and name."""
    model = write_tiny_sd(str(tmp_path / "sd15"), size="sd15")
    sampler = _sampler(model, jax.local_devices()[:1], 1, resolution=64, num_inference_steps=2)
    texts, seeds, cids = ["a red cat"], [0], [0]
    ids, _ = sampler.prompt_ids(texts)
    ours = sampler.sample(ids, seeds, cids)
    theirs = _pytorch_images(model, sampler.settings, texts, sampler.initial_latents(seeds, cids))
    diff = np.abs(ours.astype(int) - theirs)
    assert ours.std() > 5, "a flat image would hide a wrong layer"
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
