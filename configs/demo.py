r"""StableRep's finding in miniature on a laptop CPU: generate -> train three ways -> linear probe.

  python -m stablerep_jax.demo --workdir=/tmp/stablerep_demo

A toy text-to-image world (`stablerep_jax/demo/toy_world.py`) stands in for the photos and for
Stable Diffusion. Captions such as "two small red triangles on a striped background" describe an
object's count, size, colour and shape and the background pattern; every render draws what the
caption does not say (placement, rotation, size jitter, pattern geometry and colours, clutter,
shadows, lighting, noise) afresh. From one caption set the demo makes two data sets, as the paper
compares CC12M's photos with Stable Diffusion's images of the same captions:
  real       one render per caption (a photo per caption)
  synthetic  `images_per_caption` (K) other renders per caption (the generator's K samples)
and trains, at equal captions, steps and views (crops) per step:
  StableRep (synthetic)  multi-positive: data.n_img renders of each caption are positives
  SimCLR (synthetic)     one render per caption per step, two crops of it
  SimCLR (real)          the single real render, two crops of it
plus a randomly initialised encoder as the floor. The probe classifies held-out renders of random
captions by each attribute the captions describe (shape, colour, count, size, background) with a
linear classifier on frozen features, and reports each and their mean.

The jobs' own configs are nested here, built from their config files, so every field of the
runs is one override away and nothing is copied by hand:
  train    configs/stablerep.py:tiny with the demo's sizes: the StableRep run, 200 steps of 16
           captions x 4 renders at 32px (--config.train.total_steps=300, ...)
  simclr   SimCLR on the synthetic set: every field follows `train` (an override of train.X
           changes every run) except its view layout (data.n_img=1, data.num_crop=2),
           batch_size (half of train's views per step in captions, so every run encodes as many
           views per step, as in the paper) and optim.blr; an override of simclr.X changes SimCLR
  simclr_real  SimCLR on the real set: follows `simclr` except optim.blr
Each run's base lr is its best on benchmarks/demo_study.py's grid (`BLR`).
  sd       configs/generate.py:sd15 for generator=sd (model, K, stored size and seed follow the
           demo's fields; captions and output_dir are set by the demo)
  probe    configs/linear_probe.py:folder: its sweep (epochs, base lrs, batch, BN) runs on
           cached centre-crop features, once per encoder and attribute (the fast deviation from
           the reference protocol's augmented views, chosen so the demo stays within minutes on
           2 CPU cores; see REPRODUCING.md)
`seed` seeds the data and, unless overridden there, train.seed, simclr.seed, probe.seed
and sd.seed.

With a real Stable Diffusion (diffusers folder or hub id) the synthetic set is its images of the
same captions (the toy renders stay the "real" photos):

  python -m stablerep_jax.demo --workdir=/tmp/sd_demo --config.generator=sd \
      --config.model=/models/stable-diffusion-v1-5

Presets: `default` (under 5 minutes on one CPU device; benchmarks/RESULTS.md has the stage
times) and `test` (a reduced size for the suite).
`benchmarks/demo_study.py` runs the comparison over seeds and a base-lr grid.
"""
import os

import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import load_config, parse_preset

PRESETS = ("default", "test")
CONFIGS_DIR = os.path.dirname(os.path.abspath(__file__))
# SimCLR's own fields; all others follow `train`.
SIMCLR_OWN = ("batch_size", "data.n_img", "data.num_crop", "optim.blr")
# Each method's training base lr: the best of the grid 1.5e-3, 4.5e-3, 1.35e-2, 4.05e-2 on seed 0
# of `benchmarks/demo_study.py` (benchmarks/RESULTS.md), so no method runs at another's lr.
BLR = {"train": 4.5e-3, "simclr": 1.35e-2, "simclr_real": 1.35e-2}


def _job_config(name: str) -> ml_collections.ConfigDict:
    return load_config(os.path.join(CONFIGS_DIR, name))


