r"""Import a released PyTorch StableRep checkpoint (or a plain timm ViT) into our checkpoint format.

Run:

  python -m stablerep_jax.convert --config=configs/convert.py:base \
      --config.pth=/path/to/cc12m_3x_ep45vit_base_patch16.pth --config.output_dir=/path/to/out

The preset names the ViT variant (tiny / small / base / large); the importer reads the variant
off the weights' shapes and stops when it disagrees with the config. The result is
OUTPUT_DIR/checkpoints/0/, which `linear_probe` (`--config.checkpoint=OUTPUT_DIR`) and `train`
(`--config.init_from=OUTPUT_DIR`) read.

`model` is train's model section (configs/stablerep.py), saved as the checkpoint's model config
just as `train` saves it: fields the weights fix (depth, patch size, the text tower's sizes) are
read off them; `variant`, `image_size`, `mlp_dim` and `emb_dim` are checked against them;
`text_heads` cannot be read off the shapes and is taken from here.
"""
import os

import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import load_config, parse_preset

PRESETS = ("tiny", "small", "base", "large")
TRAIN_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stablerep.py")


def get_config(arg=None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pth = config_dict.placeholder(str)          # input .pth (released StableRep or timm ViT)
    c.output_dir = config_dict.placeholder(str)   # written as OUTPUT_DIR/checkpoints/0/
    c.model = load_config(TRAIN_CONFIG).model
    c.model.variant = parse_preset(arg, PRESETS, default="base")
    c.model.image_size = 224    # must match the checkpoint's position embedding
    c.model.mlp_dim = 4096      # projection head hidden width (checked against the weights)
    c.model.emb_dim = 256       # projection head output width (checked against the weights)
    c.model.text_heads = 8      # text tower heads (not readable from the weights' shapes)
    c.model.dtype = "float32"   # compute dtype recorded for the imported weights
    c.import_text = True        # StableRep++ checkpoints: import the text tower too
    c.seed = 0                  # initialises parts the file lacks (a plain timm ViT has no head)
    return c
