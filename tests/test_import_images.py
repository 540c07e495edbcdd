"""import_images: the reference's layout (CSV + one root per seed) and a folder of caption groups
become TFRecord shards that the training pipeline reads; missing images are reported by name."""
import csv
import io
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from stablerep_jax import config_utils, fileio, import_images
from stablerep_jax.data import layouts, pipeline, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = [f'a photo, of thing "{i}"' for i in range(10)]
ROOTS = ("seed0", "seed1", "seed2")


def _image(i, root_index, fmt, size=(28, 20)):
    rng = np.random.default_rng([i, root_index])
    array = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _reference_layout(base):
    """CSV with a header row + 10 captions; images alternate PNG/JPEG in sub-folders."""
    rows = [("path", "caption")]
    for i, caption in enumerate(CAPTIONS):
        ext, fmt = ("png", "PNG") if i % 2 else ("jpg", "JPEG")
        rel = os.path.join(f"part{i // 5}", f"{i:04d}.{ext}")
        rows.append((rel, caption))
        for r, root in enumerate(ROOTS):
            path = os.path.join(base, root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(_image(i, r, fmt))
    csv_path = os.path.join(base, "train.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path, [os.path.join(base, r) for r in ROOTS]


def _config(output_dir, **fields):
    config = config_utils.load_config(os.path.join(REPO, "configs", "import_images.py"))
    config.output_dir = output_dir
    config.captions_per_shard = 4
    config.num_workers = 2
    for key, value in fields.items():
        config_utils.apply_overrides(config, {key: value})
    return config


def _train_data_config(train_files, n_img):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.data.image_size = 16
    config.data.n_img = n_img
    config.data.permute_window = 8
    return config.data


def test_reference_layout_becomes_records_that_train_reads(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    manifest = import_images.run(_config(out, csv=csv_path, roots=",".join(roots)))
    assert manifest["num_captions"] == 10 and manifest["num_shards"] == 3
    assert manifest["images_per_caption"] == 3 and manifest["num_images"] == 30
    recs = sorted((r for name in sorted(manifest["shards"]) for r in
                   records.read_records(os.path.join(out, name))), key=lambda r: r.caption_id)
    assert [r.caption_id for r in recs] == list(range(10))          # CSV rows, header skipped
    assert [r.caption for r in recs] == CAPTIONS
    for r in recs:
        rel = os.path.join(f"part{r.caption_id // 5}",
                           f"{r.caption_id:04d}.{'png' if r.caption_id % 2 else 'jpg'}")
        assert list(r.images) == [_read_bytes(os.path.join(root, rel)) for root in roots]
        assert r.seeds == [0, 1, 2]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]

    it = pipeline.make_train_iterator(_train_data_config(os.path.join(out, "*.tfrecord"), 2),
                                      batch_size=4, seed=0)
    labels = np.concatenate([next(it)["labels"] for _ in range(2)])
    assert len(set(labels.tolist())) == 8 and set(labels.tolist()) <= set(range(10))


def test_missing_images_are_named_and_nothing_is_written(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    gone = os.path.join(roots[1], "part1", "0007.png")
    os.remove(gone)
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="0007.png") as info:
        import_images.run(_config(out, csv=csv_path, roots=",".join(roots)))
    assert "seed1" in str(info.value)
    assert not os.path.exists(out) or not os.listdir(out)


def test_skip_caption_leaves_out_and_lists_missing(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    gone = os.path.join(roots[2], "part0", "0003.png")
    os.remove(gone)
    out = str(tmp_path / "out")
    manifest = import_images.run(_config(out, csv=csv_path, roots=",".join(roots),
                                         on_missing="skip_caption"))
    assert manifest["num_captions"] == 9
    ids = [r.caption_id for name in sorted(manifest["shards"])
           for r in records.read_records(os.path.join(out, name))]
    assert 3 not in ids and len(ids) == 9
    assert gone in _read_bytes(os.path.join(out, import_images.MISSING_REPORT)).decode()


def test_unreadable_image_is_named(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    broken = os.path.join(roots[0], "part0", "0002.jpg")
    with open(broken, "r+b") as f:
        f.truncate(60)
    with pytest.raises(ValueError, match="0002.jpg"):
        import_images.run(_config(str(tmp_path / "out"), csv=csv_path, roots=",".join(roots)))


def test_folder_of_caption_groups_with_resize_and_reencode(tmp_path):
    folder = tmp_path / "groups"
    for g in range(5):
        sub = folder / f"group{g}"
        sub.mkdir(parents=True)
        (sub / "caption.txt").write_text(f"caption of group {g}\n")
        for k in range(2):
            (sub / f"{k}.bmp").write_bytes(_image(g, k, "BMP", size=(40, 30)))
    out = str(tmp_path / "out")
    manifest = import_images.run(_config(out, folder=str(folder), image_format="jpeg",
                                         save_size=15))
    recs = sorted((r for name in sorted(manifest["shards"]) for r in
                   records.read_records(os.path.join(out, name))), key=lambda r: r.caption_id)
    assert [r.caption for r in recs] == [f"caption of group {g}" for g in range(5)]
    for r in recs:
        for data in r.images:
            assert import_images.sniff_format(data) == "jpeg"
            assert Image.open(io.BytesIO(data)).size == (20, 15)        # shorter side 15
    it = pipeline.make_train_iterator(_train_data_config(os.path.join(out, "*.tfrecord"), 2),
                                      batch_size=4, seed=0)
    assert next(it)["images"].shape == (4, 2, 16, 16, 3)


def test_rerun_keeps_finished_shards(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    config = _config(out, csv=csv_path, roots=",".join(roots))
    first = import_images.run(config)
    kept = os.path.join(out, sorted(first["shards"])[0])
    redone = os.path.join(out, sorted(first["shards"])[1])
    os.utime(kept, (1, 1))
    os.remove(redone)
    os.remove(os.path.join(out, records.MANIFEST_NAME))
    # What kill -9 during the writes left behind: partial files under temporary names.
    info = os.path.join(out, import_images.SHARD_INFO_DIR, os.path.basename(redone) + ".json")
    partial = [fileio.temp_name(redone), redone + fileio.TMP_SUFFIX, fileio.temp_name(info),
               fileio.temp_name(os.path.join(out, records.MANIFEST_NAME))]
    for path in partial:
        with open(path, "wb") as f:
            f.write(b"partial")
    second = import_images.run(config)
    assert second == first
    assert os.stat(kept).st_mtime == 1 and os.path.exists(redone)
    assert not [p for p in partial if os.path.exists(p)]


def test_bad_configs_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        import_images.run(_config(str(tmp_path / "o")))
    with pytest.raises(ValueError, match="image_format"):
        import_images.run(_config(str(tmp_path / "o"), folder=str(tmp_path), image_format="gif"))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        import_images.run(_config(str(tmp_path / "o"), csv=str(tmp_path / "nope.csv"),
                                  roots=str(tmp_path)))


def test_command_line(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-m", "stablerep_jax.import_images",
         f"--config={os.path.join(REPO, 'configs', 'import_images.py')}",
         f"--config.csv={csv_path}", f"--config.roots={','.join(roots)}",
         f"--config.output_dir={out}", "--config.captions_per_shard=5"],
        check=False, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = records.read_manifest(out)
    assert manifest["num_captions"] == 10 and manifest["num_shards"] == 2


def _all_records(out, manifest):
    return sorted((r for name in manifest["shards"]
                   for r in records.read_records(os.path.join(out, name))),
                  key=lambda r: r.caption_id)


def test_rerun_with_other_inputs_or_layout_stops_naming_each_change(tmp_path):
    """Stale shards of another CSV (or another shard size) would make training see captions
    twice: a rerun into the same output_dir with other settings stops before writing."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    import_images.run(_config(out, csv=csv_path, roots=",".join(roots)))
    before = sorted(os.listdir(out))
    settings = records.read_manifest(out)["settings"]
    assert settings == fileio.read_json(os.path.join(out, import_images.SETTINGS_NAME))
    assert settings["captions_per_shard"] == 4 and settings["num_captions"] == 10

    other_csv = str(tmp_path / "src" / "other.csv")
    with open(csv_path) as f, open(other_csv, "w") as g:
        text = f.read()
        g.write(text.replace('thing ""3""', 'thing ""three""', 1))
    assert _read_bytes(other_csv) != text.encode()
    with pytest.raises(ValueError, match=r"other settings \(captions_sha256: '[0-9a-f]+' -> "
                                         r"'[0-9a-f]+'\)"):
        import_images.run(_config(out, csv=other_csv, roots=",".join(roots)))
    with pytest.raises(ValueError, match=r"captions_per_shard: 4 -> 5"):
        import_images.run(_config(out, csv=csv_path, roots=",".join(roots), captions_per_shard=5))
    with pytest.raises(ValueError, match=r"image_format: 'keep' -> 'png'.*save_size: 0 -> 8"):
        import_images.run(_config(out, csv=csv_path, roots=",".join(roots), image_format="png",
                                  save_size=8))
    with pytest.raises(ValueError, match=r"roots: .*seeds: \[0, 1, 2\] -> \[0, 1\]"):
        import_images.run(_config(out, csv=csv_path, roots=",".join(roots[:2])))
    assert sorted(os.listdir(out)) == before
    # The same settings from a copy of the CSV at another path: a resume, accepted.
    copy = str(tmp_path / "copy.csv")
    with open(csv_path) as f, open(copy, "w") as g:
        g.write(f.read())
    assert import_images.run(_config(out, csv=copy, roots=",".join(roots)))["num_captions"] == 10


def test_shards_of_a_version_without_settings_are_not_completed(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    config = _config(out, csv=csv_path, roots=",".join(roots))
    import_images.run(config)
    os.remove(os.path.join(out, import_images.SETTINGS_NAME))
    with pytest.raises(ValueError, match=r"holds shards \(3\) but no settings.json"):
        import_images.run(config)


def test_an_output_of_another_layout_is_refused_naming_what_changed(tmp_path):
    """No upgrade path: settings.json from a layout that recorded neither max_image_pixels nor
    the caption order, or a shard without its info file, stops a rerun before it writes."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    out = str(tmp_path / "out")
    config = _config(out, csv=csv_path, roots=",".join(roots))
    import_images.run(config)
    settings_path = os.path.join(out, import_images.SETTINGS_NAME)
    settings = fileio.read_json(settings_path)
    assert settings["max_image_pixels"] == import_images.DEFAULT_MAX_IMAGE_PIXELS
    old = {k: v for k, v in settings.items() if k not in ("max_image_pixels", "caption_order")}
    fileio.write_json_atomic(settings_path, old)
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    with pytest.raises(ValueError, match=r"other settings \(caption_order: None -> \{.*"
                                         r"max_image_pixels: None -> 178956970\)"):
        import_images.run(config)
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before
    fileio.write_json_atomic(settings_path, settings)
    shard = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))[1]
    os.remove(os.path.join(out, import_images.SHARD_INFO_DIR, shard + ".json"))
    before = {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)}
    with pytest.raises(ValueError, match=rf"holds 1 shard\(s\) without shard_info/<shard>.json "
                                         rf"\({shard}\).*another layout of import_images"):
        import_images.run(config)
    assert {p: os.stat(os.path.join(out, p)).st_mtime_ns for p in os.listdir(out)} == before


def test_missing_report_and_counts_cover_the_whole_output(tmp_path):
    """A rerun that writes only some shards still reports every skipped image (and drops a
    report whose images came back), and the manifest counts every shard."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    gone = os.path.join(roots[2], "part0", "0003.png")
    saved = _read_bytes(gone)
    os.remove(gone)
    out = str(tmp_path / "out")
    config = _config(out, csv=csv_path, roots=",".join(roots), on_missing="skip_caption")
    first = import_images.run(config)
    assert first["num_captions"] == 9 and first["skipped_images"] == 1 and first["complete"]
    with_gap = next(n for n in first["shards"] if first["shards"][n]["skipped_images"])
    other = next(n for n in first["shards"] if n != with_gap)
    os.remove(os.path.join(out, other))                       # a rerun redoes only this one
    second = import_images.run(config)
    assert second == first
    assert gone in _read_bytes(os.path.join(out, import_images.MISSING_REPORT)).decode()

    with open(gone, "wb") as f:                                # the image is back
        f.write(saved)
    os.remove(os.path.join(out, with_gap))
    third = import_images.run(config)
    assert third["num_captions"] == 10 and third["skipped_images"] == 0
    assert not os.path.exists(os.path.join(out, import_images.MISSING_REPORT))
    assert [r.caption_id for r in _all_records(out, third)] == list(range(10))


def test_processes_write_disjoint_shards_and_process_0_the_outputs(tmp_path):
    """A pod runs the job on every host: each writes its own shards; only process 0 writes the
    manifest and missing.txt, and they cover the other hosts' shards too."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    gone = os.path.join(roots[0], "part1", "0008.jpg")
    os.remove(gone)
    out = str(tmp_path / "out")
    fields = dict(csv=csv_path, roots=",".join(roots), on_missing="skip_caption",
                  captions_per_shard=2)
    assert import_images.run(_config(out, **fields), process_index=1, process_count=2) is None
    host1 = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))
    assert host1 == [f"train-{i:05d}-of-00005.tfrecord" for i in (1, 3)]
    assert not {records.MANIFEST_NAME, import_images.MISSING_REPORT} & set(os.listdir(out))

    manifest = import_images.run(_config(out, **fields), process_index=0, process_count=2)
    assert manifest["num_shards"] == 5 and manifest["complete"]
    assert manifest["num_captions"] == 9 and manifest["skipped_images"] == 1
    assert [r.caption_id for r in _all_records(out, manifest)] == [i for i in range(10) if i != 8]
    assert gone in _read_bytes(os.path.join(out, import_images.MISSING_REPORT)).decode()
    with pytest.raises(ValueError, match="process_index=2, process_count=2"):
        import_images.run(_config(out, **fields), process_index=2, process_count=2)


