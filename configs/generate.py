r"""Synthetic images for StableRep: K images per caption with Flax Stable Diffusion.

Run (one host, all local devices; the same command on every host of a TPU pod):

  python -m stablerep_jax.generate --config=configs/generate.py:sd15 \
      --config.captions=/data/cc12m/captions.txt --config.output_dir=gs://BUCKET/cc12m_syn

Presets:
  sd15        the paper's setting: SD v1.5, DDIM 50 steps, guidance 2.0, 512x512 saved at 256,
              10 images per caption (CC12M / RedCaps)                 (default). Stored as
              JPEG q95 (the reference saved PNG: --config.image_format=png; REPRODUCING.md)
  sd15_laion  the same with 2 images per caption (the LAION subset of StableRep++)
  tiny        a tiny local model on CPU (tests, the demo): 32x32, 3 DDIM steps, float32, PNG

Rerunning the same command resumes: finished shards are kept, unfinished ones redone. Hosts
join as in every job: JAX finds them on TPU pods and SLURM, elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I; host H writes shards H, H + N,
... and host 0 writes manifest.json once every host is done.
"""
import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import parse_preset

PRESETS = ("sd15", "sd15_laion", "tiny")


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, PRESETS, default="sd15")
    c = ml_collections.ConfigDict()
    c.model = "stable-diffusion-v1-5/stable-diffusion-v1-5"   # hub id or local diffusers dir
    c.dtype = "bfloat16"         # params and compute: bfloat16 / float16 / float32
    # Attention kernel: auto (measured best per platform), xla, cudnn (NVIDIA, where its limits
    # allow). The weights are read from the folder's PyTorch safetensors (.bin if that is all).
    c.attention = "auto"

    c.captions = config_dict.placeholder(str)     # .txt (one per line) or .csv/.tsv
    c.caption_column = "caption"                 # for .csv/.tsv
    c.max_captions = 0           # > 0: only the first N captions (quick runs)
    c.output_dir = config_dict.placeholder(str)

    c.images_per_caption = 10    # K
    c.seed = 0                   # image k of caption i: fold_in(PRNGKey(seed + k), i)
    c.num_inference_steps = 50
    c.guidance_scale = 2.0       # the paper's best for representation learning
    c.scheduler = "ddim"         # ddim / pndm / dpm-solver
    c.negative_prompt = ""
    c.resolution = 512           # sampled at resolution x resolution
    c.save_size = 256            # stored size (0: as sampled)
    c.image_format = "jpeg"      # jpeg / png
    c.jpeg_quality = 95

    # Images per device per call. On an H200 (SD-v1.5, 512 px, bf16, cuDNN attention) 8 / 16 /
    # 32 gave 4.58 / 4.83 / 4.94 images/s at 5 / 8 / 14 GiB peak (benchmarks/RESULTS.md); lower
    # it on chips with less memory.
    c.per_device_batch = 32
    c.num_devices = 0            # 0: every local device
    c.captions_per_shard = 1000  # ~150 MB shards at K=10, 256px JPEG
    c.num_workers = 8            # threads resizing and encoding images
    c.contact_sheet_captions = 8  # rows of contact_sheet.png (0: none)
    c.stop_after_shards = 0      # > 0: stop after this many new shards (time-boxed jobs)

    if preset == "sd15_laion":
        c.images_per_caption = 2
    elif preset == "tiny":
        c.model = ""             # set --config.model to the local tiny model directory
        c.dtype = "float32"
        c.images_per_caption = 2
        c.num_inference_steps = 3
        c.resolution = 32
        c.save_size = 0
        c.image_format = "png"
        c.per_device_batch = 1
        c.captions_per_shard = 4
        c.num_workers = 2
    return c
