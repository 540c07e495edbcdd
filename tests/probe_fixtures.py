"""Shared test data for the linear probe and k-NN tests: a tiny random-init encoder checkpoint,
toy-world image folders and a tiny TFDS dataset prepared offline."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from stablerep_jax import checkpoint, config_utils
from stablerep_jax.demo import toy_world as T
from stablerep_jax.models.encoder import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
MODEL_CONFIG = {"variant": "tiny", "depth": 1, "patch_size": 8, "mlp_dim": 32, "emb_dim": 16,
                "dtype": "float32", "image_size": IMAGE_SIZE}


def save_tiny_encoder(directory: str, seed: int = 0, dtype: str = "float32") -> str:
    """A 1-block ViT-Tiny (width 192, 32px, patch 8), random init, saved like `train` does
    (`dtype` is the compute dtype its model config records, as a bf16 training run's does)."""
    model_config = {**MODEL_CONFIG, "dtype": dtype}
    model = build_model(model_config)
    variables = model.init(jax.random.PRNGKey(seed),
                           jnp.zeros((2, 2, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False)
    checkpoint.save_model(directory, 0, variables["params"], variables.get("batch_stats", {}),
                          model_config)
    return directory


def write_tinted_folder(root: str, train_per_class: int, test_per_class: int,
                        shuffle_labels: bool = False, seed: int = 0) -> str:
    """Toy-world renders (random captions) with a 50% colour cast of their class's hue over the
    whole frame: classes a linear probe on any reasonable features can separate. With
    `shuffle_labels` each image goes to a random class folder instead (nothing to learn)."""
    rng_labels = np.random.default_rng(seed + 1000)
    for split_id, (split, n) in enumerate((("train", train_per_class), ("test", test_per_class))):
        for color in T.COLORS:
            os.makedirs(os.path.join(root, split, color), exist_ok=True)
        for ci, color in enumerate(T.COLORS):
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, ci, i])
                image = T.render(T.random_spec(rng), rng, 40).astype(np.float32) / 255.0
                tint = T._hsv_to_rgb(T.COLOR_HUES[color], 0.8, 1.0) * rng.uniform(0.6, 1.0)
                image = 0.5 * image + 0.5 * tint
                label = T.COLORS[rng_labels.integers(len(T.COLORS))] if shuffle_labels else color
                Image.fromarray((image * 255).astype(np.uint8)).save(
                    os.path.join(root, split, label, f"{ci}_{i:05d}.png"))
    return root


def probe_config(checkpoint_dir: str, folder: str, **overrides):
    """The default preset (what the demo loads) pointed at a folder, sized for tests, in the
    fast cached-features mode unless `mode="augmented"` is passed."""
    c = config_utils.load_config(os.path.join(REPO, "configs", "linear_probe.py"))
    c.checkpoint = checkpoint_dir
    c.dataset = f"folder:{folder}"
    c.mode = "cached_features"
    c.epochs = 30
    c.batch_size = 48
    c.extract_batch_size = 40          # 96 test images -> 3 batches, the last one padded
    c.base_lrs = (0.03, 0.3, 3.0)
    for key, value in overrides.items():
        config_utils.apply_overrides(c, {key: value})
    return c


class TinyTinted(tfds.core.GeneratorBasedBuilder):
    """`tiny_tinted`: 3 classes of 20px noise images, each with its class's channel raised."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(20, 20, 3)),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(24, 0), "test": self._generate_examples(13, 1)}

    def _generate_examples(self, n, split_id):
        for i in range(n):
            rng = np.random.default_rng([split_id, i])
            image = rng.integers(0, 80, (20, 20, 3))
            image[..., i % 3] += 150
            yield i, {"image": image.astype(np.uint8), "label": i % 3}


def prepare_tiny_tfds(data_dir: str) -> str:
    """Prepares `tiny_tinted` in `data_dir` with no download; returns its TFDS name."""
    TinyTinted(data_dir=data_dir).download_and_prepare()
    return "tiny_tinted"