def test_command_line_names_the_flag_that_replaced_process_index(tmp_path):
    """Processes come from the flags every job takes (`cli.define_job_flags`); a command that
    still sets the old config key stops before any work, naming the flag to use."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "stablerep_jax.import_images", "--config=configs/import_images.py",
         f"--config.folder={tmp_path}", f"--config.output_dir={out}", "--config.process_index=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "--config.process_index is no longer a config key" in result.stderr
    assert "pass --process_id instead" in result.stderr
    assert not out.exists()


def test_csv_paths_outside_the_roots_are_refused_naming_the_row(tmp_path):
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    secret = tmp_path / "secret" / "x.png"
    secret.parent.mkdir()
    secret.write_bytes(_image(0, 0, "PNG"))
    for bad, why in (("../../secret/x.png", "outside the root"),
                     ("part0/../../../secret/x.png", "outside the root"),
                     (str(secret), "absolute")):
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow((bad, "a secret"))
        out = str(tmp_path / "out")
        with pytest.raises(ValueError, match=rf"train.csv:12: '{re.escape(bad)}'.*{why}"):
            import_images.run(_config(out, csv=csv_path, roots=",".join(roots)))
        assert not os.path.exists(out)
        with open(csv_path) as f:                              # drop the row again
            rows = f.readlines()[:-1]
        with open(csv_path, "w") as f:
            f.writelines(rows)
    ok = layouts.read_reference_layout(csv_path, roots)
    assert len(ok) == 10


def test_outputs_go_to_a_ram_url(tmp_path, ram_dir):
    """ram:// goes through tf.io.gfile like gs://: shards, settings, manifest and missing.txt."""
    import tensorflow as tf
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    os.remove(os.path.join(roots[1], "part0", "0001.png"))
    config = _config(ram_dir, csv=csv_path, roots=",".join(roots), on_missing="skip_caption")
    manifest = import_images.run(config)
    assert manifest["num_captions"] == 9 and manifest["complete"]
    assert [r.caption_id for r in _all_records(ram_dir, manifest)] == [0] + list(range(2, 10))
    names = set(tf.io.gfile.listdir(ram_dir))
    assert {import_images.SETTINGS_NAME, records.MANIFEST_NAME,
            import_images.MISSING_REPORT} <= names
    assert not [n for n in names if n.endswith(".tmp")]
    assert import_images.run(config) == manifest                 # a rerun keeps every shard
    assert not os.path.exists("ram:") and not os.path.exists(os.path.join(REPO, "ram:"))


