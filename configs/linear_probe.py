r"""Linear probe (and weighted k-NN) on frozen CLS features of a `train` or `convert` checkpoint.

Run (ImageNet, the paper's protocol; TFDS data prepared in DATA_DIR):

  python -m stablerep_jax.linear_probe --config=configs/linear_probe.py:imagenet2012 \
      --config.checkpoint=RUN_DIR --config.data_dir=/data/tfds --workdir=RUN_DIR/probe

An image folder (`PATH/train/<label>/*.png`, `PATH/test/<label>/*.png`):

  python -m stablerep_jax.linear_probe --config=configs/linear_probe.py:folder \
      --config.dataset=folder:/data/my_folder --config.checkpoint=RUN_DIR --workdir=/tmp/probe

Weighted k-NN only (k=20, T=0.07):

  python -m stablerep_jax.knn --config=configs/linear_probe.py:cifar10 \
      --config.checkpoint=RUN_DIR --config.data_dir=/data/tfds --workdir=/tmp/knn

Every preset runs the reference protocol (StableRep/main_linear.py) by default: classifiers
trained on fresh RandomResizedCrop(scale 0.08-1) + flip views every epoch (`mode="augmented"`),
test views Resize(256) + CenterCrop(224), float32 features, SGD momentum 0.9, no weight decay,
batch 1024, 90 epochs, per-step cosine to 0, the reference's 10 base lrs (lr = blr x batch /
256) trained side by side, test top-1 every 10 epochs and after the last, result = the best over
(epoch, lr); `use_bn` adds BatchNorm without affine before the linear layer.

Deviation, for speed: `--config.mode=cached_features` extracts centre-crop features once and
trains on them (no augmentation); expect lower top-1 than the paper's protocol (see README).
Presets are TFDS names; Aircraft and VOC2007 of the paper's transfer table have no TFDS
classification build (use `folder:`).
"""
import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import parse_preset

# preset -> TFDS dataset; splits default to each dataset's standard ones (see eval_data).
DATASETS = {
    "imagenet2012": "imagenet2012",
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "food101": "food101",
    "oxford_iiit_pet": "oxford_iiit_pet",
    "oxford_flowers102": "oxford_flowers102",
    "dtd": "dtd",
    "cars196": "cars196",
    "caltech101": "caltech101",
    "sun397": "sun397",
    "folder": None,
}
PRESETS = tuple(DATASETS)
# main_linear.py's --base_lrs default.
REFERENCE_BASE_LRS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, PRESETS, default="imagenet2012")
    dataset = DATASETS[preset]
    c = ml_collections.ConfigDict()
    c.preset = preset
    c.checkpoint = config_dict.placeholder(str)       # DIR, DIR/checkpoints or DIR/checkpoints/N
    c.checkpoint_step = config_dict.placeholder(int)  # default: the latest step
    c.dataset = dataset if dataset else config_dict.placeholder(str)  # TFDS name or folder:PATH
    c.data_dir = config_dict.placeholder(str)         # TFDS data_dir
    # None: the dataset's standard splits (imagenet2012 train / validation; flowers and dtd
    # train+validation / test; otherwise train / the first of test, validation, val).
    c.train_split = config_dict.placeholder(str)
    c.test_split = config_dict.placeholder(str)
    c.image_key = "image"                             # TFDS feature names
    c.label_key = "label"
    c.image_size = config_dict.placeholder(int)       # default: the checkpoint's image_size

    # The reference protocol (main_linear.py); "cached_features" is the fast deviation.
    c.mode = "augmented"
    c.epochs = 90
    c.batch_size = 1024            # global (the reference: 128 x 8 GPUs); clamped for tiny sets
    c.base_lrs = REFERENCE_BASE_LRS
    c.momentum = 0.9
    c.weight_decay = 0.0
    c.warmup_epochs = 0.0          # the reference: CosineAnnealingLR, no warmup
    c.use_bn = False               # BatchNorm without affine before the linear layer
    c.eval_every = 10              # test every N epochs and after the last; best over (epoch, lr)
    c.extract_batch_size = 256     # global batch of the frozen encoder (features, test set)
    c.shuffle_buffer = 50_000      # augmented mode on TFDS data: shuffle buffer per host (image
                                   # folders are read in a global permutation per epoch)
    c.seed = 0

    c.knn = ml_collections.ConfigDict()
    c.knn.enabled = True           # also report weighted k-NN top-1 on the same features
    c.knn.k = 20
    c.knn.temperature = 0.07
    return c
