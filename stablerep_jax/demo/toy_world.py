"""A toy text-to-image world: the demo's generator when no Stable Diffusion is at hand.

Captions come from a small grammar ("two small red triangles on a striped background"):
count (one/two/three), size (small/large), colour (6), shape (5) and background pattern (5).
`render` draws one picture of a caption with numpy + PIL; every render draws its own placement,
size jitter, rotation, colour jitter, pattern geometry, clutter, shadows and lighting from the
given generator, so K renders of one caption are different pictures of the same described
content, which is exactly what StableRep's multi-positive loss needs. The attributes also make
labelled probe sets (`write_toy_probe_folder`): classify held-out renders by shape or colour.

Determinism: an image depends only on (caption, image seed, size); `write_toy_dataset` derives
the image seed from (seed, caption_id, k) and records it, so any stored image can be re-rendered.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageDraw
from tqdm import tqdm

from stablerep_jax import fileio
from stablerep_jax.data import caption_order, records

COUNT_WORDS = ("one", "two", "three")
SIZES = ("small", "large")
# Hues (fraction of the colour wheel) a sixth of the wheel apart: the strong augmentation's hue
# jitter (at most +-0.1) never moves one named colour onto another, so colour stays learnable.
COLOR_HUES = {"red": 0.0, "yellow": 1 / 6, "green": 2 / 6, "cyan": 3 / 6, "blue": 4 / 6,
              "purple": 5 / 6}
COLORS = tuple(COLOR_HUES)
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
BACKGROUNDS = ("plain", "striped", "dotted", "checkered", "gradient")
ATTRIBUTE_VALUES = {"count": COUNT_WORDS, "size": SIZES, "color": COLORS, "shape": SHAPES,
                    "background": BACKGROUNDS}
IMAGE_FORMATS = records.IMAGE_FORMATS
SHARD_PREFIX = "train"
SETTINGS_NAME = "toy_settings.json"
CAPTIONS_NAME = "captions.txt"
SUMMARY_NAME = "summary.json"         # render throughput, in generate's summary.json shape
PROBE_SETTINGS_NAME = "probe_settings.json"   # written first; `complete` set when all is written
RENDERER_VERSION = 2          # bump when `render` changes what a seed draws

# Object radius (circumradius) as a fraction of the image side, before per-object jitter: in the
# demo's 32px crops (8px patches) a small object spans about one patch in a whole-image crop and
# more in a closer one, a large one about two.
_RADIUS = {"small": (0.10, 0.125), "large": (0.18, 0.23)}


@dataclasses.dataclass(frozen=True)
class CaptionSpec:
    """The described content of a caption; `.text` is the caption, `parse_caption` its inverse."""
    count: int
    size: str
    color: str
    shape: str
    background: str

    def __post_init__(self):
        if self.count not in (1, 2, 3):
            raise ValueError(f"count={self.count!r}: must be 1, 2 or 3")
        for name, allowed in (("size", SIZES), ("color", COLORS), ("shape", SHAPES),
                              ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")

    @property
    def text(self) -> str:
        noun = self.shape if self.count == 1 else PLURALS[self.shape]
        return (f"{COUNT_WORDS[self.count - 1]} {self.size} {self.color} {noun} "
                f"on a {self.background} background")

    def label(self, attribute: str) -> str:
        """The value of one attribute as a class name (count as its word)."""
        if attribute not in ATTRIBUTE_VALUES:
            raise ValueError(f"attribute={attribute!r}: choose one of {tuple(ATTRIBUTE_VALUES)}")
        return COUNT_WORDS[self.count - 1] if attribute == "count" else getattr(self, attribute)


def parse_caption(text: str) -> CaptionSpec:
    """'two small red triangles on a striped background' -> CaptionSpec; strict grammar."""
    words = text.strip().lower().split()
    form = "<count> <size> <color> <shape(s)> on a <background> background"
    if len(words) != 8 or words[4:6] != ["on", "a"] or words[7] != "background":
        raise ValueError(f"caption {text!r} does not follow the toy grammar '{form}'")
    count_word, size, color, noun, background = words[0], words[1], words[2], words[3], words[6]
    for word, allowed, what in ((count_word, COUNT_WORDS, "count"), (size, SIZES, "size"),
                                (color, COLORS, "color"), (background, BACKGROUNDS, "background")):
        if word not in allowed:
            raise ValueError(f"caption {text!r}: unknown {what} word {word!r}; "
                             f"known: {', '.join(allowed)}")
    count = COUNT_WORDS.index(count_word) + 1
    singular = {p: s for s, p in PLURALS.items()}
    shape = noun if noun in SHAPES else singular.get(noun)
    if shape is None:
        raise ValueError(f"caption {text!r}: unknown shape word {noun!r}; known: "
                         f"{', '.join(SHAPES)} (plural: {', '.join(PLURALS.values())})")
    expected = shape if count == 1 else PLURALS[shape]
    if noun != expected:
        raise ValueError(f"caption {text!r}: {count_word!r} needs {expected!r}, not {noun!r}")
    return CaptionSpec(count, size, color, shape, background)


def all_specs() -> list[CaptionSpec]:
    """Every caption of the grammar, in a fixed order."""
    return [CaptionSpec(n, s, c, sh, b) for n in (1, 2, 3) for s in SIZES for c in COLORS
            for sh in SHAPES for b in BACKGROUNDS]


def sample_captions(n: int, seed: int) -> list[CaptionSpec]:
    """`n` distinct captions, a seeded random draw from the grammar (at most all of it)."""
    specs = all_specs()
    if not 0 < n <= len(specs):
        raise ValueError(f"num_captions={n}: the toy grammar has {len(specs)} distinct captions; "
                         f"ask for 1..{len(specs)}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0x70F])).permutation(len(specs))
    return [specs[i] for i in order[:n]]


def random_spec(rng: np.random.Generator, **fixed) -> CaptionSpec:
    """A uniformly random caption with some attributes fixed (count given as an int or word)."""
    values = {name: allowed[rng.integers(len(allowed))] for name, allowed in ATTRIBUTE_VALUES.items()}
    values.update(fixed)
    count = values.pop("count")
    count = COUNT_WORDS.index(count) + 1 if isinstance(count, str) else int(count)
    return CaptionSpec(count=count, **values)


# --------------------------------------------------------------------------------------------
# Rendering


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _neutral(rng: np.random.Generator, v_range=(0.3, 0.95)) -> np.ndarray:
    """A low-saturation colour: backgrounds and clutter never look like a named colour."""
    return _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.22), rng.uniform(*v_range))


def _background(pattern: str, rng: np.random.Generator, side: int) -> np.ndarray:
    """float [side, side, 3] in [0, 1]; the pattern's geometry and colours are random."""
    c1 = _neutral(rng)
    c2 = _neutral(rng)
    if abs(c1.mean() - c2.mean()) < 0.2:       # keep the pattern visible
        c2 = np.clip(c1 + (0.3 if c1.mean() < 0.6 else -0.3), 0.0, 1.0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    angle = rng.uniform(0, math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    if pattern == "plain":
        mask = np.zeros_like(xx)
    elif pattern == "striped":
        period = rng.uniform(0.08, 0.22)
        mask = ((u / period + rng.random()) % 1.0 < rng.uniform(0.35, 0.6)).astype(np.float32)
    elif pattern == "checkered":
        cell = rng.uniform(0.08, 0.2)
        mask = ((np.floor(u / cell + rng.random()) + np.floor(v / cell + rng.random())) % 2)
    elif pattern == "dotted":
        spacing = rng.uniform(0.09, 0.2)
        fu = (u / spacing + rng.random()) % 1.0 - 0.5
        fv = (v / spacing + rng.random()) % 1.0 - 0.5
        mask = (fu ** 2 + fv ** 2 < rng.uniform(0.15, 0.3) ** 2).astype(np.float32)
    elif pattern == "gradient":
        mask = np.clip((u - u.min()) / max(float(np.ptp(u)), 1e-6), 0.0, 1.0)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}; choose one of {BACKGROUNDS}")
    return c1 * (1.0 - mask[..., None]) + c2 * mask[..., None]


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list:
    """Vertices of `shape` with circumradius `radius`, rotated by `angle`."""
    if shape == "circle":
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 48, endpoint=False)]
    elif shape == "square":
        pts = [(math.cos(t), math.sin(t)) for t in (np.arange(4) + 0.5) * math.pi / 2]
    elif shape == "triangle":
        pts = [(math.cos(t), math.sin(t)) for t in np.arange(3) * 2 * math.pi / 3 - math.pi / 2]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(t), (1.0 if i % 2 == 0 else 0.45) * math.sin(t))
               for i, t in enumerate(np.arange(10) * math.pi / 5 - math.pi / 2)]
    elif shape == "cross":
        a, b = 0.3, 0.95        # arm half-width, arm length (x circumradius / sqrt(a^2 + b^2))
        norm = math.hypot(a, b)
        pts = [(x / norm, y / norm) for x, y in
               ((a, b), (a, a), (b, a), (b, -a), (a, -a), (a, -b), (-a, -b), (-a, -a), (-b, -a),
                (-b, a), (-a, a), (-a, b))]
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + radius * (x * ca - y * sa), cy + radius * (x * sa + y * ca)) for x, y in pts]


