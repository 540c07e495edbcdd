"""The toy text-to-image world: grammar round trips, seeded renders that differ but keep the
described content, dataset records in the shared schema, and the probe's image folder."""
import colorsys
import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from stablerep_jax import config_utils, fileio
from stablerep_jax.data import caption_order, eval_data, pipeline, records
from stablerep_jax.demo import toy_world as T

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _hsv(image: np.ndarray) -> np.ndarray:
    flat = image.reshape(-1, 3).astype(np.float64) / 255.0
    return np.array([colorsys.rgb_to_hsv(*p) for p in flat])


def _object_pixels(image: np.ndarray) -> np.ndarray:
    """HSV of the saturated pixels: backgrounds and clutter are drawn with saturation <= 0.22."""
    hsv = _hsv(image)
    return hsv[(hsv[:, 1] > 0.45) & (hsv[:, 2] > 0.3)]


def _hue_distance(a, b):
    d = np.abs(np.asarray(a) - b) % 1.0
    return np.minimum(d, 1.0 - d)


# --------------------------------------------------------------------------------------------
# Grammar


def test_every_caption_round_trips_through_parse():
    specs = T.all_specs()
    assert len(specs) == 3 * 2 * 6 * 5 * 5
    assert len({s.text for s in specs}) == len(specs)
    for spec in specs:
        assert T.parse_caption(spec.text) == spec
    assert T.CaptionSpec(2, "small", "red", "triangle", "striped").text == \
        "two small red triangles on a striped background"
    assert T.parse_caption("  One LARGE blue cross on a dotted background ").shape == "cross"


@pytest.mark.parametrize("text,word", [
    ("two small pink triangles on a striped background", "'pink'"),
    ("two small red hexagons on a striped background", "'hexagons'"),
    ("four small red triangles on a striped background", "'four'"),
    ("two tiny red triangles on a striped background", "'tiny'"),
    ("two small red triangles on a wavy background", "'wavy'"),
])
def test_parse_names_the_unknown_word(text, word):
    with pytest.raises(ValueError, match=word):
        T.parse_caption(text)


def test_parse_rejects_other_sentences_and_wrong_number():
    with pytest.raises(ValueError, match="grammar"):
        T.parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="'triangles'"):
        T.parse_caption("two small red triangle on a striped background")


def test_sample_captions_is_seeded_and_distinct():
    a = T.sample_captions(50, seed=3)
    assert a == T.sample_captions(50, seed=3)
    assert a != T.sample_captions(50, seed=4)
    assert len({s.text for s in a}) == 50
    with pytest.raises(ValueError, match="900 distinct captions"):
        T.sample_captions(901, seed=0)


# --------------------------------------------------------------------------------------------
# Rendering


def test_render_is_deterministic_per_seed():
    spec = T.parse_caption("three large green stars on a checkered background")
    a = T.render(spec, np.random.default_rng(7), 32)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a, T.render(spec, np.random.default_rng(7), 32))
    assert not np.array_equal(a, T.render(spec, np.random.default_rng(8), 32))


