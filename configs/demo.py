r"""The whole StableRep chain on a laptop CPU in minutes: generate -> train -> linear probe.

  python -m stablerep_jax.demo --workdir=/tmp/stablerep_demo

The default generator is a procedural text-to-image renderer (`generation/toy_world.py`): each
caption ("two small red triangles on a striped background") is rendered K times with random
placement, size, rotation, lighting and clutter. The demo trains StableRep (multi-positive, several
images per caption) and the SimCLR baseline (one image per caption, two crops) on the same images
with the same number of views (crops) per step and steps, then linear-probes held-out renders by an
attribute (default: the background pattern) with both encoders and with a randomly
initialised one.

The jobs' own configs are nested here, built from their config files, so every field of the
runs is one override away and nothing is copied by hand:
  train    configs/stablerep.py:tiny with the demo's sizes: the StableRep run
           (--config.train.model.depth=4, --config.train.total_steps=100, ...)
  simclr   the SimCLR baseline: every field follows `train` (an override of train.X changes
           both runs) except its view layout (data.n_img=1, data.num_crop=2) and batch_size
           (half of train's views per step in captions, so both encode as many views per step,
           as in the paper); an override of simclr.X changes SimCLR alone
  sd       configs/generate.py:sd15 for generator=sd (model, K, stored size and seed follow the
           demo's fields; captions and output_dir are set by the demo)
  probe    configs/linear_probe.py:folder, run once per encoder (checkpoint and dataset are
           set by the demo). mode=cached_features: centre-crop features extracted once, heads
           trained on them (the fast deviation from the reference protocol's augmented views,
           chosen so the demo stays within minutes on 2 CPU cores; see the README)
`seed` seeds the data and, unless overridden there, train.seed, simclr.seed, probe.seed
and sd.seed.

With a real Stable Diffusion (diffusers folder or hub id) the same chain runs on its images:

  python -m stablerep_jax.demo --workdir=/tmp/sd_demo --config.generator=sd \
      --config.model=/models/stable-diffusion-v1-5

Presets: `default` (about 5-10 minutes on 2 CPU cores) and `test` (a reduced size for the suite).
"""
import os

import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import load_config, parse_preset

PRESETS = ("default", "test")
CONFIGS_DIR = os.path.dirname(os.path.abspath(__file__))
# SimCLR's own fields; all others follow `train`.
SIMCLR_OWN = ("batch_size", "data.n_img", "data.num_crop")


def _job_config(name: str) -> ml_collections.ConfigDict:
    return load_config(os.path.join(CONFIGS_DIR, name))


def train_config(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """The StableRep run: the `tiny` preset at the demo's sizes."""
    t = _job_config("stablerep.py:tiny")
    t.seed = c.get_ref("seed").identity()
    t.batch_size = 32                   # captions per step (x data.n_img images)
    t.total_steps = 300
    t.checkpoint_every = t.get_ref("total_steps").identity()
    t.log_every = 5
    t.data.n_img, t.data.num_crop = 2, 1
    t.model.image_size = 48             # crop side fed to the ViT (data.image_size follows)
    t.data.min_crop_scale = 0.3         # tiny objects vanish in 8% crops of 64px images
    t.model.variant = "tiny"            # ViT width 192, with the depth below
    t.model.depth = 4
    t.model.patch_size = 8
    t.model.mlp_dim = 256
    t.model.emb_dim = 64
    t.optim.blr = 1.5e-3
    t.optim.lr = 0.0
    t.optim.warmup_steps = t.get_ref("total_steps") // 10
    if preset == "test":
        t.batch_size = 16
        t.total_steps = 40
        t.model.image_size = 32
        t.model.depth = 2
        t.model.mlp_dim = 128
        t.model.emb_dim = 32
    return t


def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = ""):
    for key in config.keys():
        value = config[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def _node(config, dotted: str):
    *parents, leaf = dotted.split(".")
    for name in parents:
        config = config[name]
    return config, leaf


def simclr_config(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """SimCLR at StableRep's budget: each field a reference that follows `train` until it is
    overridden itself, except the view layout and the captions per batch (`SIMCLR_OWN`)."""
    s = _job_config("stablerep.py:tiny")
    for key in _leaf_keys(train):
        node, leaf = _node(train, key)
        if key in SIMCLR_OWN or node[leaf] is None:   # placeholders stay unset, as in `train`
            continue
        if key == "data.image_size":    # follows s.model.image_size (configs/stablerep.py)
            continue
        target, target_leaf = _node(s, key)
        target[target_leaf] = node.get_ref(leaf).identity()
    s.data.n_img, s.data.num_crop = 1, 2
    # Equal views per step (the encoder's compute), as the paper's SimCLR baseline (4096
    # captions x 2 crops against StableRep's 1376 x 6): half as many captions as train's views.
    s.batch_size = (train.get_ref("batch_size") * train.data.get_ref("n_img")
                    * train.data.get_ref("num_crop")) // 2
    return s


def probe_config(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """The linear probe run on each encoder (checkpoint and dataset: set by the demo)."""
    p = _job_config("linear_probe.py:folder")
    p.seed = c.get_ref("seed").identity()
    p.mode = "cached_features"          # see the module docstring
    p.epochs = 40 if preset == "test" else 100
    p.eval_every = 10
    p.batch_size = 32
    p.use_bn = True                     # BatchNorm without affine before the classifier
    # Wide enough that every encoder's best lr lies inside (not at an end) in our runs.
    p.base_lrs = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    return p


def sd_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """generate's run for generator=sd (captions and output_dir: set by the demo)."""
    g = _job_config("generate.py:sd15")
    g.model = c.get_ref("model").identity()
    g.images_per_caption = c.get_ref("images_per_caption").identity()
    g.save_size = c.get_ref("stored_size").identity()
    g.seed = c.get_ref("seed").identity()
    g.num_inference_steps = 25
    g.image_format = "png"
    return g


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, PRESETS, default="default")
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.seed = 0
    c.generator = "toy"                       # "toy" or "sd"
    c.model = config_dict.placeholder(str)    # Stable Diffusion for generator=sd

    c.num_captions = 96 if preset == "test" else 384
    c.images_per_caption = 4                  # K rendered per caption
    c.stored_size = 40 if preset == "test" else 64   # stored image side (pixels)
    c.sd = sd_config(c)
    # Where the encoders' orbax checkpoints go (default WORKDIR/<run>); set it when WORKDIR is
    # a URL that orbax cannot write (ram://).
    c.checkpoint_dir = config_dict.placeholder(str)

    c.train = train_config(c, preset)
    c.train_simclr = True                     # also train the SimCLR baseline, same budget
    c.simclr = simclr_config(c.train)

    # Which caption attribute the probe classifies: background, shape, color, count or size.
    # Background patterns survive the strong augmentations; colour does not (colour jitter and
    # grayscale make contrastive encoders colour-invariant on purpose), and shapes of objects a
    # few pixels wide need far longer training than a CPU demo has.
    c.probe_attribute = "background"
    c.probe_train_per_class = 40 if preset == "test" else 60
    c.probe_test_per_class = 40 if preset == "test" else 30
    c.probe = probe_config(c, preset)
    return c