def _place(rng: np.random.Generator, radii: Sequence[float], side: float) -> list[tuple]:
    """Non-overlapping centres (rejection sampling; shrinks everything if a layout will not fit)."""
    radii = list(radii)
    for _ in range(50):
        centres = []
        for r in radii:
            for _ in range(200):
                c = rng.uniform(r * 1.05, side - r * 1.05, size=2)
                if all(math.dist(c, c2) > (r + r2) * 1.08 for c2, r2 in centres):
                    centres.append((c, r))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
        radii = [r * 0.92 for r in radii]
    raise RuntimeError(f"could not place {len(radii)} objects")   # unreachable for our sizes


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, side: int) -> None:
    """0-4 small neutral distractors (strokes, rings, specks) under the objects."""
    for _ in range(rng.integers(0, 5)):
        colour = tuple(int(255 * c) for c in _neutral(rng, (0.1, 1.0))) + (int(rng.uniform(120, 230)),)
        kind = rng.integers(3)
        x, y = rng.uniform(0, side, size=2)
        width = max(1, int(side * rng.uniform(0.008, 0.02)))
        if kind == 0:
            length, angle = side * rng.uniform(0.1, 0.35), rng.uniform(0, 2 * math.pi)
            draw.line([(x, y), (x + length * math.cos(angle), y + length * math.sin(angle))],
                      fill=colour, width=width)
        elif kind == 1:
            r = side * rng.uniform(0.02, 0.05)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
        else:
            r = side * rng.uniform(0.008, 0.02)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)