def test_renders_of_one_caption_are_different_pictures():
    spec = T.parse_caption("two small red triangles on a striped background")
    images = [T.render(spec, np.random.default_rng(k), 48).astype(np.float32) for k in range(6)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            # Mean absolute difference of at least 10/255: more than noise, different layouts.
            assert np.abs(images[i] - images[j]).mean() > 10.0, (i, j)


@pytest.mark.parametrize("color", T.COLORS)
def test_renders_show_the_captions_colour(color):
    """Every render of a caption has object pixels, and they carry the named hue (the other
    named hues are a sixth of the wheel away; jitter is 0.012)."""
    spec = T.CaptionSpec(2, "large", color, "square", "dotted")
    for k in range(4):
        pixels = _object_pixels(T.render(spec, np.random.default_rng(k), 48))
        assert len(pixels) > 0.03 * 48 * 48
        assert np.median(_hue_distance(pixels[:, 0], T.COLOR_HUES[color])) < 0.03


def test_large_objects_cover_more_than_small_ones():
    def area(size):
        spec = T.CaptionSpec(1, size, "blue", "circle", "plain")
        return [len(_object_pixels(T.render(spec, np.random.default_rng(k), 48))) for k in range(6)]
    assert min(area("large")) > 2 * max(area("small"))


# --------------------------------------------------------------------------------------------
# Writers


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_toy_dataset_records_follow_the_schema(tmp_path):
    out = str(tmp_path / "data")
    manifest = T.write_toy_dataset(out, num_captions=5, images_per_caption=3, image_size=24,
                                   seed=11, captions_per_shard=2)
    assert manifest["num_shards"] == 3 and manifest["num_captions"] == 5
    assert manifest["num_images"] == 15 and manifest["images_per_caption"] == 3
    files = sorted(f for f in os.listdir(out) if f.endswith(records.SHARD_SUFFIX))
    assert files == sorted(manifest["shards"]) and len(files) == 3
    assert not [f for f in os.listdir(out) if f.endswith(records.TMP_SUFFIX)]

    recs = [r for f in files for r in records.read_records(os.path.join(out, f))]
    # Shards hold generate's seeded permutation of the captions, not runs of them.
    assert [r.caption_id for r in recs] == np.concatenate(caption_order.shard_slices(5, 2)).tolist()
    assert caption_order.is_permuted(manifest)
    recs.sort(key=lambda r: r.caption_id)
    assert [r.caption for r in recs] == [s.text for s in T.sample_captions(5, 11)]
    with open(os.path.join(out, T.CAPTIONS_NAME), encoding="utf-8") as f:
        assert f.read().splitlines() == [r.caption for r in recs]
    for rec in recs:
        assert len(rec.images) == len(rec.seeds) == 3 and len(set(rec.seeds)) == 3
        spec = T.parse_caption(rec.caption)
        for png, seed in zip(rec.images, rec.seeds):
            # The recorded seed re-renders the stored image exactly (PNG is lossless).
            np.testing.assert_array_equal(_decode(png), T.render_seeded(spec, seed, 24))

    # The tf.data parser that `train` uses reads the same records.
    ds = tf.data.TFRecordDataset([os.path.join(out, files[0])]).map(records.parse_example)
    first = next(iter(ds))
    assert first["caption"].numpy().decode() == recs[int(first["caption_id"])].caption
    assert first["images"].shape == (3,)
    assert tf.io.decode_png(first["images"][0]).shape == (24, 24, 3)


def test_toy_dataset_rerun_keeps_shards_and_refuses_other_settings(tmp_path):
    out = str(tmp_path / "data")
    T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=0)
    shard = os.path.join(out, "train-00000-of-00001.tfrecord")
    before = os.path.getmtime(shard)
    T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=0)
    assert os.path.getmtime(shard) == before
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=1)


def test_toy_dataset_jpeg(tmp_path):
    out = str(tmp_path / "jpeg")
    T.write_toy_dataset(out, num_captions=2, images_per_caption=2, image_size=16, seed=0,
                        image_format="jpeg")
    rec = records.read_records(os.path.join(out, "train-00000-of-00001.tfrecord"))[0]
    assert rec.images[0][:2] == b"\xff\xd8"
    with pytest.raises(ValueError, match="image_format='gif'"):
        T.write_toy_dataset(str(tmp_path / "gif"), 2, 2, 16, 0, image_format="gif")


def test_probe_folder_layout(tmp_path):
    root = str(tmp_path / "probe")
    info = T.write_toy_probe_folder(root, "color", train_per_class=3, test_per_class=2,
                                    image_size=32, seed=5)
    assert info == {"labels": list(T.COLORS), "train": 18, "test": 12}
    assert sorted(os.listdir(root)) == sorted(["test", "train", T.PROBE_SETTINGS_NAME])
    assert not [p for _, _, names in os.walk(tmp_path) for p in names if p.endswith(".tmp")]
    for split, n in (("train", 3), ("test", 2)):
        assert sorted(os.listdir(os.path.join(root, split))) == sorted(T.COLORS)
        for color in T.COLORS:
            names = sorted(os.listdir(os.path.join(root, split, color)))
            assert names == [f"{i:05d}.png" for i in range(n)]
            image = np.asarray(Image.open(os.path.join(root, split, color, names[0])))
            assert image.shape == (32, 32, 3)
            hues = _object_pixels(image)[:, 0]
            assert np.median(_hue_distance(hues, T.COLOR_HUES[color])) < 0.03
    # Held out: the test renders are not copies of training renders.
    a = np.asarray(Image.open(os.path.join(root, "train", "red", "00000.png")))
    b = np.asarray(Image.open(os.path.join(root, "test", "red", "00000.png")))
    assert not np.array_equal(a, b)


