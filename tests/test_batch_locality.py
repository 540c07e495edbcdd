"""Batch composition through the real path: captions in file order -> import_images / generate
-> make_train_iterator. A batch must look like a sample of a global random permutation: the
fraction of same-batch caption pairs lying within N/100 of each other in the captions file stays
within 1.3x of a permutation's (~2%), whatever the file order. Shards written in file order (the
layout before data/caption_order.py) fail that bound, so the measurement can tell the two apart."""
import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from stablerep_jax import config_utils, generate, import_images
from stablerep_jax.data import caption_order, locality, pipeline, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 1.3


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value % 256, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _reference_layout(base, num_captions, roots=("seed0", "seed1")):
    """A CSV of `path,caption` rows in caption order and one root folder per seed."""
    rows = [("path", "caption")]
    for i in range(num_captions):
        rel = f"{i // 100:03d}/{i:05d}.png"
        rows.append((rel, f"caption {i}"))
        for r, root in enumerate(roots):
            path = os.path.join(base, root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(_png(i + 97 * r))
    csv_path = os.path.join(base, "train.csv")
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path, ",".join(os.path.join(base, r) for r in roots)


def _epoch_labels(train_files, batch_size, epochs=1):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = train_files
    config.data.image_size = 8
    config.data.n_img, config.data.num_crop, config.data.aug = 1, 2, "weak"
    it = pipeline.make_train_iterator(config.data, batch_size=batch_size, seed=0)
    return [next(it)["labels"] for _ in range(epochs * it.info.steps_per_epoch)]


def _ratio(batches, num_captions):
    return (locality.near_pair_fraction(batches, num_captions)
            / locality.permutation_fraction(num_captions))


def _write_in_file_order(directory, captions_per_shard):
    """The same records, rewritten in the layout before data/caption_order.py: shard S = a run
    of ids."""
    recs = sorted((r for name in sorted(os.listdir(directory)) if name.endswith(".tfrecord")
                   for r in records.read_records(os.path.join(directory, name))),
                  key=lambda r: r.caption_id)
    out = directory + "_file_order"
    os.makedirs(out)
    shards = {}
    for s, start in enumerate(range(0, len(recs), captions_per_shard)):
        chunk = recs[start:start + captions_per_shard]
        name = f"train-{s:05d}.tfrecord"
        records.write_shard(os.path.join(out, name), chunk)
        shards[name] = {"captions": len(chunk), "images": 2 * len(chunk)}
    records.write_manifest(out, shards, images_per_caption=2)
    return os.path.join(out, "*.tfrecord")


def test_import_images_in_file_order_gives_permutation_like_batches(tmp_path):
    n, per_shard = 800, 25
    csv_path, roots = _reference_layout(str(tmp_path / "src"), n)
    config = config_utils.load_config(os.path.join(REPO, "configs", "import_images.py"))
    out = str(tmp_path / "out")
    config_utils.apply_overrides(config, {"csv": csv_path, "roots": roots, "output_dir": out,
                                          "captions_per_shard": per_shard, "num_workers": 2})
    manifest = import_images.run(config)
    assert caption_order.is_permuted(manifest) and manifest["num_captions"] == n
    ours = _ratio(_epoch_labels(os.path.join(out, "*.tfrecord"), 40), n)
    assert ours < BOUND, f"near-pair ratio {ours:.2f} vs a global permutation"
    before = _ratio(_epoch_labels(_write_in_file_order(out, per_shard), 40), n)
    assert before > BOUND, f"file-order shards gave {before:.2f}: the measure is blind"
    print(f"near-pair ratio: permuted shards {ours:.2f}, file-order shards {before:.2f}")


@pytest.mark.slow
def test_generate_in_file_order_gives_permutation_like_batches(tmp_path):
    from tiny_sd import write_tiny_sd
    n = 300
    captions = tmp_path / "captions.txt"
    captions.write_text("".join(f"caption number {i}\n" for i in range(n)))
    config = config_utils.load_config(os.path.join(REPO, "configs", "generate.py") + ":tiny")
    out = str(tmp_path / "out")
    config_utils.apply_overrides(config, {
        "model": write_tiny_sd(str(tmp_path / "sd")), "captions": str(captions),
        "output_dir": out, "images_per_caption": 2, "captions_per_shard": 10,
        "per_device_batch": 8, "resolution": 32, "num_inference_steps": 1,
        "contact_sheet_captions": 0})
    generate.run(config)
    manifest = records.read_manifest(out)
    assert caption_order.is_permuted(manifest) and manifest["num_captions"] == n
    ours = _ratio(_epoch_labels(os.path.join(out, "*.tfrecord"), 20, epochs=4), n)
    assert ours < BOUND, f"near-pair ratio {ours:.2f} vs a global permutation"
    before = _ratio(_epoch_labels(_write_in_file_order(out, 10), 20, epochs=4), n)
    assert before > BOUND, f"file-order shards gave {before:.2f}: the measure is blind"
    print(f"near-pair ratio: permuted shards {ours:.2f}, file-order shards {before:.2f}")