def train_config(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """The StableRep run: the `tiny` preset at the demo's sizes."""
    t = _job_config("stablerep.py:tiny")
    t.seed = c.get_ref("seed").identity()
    t.batch_size = 16                   # captions per step (x data.n_img images)
    t.total_steps = 200
    t.checkpoint_every = t.get_ref("total_steps").identity()
    t.log_every = 5
    t.data.n_img, t.data.num_crop = 4, 1   # all K renders of each caption: 4 positives
    t.model.image_size = 32             # crop side fed to the ViT (data.image_size follows)
    t.data.min_crop_scale = 0.3         # tiny objects vanish in 8% crops of 48px images
    t.model.variant = "tiny"            # ViT width 192, with the depth below
    t.model.depth = 4
    t.model.patch_size = 8
    t.model.mlp_dim = 256
    t.model.emb_dim = 64
    t.optim.blr = BLR["train"]
    t.optim.lr = 0.0
    t.optim.warmup_steps = t.get_ref("total_steps") // 10
    if preset == "test":
        t.batch_size = 8
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


def _following(source: ml_collections.ConfigDict, own=()) -> ml_collections.ConfigDict:
    """A train config whose every field is a reference that follows `source` until it is
    overridden itself, except the keys in `own`."""
    s = _job_config("stablerep.py:tiny")
    for key in _leaf_keys(source):
        node, leaf = _node(source, key)
        if key in own or node[leaf] is None:   # placeholders stay unset, as in `source`
            continue
        if key == "data.image_size":    # follows s.model.image_size (configs/stablerep.py)
            continue
        target, target_leaf = _node(s, key)
        target[target_leaf] = node.get_ref(leaf).identity()
    return s


def simclr_config(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """SimCLR at StableRep's budget: it follows `train` (`_following`) except the view layout,
    the captions per batch and its tuned base lr (`SIMCLR_OWN`)."""
    s = _following(train, own=SIMCLR_OWN)
    s.data.n_img, s.data.num_crop = 1, 2
    # Equal views per step (the encoder's compute), as the paper's SimCLR baseline (4096
    # captions x 2 crops against StableRep's 1376 x 6): half as many captions as train's views.
    s.batch_size = (train.get_ref("batch_size") * train.data.get_ref("n_img")
                    * train.data.get_ref("num_crop")) // 2
    return s


def probe_config(c: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
    """The linear-probe sweep run on each encoder and attribute (cached features)."""
    p = _job_config("linear_probe.py:folder")
    p.seed = c.get_ref("seed").identity()
    p.mode = "cached_features"          # see the module docstring
    p.epochs = 40 if preset == "test" else 100
    p.eval_every = 10
    p.batch_size = 64
    p.use_bn = True                     # BatchNorm without affine before the classifier
    # Wide enough that every encoder's best lr lies inside (not at an end); the report marks
    # a best lr at an end of the grid.
    p.base_lrs = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0,
                  1000.0)
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
    c.stored_size = 40 if preset == "test" else 48   # stored image side (pixels)
    c.sd = sd_config(c)
    # Where the encoders' orbax checkpoints go (default WORKDIR/<run>); set it when WORKDIR is
    # a URL that orbax cannot write (ram://).
    c.checkpoint_dir = config_dict.placeholder(str)

    c.train = train_config(c, preset)
    c.simclr = simclr_config(c.train)
    c.simclr.optim.blr = BLR["simclr"]
    # SimCLR on the real set: follows `simclr` except its own tuned base lr.
    c.simclr_real = _following(c.simclr, own=("optim.blr",))
    c.simclr_real.optim.blr = BLR["simclr_real"]
    # The runs: StableRep on the synthetic set, SimCLR on the synthetic and on the real set.
    c.baselines = ("simclr_synthetic", "simclr_real")   # which SimCLR runs to add (or none)
    # Where the data sets and the probe set go (default WORKDIR/data): point several demo runs
    # (benchmarks/demo_study.py's lr grid) at one copy.
    c.data_dir = config_dict.placeholder(str)

    # The probe: held-out renders of random captions, one linear probe per attribute.
    c.probe_attributes = ("shape", "color", "count", "size", "background")
    # The headline mean: the object's attributes (what it is), not the background texture,
    # which instance discrimination (SimCLR) picks up from crops of one image by design.
    c.mean_over = ("shape", "color", "count", "size")
    c.probe_train_images = 200 if preset == "test" else 600
    c.probe_test_images = 200 if preset == "test" else 600
    c.probe = probe_config(c, preset)
    return c