def test_probe_folder_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="attribute='texture'"):
        T.write_toy_probe_folder(str(tmp_path / "x"), "texture", 1, 1, 16, 0)
    root = tmp_path / "full"
    root.mkdir()
    (root / "something").write_text("x")
    with pytest.raises(FileExistsError, match="not empty .no probe_settings.json"):
        T.write_toy_probe_folder(str(root), "shape", 1, 1, 16, 0)


def test_probe_folder_rerun_returns_when_complete_and_refuses_other_settings(tmp_path):
    root = str(tmp_path / "probe")
    T.write_toy_probe_folder(root, "shape", 1, 1, 16, 0)
    image = os.path.join(root, "test", "star", "00000.png")
    os.remove(image)      # a complete folder is not re-rendered, not even a missing image
    T.write_toy_probe_folder(root, "shape", 1, 1, 16, 0)
    assert not os.path.exists(image)
    settings = fileio.read_json(os.path.join(root, T.PROBE_SETTINGS_NAME))
    fileio.write_json_atomic(os.path.join(root, T.PROBE_SETTINGS_NAME),
                             {**settings, "complete": False})   # as a killed write leaves it
    T.write_toy_probe_folder(root, "shape", 1, 1, 16, 0)
    assert os.path.getsize(image) > 0
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        T.write_toy_probe_folder(root, "shape", 1, 1, 16, 1)


def test_named_hues_stay_apart_under_the_augmentations_hue_jitter():
    """The strong recipe's hue jitter (augment.JITTER[3]) cannot move a named colour onto another."""
    from stablerep_jax.data import augment
    hues = sorted(T.COLOR_HUES.values())
    gaps = np.diff(hues + [hues[0] + 1.0])
    assert gaps.min() > augment.JITTER[3]


def test_real_stream_renders_other_pictures_of_the_same_captions(tmp_path):
    """The demo's "real" set (one image per caption) and its synthetic set (K per caption):
    the same captions and ids, and no image in common."""
    synthetic = T.write_toy_dataset(str(tmp_path / "s"), 6, 3, 24, seed=5)
    real = T.write_toy_dataset(str(tmp_path / "r"), 6, 1, 24, seed=5, stream="real")
    assert real["images_per_caption"] == 1 and synthetic["images_per_caption"] == 3
    assert real["settings"]["stream"] == "real"

    def read(directory):
        return {r.caption_id: r for path in sorted(tf.io.gfile.glob(f"{directory}/*.tfrecord"))
                for r in records.read_records(path)}
    s_recs, r_recs = read(tmp_path / "s"), read(tmp_path / "r")
    assert {i: r.caption for i, r in s_recs.items()} == {i: r.caption for i, r in r_recs.items()}
    for cid, r in r_recs.items():
        assert not set(r.seeds) & set(s_recs[cid].seeds)
        assert all(r.images[0] != image for image in s_recs[cid].images)
    with pytest.raises(ValueError, match="stream='photo'"):
        T.write_toy_dataset(str(tmp_path / "x"), 6, 1, 24, seed=5, stream="photo")


def test_probe_set_labels_each_image_by_every_attribute(tmp_path):
    root = str(tmp_path / "set")
    captions = T.write_toy_probe_set(root, 12, 5, 24, seed=3)
    split = T.read_toy_probe_set(root)
    assert [len(split[s][0]) for s in ("train", "test")] == [12, 5]
    assert [s.text for s in split["train"][1]] == captions["train"]
    paths, specs = split["test"]
    for path, spec in zip(paths, specs):
        image = _decode(fileio.read_bytes(path))
        assert image.shape == (24, 24, 3)
    for attribute, values in T.ATTRIBUTE_VALUES.items():
        labels = T.attribute_labels(specs, attribute)
        assert [values[i] for i in labels] == [s.label(attribute) for s in specs]
    with pytest.raises(ValueError, match="attribute='hue'"):
        T.attribute_labels(specs, "hue")