@pytest.mark.slow
def test_two_hosts_split_shards_and_host_0_waits_for_both(tmp_path):
    """Two hosts of a (simulated SLURM) cluster run the command line: the job joins
    jax.distributed, writes disjoint shards, and process 0 writes the manifest and missing.txt
    only after the late process's shards are written."""
    from processes import run_processes
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    gone = os.path.join(roots[1], "part0", "0001.png")
    os.remove(gone)
    out = str(tmp_path / "out")
    outputs = run_processes(
        os.path.join(REPO, "tests", "multiprocess_writers.py"), 2, "import_images",
        "import_images.py", f"--config.csv={csv_path}", f"--config.roots={','.join(roots)}",
        f"--config.output_dir={out}", "--config.captions_per_shard=2",
        "--config.on_missing=skip_caption", "--config.num_workers=2")
    for i, output in enumerate(outputs):
        assert "exit code 0" in output and f"process {i} of 2" in output, output[-3000:]
    manifest = records.read_manifest(out)
    assert manifest["complete"] and manifest["num_shards"] == 5
    assert manifest["num_captions"] == 9 and manifest["skipped_images"] == 1
    assert [r.caption_id for r in _all_records(out, manifest)] == [0] + list(range(2, 10))
    assert gone in _read_bytes(os.path.join(out, import_images.MISSING_REPORT)).decode()