def _object_colour(colour: str, rng: np.random.Generator) -> tuple:
    hue = (COLOR_HUES[colour] + rng.normal(0.0, 0.012)) % 1.0
    value = rng.uniform(0.8, 1.0) if colour == "yellow" else rng.uniform(0.62, 1.0)
    rgb = _hsv_to_rgb(hue, rng.uniform(0.7, 1.0), value)
    return tuple(int(round(255 * c)) for c in rgb)


def render(spec: CaptionSpec, rng: np.random.Generator, size: int) -> np.ndarray:
    """One picture of `spec`: uint8 [size, size, 3]. All randomness comes from `rng`."""
    if size < 8:
        raise ValueError(f"image size {size}: must be at least 8 pixels")
    ss = 4 if size <= 96 else 2                      # supersampling for smooth edges
    side = size * ss
    canvas = Image.fromarray((_background(spec.background, rng, side) * 255).astype(np.uint8))
    canvas = canvas.convert("RGBA")
    overlay = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    _draw_clutter(ImageDraw.Draw(overlay), rng, side)
    canvas = Image.alpha_composite(canvas, overlay)

    lo, hi = _RADIUS[spec.size]
    radii = [side * rng.uniform(lo, hi) for _ in range(spec.count)]
    shadow = rng.random() < 0.4
    shadow_offset = side * rng.uniform(0.01, 0.03, size=2)
    outline = rng.random() < 0.5
    for centre, radius in _place(rng, radii, side):
        polygon = _shape_polygon(spec.shape, centre[0], centre[1], radius, rng.uniform(0, 2 * math.pi))
        fill = _object_colour(spec.color, rng)
        layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        if shadow:
            draw.polygon([(x + shadow_offset[0], y + shadow_offset[1]) for x, y in polygon],
                         fill=(0, 0, 0, 90))
        dark = tuple(int(c * 0.55) for c in fill) + (255,)
        draw.polygon(polygon, fill=fill + (255,),
                     outline=dark if outline else None, width=max(1, side // 64) if outline else 1)
        canvas = Image.alpha_composite(canvas, layer)

    image = np.asarray(canvas.convert("RGB").resize((size, size), Image.Resampling.BOX),
                       np.float32) / 255.0
    # Lighting: global brightness, a directional falloff and sensor noise.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    light = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0.0, 0.35) * (xx * math.cos(light) + yy * math.sin(light))
    image = image * rng.uniform(0.75, 1.2) * shade[..., None]
    image = image + rng.normal(0.0, rng.uniform(0.0, 0.025), size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_seed(seed: int, *path: int) -> int:
    """A 63-bit seed for one image from the run seed and its position (caption_id, k, ...)."""
    state = np.random.SeedSequence([int(seed), *[int(p) for p in path]]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def render_seeded(spec: CaptionSpec, seed: int, size: int) -> np.ndarray:
    """`render` with a fresh generator from a recorded image seed."""
    return render(spec, np.random.default_rng(seed), size)


# --------------------------------------------------------------------------------------------
# Writers


# Image-seed streams: the same captions rendered as the "synthetic" data set (K images each,
# the generator's output) and as the "real" one (one image each, as CC12M has one photo per
# caption). Different streams never share an image seed.
STREAMS = {"synthetic": (), "real": (0x2EA1,)}


def write_toy_dataset(output_dir: str, num_captions: int, images_per_caption: int,
                      image_size: int, seed: int, captions_per_shard: int = 256,
                      image_format: str = "png", stream: str = "synthetic") -> dict:
    """Renders `images_per_caption` images of `num_captions` sampled captions into TFRecord
    shards (the `records` schema, seeds recorded), `captions.txt` and `manifest.json`. Shard S
    holds the captions `caption_order` assigns it (a seeded permutation, as generate writes).
    `stream` picks the image seeds (`STREAMS`): "real" renders other pictures of the same
    captions (the sample depends only on `seed` and `num_captions`).

    Shards are atomic; a rerun with the same settings keeps finished shards. Returns the manifest.
    """
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r}: choose one of {tuple(STREAMS)}")
    if images_per_caption < 1 or captions_per_shard < 1:
        raise ValueError(f"images_per_caption={images_per_caption}, captions_per_shard="
                         f"{captions_per_shard}: both must be >= 1")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}: choose one of {IMAGE_FORMATS}")
    specs = sample_captions(num_captions, seed)
    settings = {"generator": "toy", "renderer_version": RENDERER_VERSION,
                "num_captions": num_captions, "images_per_caption": images_per_caption,
                "image_size": image_size, "seed": seed, "captions_per_shard": captions_per_shard,
                "image_format": image_format, "stream": stream,
                caption_order.ORDER_KEY: caption_order.order_info()}
    fileio.makedirs(output_dir)
    path = os.path.join(output_dir, SETTINGS_NAME)
    if not records.check_rerun_settings(path, settings):
        fileio.write_json_atomic(path, settings)
    fileio.write_text_atomic(os.path.join(output_dir, CAPTIONS_NAME), "".join(s.text + "\n" for s in specs))

    slices = caption_order.shard_slices(num_captions, captions_per_shard)
    shards, rendered, seconds = {}, 0, 0.0
    with tqdm(total=num_captions * images_per_caption, desc="toy images", unit="img") as bar:
        for index, ids in enumerate(slices):
            name = f"{SHARD_PREFIX}-{index:05d}-of-{len(slices):05d}{records.SHARD_SUFFIX}"
            shards[name] = {"captions": len(ids), "images": len(ids) * images_per_caption}
            if fileio.exists(os.path.join(output_dir, name)):
                bar.update(shards[name]["images"])
                continue
            start = time.perf_counter()
            records.write_shard(os.path.join(output_dir, name),
                                _shard_records(specs, ids.tolist(), images_per_caption,
                                               image_size, seed, image_format, bar,
                                               STREAMS[stream]))
            seconds += time.perf_counter() - start
            rendered += shards[name]["images"]
    if rendered:
        _add_summary_run(output_dir, rendered, seconds, image_size)
    manifest = records.write_manifest(
        output_dir, shards, images_per_caption=images_per_caption, complete=True,
        total_captions=num_captions, num_caption_ids=num_captions, image_format=image_format,
        save_size=image_size, settings=settings,
        **{caption_order.ORDER_KEY: caption_order.order_info()})
    logging.info("toy dataset: %d captions x %d images in %s", num_captions, images_per_caption,
                 output_dir)
    return manifest


def _add_summary_run(output_dir: str, images: int, seconds: float, image_size: int) -> dict:
    """Appends this run's render rate to OUTPUT_DIR/summary.json in the shape generate writes
    (a `runs` list and totals), so the demo plots the toy renderer's throughput like a real
    generator's. The renderer is numpy + PIL in this process: one CPU core, counted as 1 device.
    `seconds` covers render, encode and shard writing, as generate's do."""
    path = os.path.join(output_dir, SUMMARY_NAME)
    runs = fileio.read_json(path)["runs"] if fileio.exists(path) else []
    rate = images / seconds if seconds > 0 else 0.0
    runs.append({"images": images, "seconds": seconds, "images_per_s": rate,
                 "images_per_s_per_device": rate, "devices": 1,
                 "device_kind": "CPU core (toy renderer)", "image_size": image_size})
    total_images = sum(r["images"] for r in runs)
    total_seconds = sum(r["seconds"] for r in runs)
    summary = {"generator": "toy", "runs": runs, "images": total_images, "seconds": total_seconds,
               "images_per_s": total_images / total_seconds if total_seconds else 0.0}
    fileio.write_json_atomic(path, summary)
    return summary


def _shard_records(specs, caption_ids, k, image_size, seed, image_format, bar, stream=()):
    for cid in caption_ids:
        seeds = [image_seed(seed, *stream, cid, j) for j in range(k)]
        images = [records.encode_image(render_seeded(specs[cid], s, image_size), image_format) for s in seeds]
        bar.update(k)
        yield records.CaptionRecord(caption=specs[cid].text, caption_id=cid, images=images,
                                    seeds=seeds)


SPLITS = ("train", "test")


def write_toy_probe_folder(root: str, attribute: str, train_per_class: int, test_per_class: int,
                           image_size: int, seed: int) -> dict:
    """A labelled image folder `root/{train,test}/<value>/NNNNN.png` for the linear probe,
    local or on any tf.io.gfile URL.

    Labels are the values of `attribute`; every other attribute is drawn at random per image.
    `root/probe_settings.json` is written first and marked `complete` after the last image, so
    a rerun with the same settings returns at once when complete and otherwise renders what is
    missing (images are deterministic); a non-empty `root` without those settings is refused.
    Returns {"labels": [...], "train": count, "test": count}.
    """
    if attribute not in ATTRIBUTE_VALUES:
        raise ValueError(f"attribute={attribute!r}: choose one of {tuple(ATTRIBUTE_VALUES)}")
    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"train_per_class={train_per_class}, test_per_class={test_per_class}: "
                         "both must be >= 1")
    labels = ATTRIBUTE_VALUES[attribute]
    per_split = {"train": train_per_class, "test": test_per_class}
    info = {"labels": list(labels), "train": len(labels) * train_per_class,
            "test": len(labels) * test_per_class}
    settings = {"attribute": attribute, "train_per_class": train_per_class,
                "test_per_class": test_per_class, "image_size": image_size, "seed": seed,
                "renderer_version": RENDERER_VERSION}
    settings_path = os.path.join(root, PROBE_SETTINGS_NAME)
    previous = _probe_settings(root, settings_path, settings)
    if previous == {**settings, "complete": True}:
        return info
    fileio.write_json_atomic(settings_path, {**settings, "complete": False})
    with tqdm(total=info["train"] + info["test"], desc="probe images", unit="img") as bar:
        for split_id, split in enumerate(SPLITS):
            for label_id, label in enumerate(labels):
                directory = os.path.join(root, split, label)
                fileio.makedirs(directory)
                for i in range(per_split[split]):
                    path = os.path.join(directory, f"{i:05d}.png")
                    if not fileio.exists(path):
                        rng = np.random.default_rng(image_seed(seed, 0x9B0BE, split_id, label_id, i))
                        spec = random_spec(rng, **{attribute: label})
                        fileio.write_bytes_atomic(
                            path, records.encode_image(render(spec, rng, image_size), "png"))
                    bar.update(1)
    fileio.write_json_atomic(settings_path, {**settings, "complete": True})
    logging.info("probe folder %s: %d %s classes, %d train / %d test per class", root,
                 len(labels), attribute, train_per_class, test_per_class)
    return info


PROBE_SET_NAME = "probe_set.json"     # settings, then (when complete) every image's caption


def write_toy_probe_set(root: str, train_images: int, test_images: int, image_size: int,
                        seed: int) -> dict:
    """Held-out renders of random captions, labelled by every attribute at once:
    `root/{train,test}/NNNNN.png` and `root/probe_set.json`, which lists each image's caption.
    One set serves a probe per attribute (features are extracted once); the captions are drawn
    uniformly from the grammar, so every attribute value is equally likely.

    `probe_set.json` holds the settings first and the captions once every image is written, so
    a rerun with the same settings returns at once when complete and otherwise renders what is
    missing (images are deterministic); other settings, or a non-empty `root` that is not a
    probe set, are refused naming them. Returns {"train": [caption, ...], "test": [...]}.
    """
    if train_images < 1 or test_images < 1:
        raise ValueError(f"train_images={train_images}, test_images={test_images}: both must "
                         "be >= 1")
    counts = {"train": train_images, "test": test_images}
    settings = {"train_images": train_images, "test_images": test_images,
                "image_size": image_size, "seed": seed, "renderer_version": RENDERER_VERSION}
    path = os.path.join(root, PROBE_SET_NAME)
    previous = _probe_settings(root, path, settings)
    if previous is not None and previous.get("complete"):
        return previous["captions"]
    fileio.write_json_atomic(path, {**settings, "complete": False})
    captions = {}
    with tqdm(total=train_images + test_images, desc="probe images", unit="img") as bar:
        for split_id, split in enumerate(SPLITS):
            fileio.makedirs(os.path.join(root, split))
            captions[split] = []
            for i in range(counts[split]):
                rng = np.random.default_rng(image_seed(seed, 0x5E7, split_id, i))
                spec = random_spec(rng)
                captions[split].append(spec.text)
                image_path = os.path.join(root, split, f"{i:05d}.png")
                if not fileio.exists(image_path):
                    fileio.write_bytes_atomic(
                        image_path, records.encode_image(render(spec, rng, image_size), "png"))
                bar.update(1)
    fileio.write_json_atomic(path, {**settings, "complete": True, "captions": captions})
    logging.info("probe set %s: %d train / %d test renders of random captions", root,
                 train_images, test_images)
    return captions


def read_toy_probe_set(root: str) -> dict[str, tuple[list[str], list[CaptionSpec]]]:
    """{split: (image paths, caption specs)} of a complete `write_toy_probe_set` output."""
    path = os.path.join(root, PROBE_SET_NAME)
    if not fileio.exists(path):
        raise FileNotFoundError(f"{path} not found: write the probe set with write_toy_probe_set")
    info = fileio.read_json(path)
    if not info.get("complete"):
        raise ValueError(f"{path}: the probe set is incomplete (interrupted?); rerun "
                         "write_toy_probe_set with the same settings to finish it")
    return {split: ([os.path.join(root, split, f"{i:05d}.png") for i in range(len(texts))],
                    [parse_caption(t) for t in texts])
            for split, texts in info["captions"].items()}


def attribute_labels(specs: Sequence[CaptionSpec], attribute: str) -> np.ndarray:
    """int32 class indices of one attribute (its index in `ATTRIBUTE_VALUES[attribute]`)."""
    values = ATTRIBUTE_VALUES[attribute] if attribute in ATTRIBUTE_VALUES else None
    if values is None:
        raise ValueError(f"attribute={attribute!r}: choose one of {tuple(ATTRIBUTE_VALUES)}")
    return np.array([values.index(spec.label(attribute)) for spec in specs], np.int32)


def _probe_settings(root: str, settings_path: str, settings: dict) -> dict | None:
    """The settings file of an earlier write into `root` (None when `root` is absent or empty);
    raises when `root` holds something else, or images made with other settings (naming them)."""
    if not fileio.exists(root) or not _listdir(root):
        return None
    if not fileio.exists(settings_path):
        raise FileExistsError(f"{root} exists and is not empty (no "
                              f"{os.path.basename(settings_path)}: not a toy probe folder); "
                              "remove it or choose another root")
    previous = fileio.read_json(settings_path)
    progress = {k: previous[k] for k in ("complete", "captions") if k in previous}
    records.check_rerun_settings(settings_path, {**settings, **progress})
    return previous


def _listdir(path: str) -> list[str]:
    """Entries of a local or tf.io.gfile directory (TensorFlow imported on first use)."""
    import tensorflow as tf
    return tf.io.gfile.listdir(path)