def test_probe_set_rerun_returns_when_complete_and_refuses_other_settings(tmp_path):
    root = str(tmp_path / "set")
    T.write_toy_probe_set(root, 3, 2, 16, seed=0)
    image = os.path.join(root, "test", "00001.png")
    os.remove(image)      # complete: not re-rendered
    T.write_toy_probe_set(root, 3, 2, 16, seed=0)
    assert not os.path.exists(image)
    settings = fileio.read_json(os.path.join(root, T.PROBE_SET_NAME))
    fileio.write_json_atomic(os.path.join(root, T.PROBE_SET_NAME),
                             {k: v for k, v in settings.items() if k != "captions"}
                             | {"complete": False})              # as a killed write leaves it
    with pytest.raises(ValueError, match="incomplete"):
        T.read_toy_probe_set(root)
    T.write_toy_probe_set(root, 3, 2, 16, seed=0)
    assert os.path.getsize(image) > 0
    assert T.read_toy_probe_set(root)["test"][1] == [T.parse_caption(t) for t in settings["captions"]["test"]]
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        T.write_toy_probe_set(root, 3, 2, 16, seed=1)


def test_toy_data_on_a_url_is_read_back_by_train(tmp_path):
    """The whole data set and the probe folder go through tf.io.gfile (ram:// here, gs:// in a
    bucket): nothing lands on the local disk, and the train pipeline reads the shards."""
    out = f"ram://toy-{os.getpid()}/data"
    manifest = T.write_toy_dataset(out, num_captions=6, images_per_caption=2, image_size=16,
                                   seed=3, captions_per_shard=4)
    assert manifest["num_shards"] == 2
    assert fileio.read_json(os.path.join(out, T.SUMMARY_NAME))["images"] == 12
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":tiny")
    config.data.train_files = os.path.join(out, "*" + records.SHARD_SUFFIX)
    config.data.image_size = 8
    config.data.permute_window = 8
    it = pipeline.make_train_iterator(config.data, batch_size=3, seed=0)
    batch = next(it)
    assert batch["images"].shape == (3, 2, 8, 8, 3)
    labels = np.concatenate([batch["labels"], next(it)["labels"]]).tolist()
    assert sorted(labels) == list(range(6))       # one epoch of 2 steps sees every caption

    root = f"ram://toy-{os.getpid()}/probe"
    T.write_toy_probe_folder(root, "size", 2, 1, 16, 0)
    png = fileio.read_bytes(os.path.join(root, "train", "large", "00001.png"))
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (16, 16, 3)
    assert fileio.read_json(os.path.join(root, T.PROBE_SETTINGS_NAME))["complete"] is True
    # ... and the probe's data loader lists and reads that folder on the URL too.
    data = eval_data.load_eval_dataset(f"folder:{root}")
    assert data.class_names == ("large", "small")
    assert len(data.train.files) == 4 and all(f.startswith("ram://") for f in data.train.files)
    first = next(eval_data.eval_batches(data.test, image_size=8, global_batch=2))
    assert first["image"].shape[1:] == (8, 8, 3)


def test_toy_dataset_records_its_render_rate_like_generate(tmp_path):
    """summary.json in generate's shape (a `runs` list), one run per call that rendered."""
    from stablerep_jax.demo import report

    out = str(tmp_path / "data")
    T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=0,
                        captions_per_shard=2)
    summary = fileio.read_json(os.path.join(out, T.SUMMARY_NAME))
    (run,) = summary["runs"]
    assert run["images"] == 6 and run["seconds"] > 0 and run["devices"] == 1
    assert run["images_per_s"] == pytest.approx(6 / run["seconds"])
    os.remove(os.path.join(out, "train-00001-of-00002.tfrecord"))
    T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=0,
                        captions_per_shard=2)
    summary = fileio.read_json(os.path.join(out, T.SUMMARY_NAME))
    assert [r["images"] for r in summary["runs"]] == [6, 2] and summary["images"] == 8
    T.write_toy_dataset(out, num_captions=3, images_per_caption=2, image_size=16, seed=0,
                        captions_per_shard=2)           # nothing rendered: no run added
    assert len(fileio.read_json(os.path.join(out, T.SUMMARY_NAME))["runs"]) == 2
    fig = report.throughput_figure(summary["runs"])
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx(
        [r["images_per_s"] for r in summary["runs"]])