@pytest.mark.slow
def test_a_failing_host_stops_every_host(tmp_path):
    """An image missing from host 1's share: host 1 names it, host 0 stops too instead of
    waiting for host 1 at a barrier, and nothing is written."""
    import time

    from processes import run_processes
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    plan = import_images.shards_to_import(layouts.read_reference_layout(csv_path, roots), 2)
    gone = plan[1][1][0].paths[2]                              # shard 1 belongs to host 1
    os.remove(gone)
    out = str(tmp_path / "out")
    start = time.monotonic()
    outputs = run_processes(
        os.path.join(REPO, "tests", "multiprocess_writers.py"), 2, "import_images",
        "import_images.py", f"--config.csv={csv_path}", f"--config.roots={','.join(roots)}",
        f"--config.output_dir={out}", "--config.captions_per_shard=2", "--config.num_workers=2",
        timeout=300)
    assert time.monotonic() - start < 240
    assert "exit code 1" in outputs[1] and os.path.basename(gone) in outputs[1], outputs[1][-3000:]
    assert "exit code 1" in outputs[0] and "process(es) [1] failed" in outputs[0], \
        outputs[0][-3000:]
    assert not os.path.exists(out)


def test_non_utf8_csv_or_caption_file_is_named_with_its_line(tmp_path):
    """A Latin-1 byte used to surface as a bare UnicodeDecodeError naming neither file nor
    line; nothing is written either way."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    lines = _read_bytes(csv_path).split(b"\n")
    lines[4] = lines[4].replace(b"a photo", b"a caf\xe9 photo")
    with open(csv_path, "wb") as f:
        f.write(b"\n".join(lines))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"csv .*train.csv:5 is not UTF-8 text: undecodable "
                                         r"bytes b'\\xe9'"):
        import_images.run(_config(str(out), csv=csv_path, roots=",".join(roots)))
    assert not out.exists()

    folder = tmp_path / "groups"
    for g in range(3):
        sub = folder / f"group{g}"
        sub.mkdir(parents=True)
        (sub / "0.png").write_bytes(_image(g, 0, "PNG"))
        (sub / "caption.txt").write_bytes(b"fine\nline two \xff\xfe\n" if g == 1 else b"ok\n")
    with pytest.raises(ValueError, match=r"caption file .*group1/caption.txt:2 is not UTF-8"):
        import_images.run(_config(str(out), folder=str(folder)))
    assert not out.exists()


def _huge_png(side: int) -> bytes:
    """A side x side 1-bit black PNG, written by hand: a few hundred KB on disk, 400 million
    pixels at side 20000 (PIL would need 1.2 GB to build it as RGB)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    row = b"\0" * (1 + (side + 7) // 8)                  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_a_decompression_bomb_sized_png_is_an_image_problem(tmp_path):
    """A 20000x20000 PNG used to raise PIL's DecompressionBombError out of the job (no path
    named, shard 0 left without manifest or missing.txt). It is an unreadable image: skipped
    with skip_caption, fatal with error; either way named, and never decoded."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    huge = os.path.join(roots[1], "part0", "0003.png")
    with open(huge, "wb") as f:
        f.write(_huge_png(20000))
    out = str(tmp_path / "skip")
    manifest = import_images.run(_config(out, csv=csv_path, roots=",".join(roots),
                                         on_missing="skip_caption"))
    assert manifest["num_captions"] == 9 and manifest["complete"]
    report = _read_bytes(os.path.join(out, import_images.MISSING_REPORT)).decode()
    assert f"{huge}: cannot be read as an image (20000x20000 = 400000000 pixels, above " \
           "max_image_pixels=178956970; PNG cannot be decoded at reduced size" in report
    with pytest.raises(ValueError, match=rf"{re.escape(huge)}: cannot be read as an image "
                                         r"\(20000x20000"):
        import_images.run(_config(str(tmp_path / "error"), csv=csv_path, roots=",".join(roots)))
    # The limit is a config key; PIL's own limit is back in place after the job.
    assert Image.MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(import_images.ImageProblem, match="0003.png: cannot be read"):
        import_images.prepare_image(_read_bytes(huge), huge, max_pixels=10 ** 9)


def test_a_large_jpeg_is_decoded_at_reduced_size(tmp_path):
    """Above max_image_pixels a JPEG is decoded at 1/2, 1/4 or 1/8 size (the largest that
    fits) and re-encoded; a PNG above it is skipped and named."""
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    big = os.path.join(roots[0], "part0", "0000.jpg")            # JPEG rows are the even ones
    with open(big, "wb") as f:
        f.write(_image(0, 0, "JPEG", size=(400, 200)))
    out = str(tmp_path / "out")
    manifest = import_images.run(_config(out, csv=csv_path, roots=",".join(roots),
                                         max_image_pixels=20_000, on_missing="skip_caption"))
    recs = {r.caption_id: r for name in manifest["shards"]
            for r in records.read_records(os.path.join(out, name))}
    assert 0 in recs and Image.open(io.BytesIO(recs[0].images[0])).size == (200, 100)
    assert recs[0].images[1] == _read_bytes(os.path.join(roots[1], "part0", "0000.jpg"))
    assert manifest["num_captions"] == 10                      # 28x20 images are below it
    with pytest.raises(ValueError, match=r"max_image_pixels=0: must be >= 1"):
        import_images.run(_config(str(tmp_path / "zero"), csv=csv_path, roots=",".join(roots),
                                  max_image_pixels=0))
    with pytest.raises(import_images.ImageProblem,
                       match=r"x.png: cannot be read as an image \(400x200 = 80000 pixels, "
                             r"above max_image_pixels=20000; PNG cannot be decoded"):
        import_images.prepare_image(_image(0, 0, "PNG", size=(400, 200)), "x.png",
                                    max_pixels=20_000)
    with pytest.raises(import_images.ImageProblem, match=r"even 1/8 of it is larger"):
        import_images.prepare_image(_image(0, 0, "JPEG", size=(400, 200)), "x.jpg",
                                    max_pixels=1000)


def test_sigterm_stops_after_the_shard_being_written_and_a_rerun_completes(tmp_path, monkeypatch):
    """import_images used to ignore preemption (143 from SIGTERM, or run on to the end). Now a
    notice stops it after the shard it is writing: the outputs cover the shards on disk, the
    job reports itself preempted (exit 75), and a rerun writes the rest: the same records as
    an uninterrupted import."""
    import signal
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    straight = import_images.run(_config(str(tmp_path / "straight"), csv=csv_path,
                                         roots=",".join(roots)))
    real_write = records.write_shard
    calls = []

    def write_then_sigterm(path, recs):
        real_write(path, recs)
        calls.append(path)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)        # arrives as shard 1 is finished
    monkeypatch.setattr(records, "write_shard", write_then_sigterm)
    out = str(tmp_path / "out")
    manifest, preempted = import_images.run_until_preempted(
        _config(out, csv=csv_path, roots=",".join(roots)))
    assert preempted and len(calls) == 1
    assert manifest["num_shards"] == 1 and not manifest["complete"]
    monkeypatch.undo()
    manifest, preempted = import_images.run_until_preempted(
        _config(out, csv=csv_path, roots=",".join(roots)))
    assert not preempted and manifest["complete"]
    assert manifest["shards"] == straight["shards"]
    for name in straight["shards"]:
        assert _read_bytes(os.path.join(out, name)) == \
            _read_bytes(os.path.join(str(tmp_path / "straight"), name))


def test_sigterm_during_startup_writes_nothing(tmp_path, monkeypatch):
    import signal
    csv_path, roots = _reference_layout(str(tmp_path / "src"))
    real_read = layouts.read_reference_layout

    def read_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_read(*args, **kwargs)
    monkeypatch.setattr(layouts, "read_reference_layout", read_then_sigterm)
    out = tmp_path / "out"
    assert import_images.run_until_preempted(
        _config(str(out), csv=csv_path, roots=",".join(roots))) == (None, True)
    assert not out.exists()
