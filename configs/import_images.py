r"""Import existing images (the StableRep reference's layout, or a folder of caption groups)
into TFRecord shards that `train` reads.

Run (reference layout: CSV of `relative_path,caption` + one root folder per seed):

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.csv=/data/cc12m_syn/train.csv \
      --config.roots=/data/cc12m_syn/seed0,/data/cc12m_syn/seed1 \
      --config.output_dir=/data/cc12m_syn_tfrecords

Folder of caption groups (one sub-folder per caption: caption.txt + its images):

  python -m stablerep_jax.import_images --config=configs/import_images.py \
      --config.folder=/data/groups --config.output_dir=/data/groups_tfrecords

Every host of a pod or SLURM job runs the same command (host H writes shards H, H + N, ...;
host 0 the manifest); elsewhere pass --coordinator_address, --num_processes and --process_id.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg=None) -> ml_collections.ConfigDict:
    del arg   # no presets
    c = ml_collections.ConfigDict()
    c.csv = config_dict.placeholder(str)         # reference layout: rows relative_path,caption
    c.roots = config_dict.placeholder(str)       # comma-separated root folders, one per seed
    c.folder = config_dict.placeholder(str)      # or: a folder of caption sub-folders
    c.output_dir = config_dict.placeholder(str)
    c.captions_per_shard = 1000
    c.image_format = "keep"     # keep (JPEG/PNG bytes stored as they are) / jpeg / png
    c.save_size = 0             # > 0: resize the shorter side to this (re-encodes)
    c.jpeg_quality = 95
    c.verify = True             # fully decode each kept image once, so bad files are named here
    c.max_image_pixels = 178_956_970   # larger images: a JPEG is decoded at 1/2, 1/4 or 1/8 size
                                       # (re-encoded), any other is unreadable (on_missing)
    c.on_missing = "error"      # error / skip_caption (listed in OUTPUT_DIR/missing.txt)
    c.check_first = True        # look for missing files before writing anything
    c.seeds = config_dict.placeholder(str)       # comma-separated seed per root; default 0..K-1
    c.num_workers = 16          # threads reading and encoding images
    return c
