r"""StableRep / StableRep++ pre-training presets (paper settings, arXiv 2306.00984).

Run (single host; the same command on every host of a pod):

  python -m stablerep_jax.train --config=configs/stablerep.py:vit_b16_cc12m_1x \
      --config.data.train_files='gs://BUCKET/cc12m_syn/*.tfrecord' --workdir=gs://BUCKET/runs/b16_1x

Presets (epochs / warmup epochs are the reference README's schedule table; "1x" = 35
ImageNet-epoch equivalents):
  vit_b16_cc12m_1x / _2x / _3x       ViT-B/16, CC12M synthetic, 15 / 31 / 46 epochs,
                                     warmup 0.5 / 1.0 / 1.5
  vit_b16_redcaps_1x / _2x / _3x     ViT-B/16, RedCaps synthetic, 13 / 27 / 40 epochs,
                                     warmup 0.45 / 0.9 / 1.35
  vit_b16_cc12m_pp_1x                StableRep++ (image + image-text loss, w1 = w2 = 1) on CC12M, 1x
                                     (the reference README's "add text" row, 74.4%)
  vit_b16_redcaps_pp_1x              StableRep++ on RedCaps, 1x (the README's 75.4% row)
  vit_b16_laion_pp                   StableRep++ on the LAION subset, 2 images/caption (batch 4096
                                     captions is ours: the reference gives no LAION command)
  vit_s16_cc12m_1x               ViT-S/16 for smaller runs
  simclr_b16_cc12m_1x            the SimCLR baseline: 1 image per caption, 2 crops
  tiny                           a seconds-long run for tests and the demo (32px, 2-layer ViT)

Hyper-parameters (paper / reference code): batch of 1376 captions x 6 of the 10 images = 8256
images, AdamW betas (0.9, 0.98), weight decay 0.1 (not on biases, norms, 1-D params),
lr = blr x captions x n_img x num_crop / 256 / 2 with blr 2e-4, linear warmup then half-cycle
cosine to 0, temperature 0.1, MLP head 4096-4096-256 with per-view-group synchronised BatchNorm.
The reference README's command also passes --downsample (p 0.05, 64/128 px); its results table
has rows with and without it, and these presets are the rows without: add
--config.data.downsample=True for the others.
"""
import ml_collections
from ml_collections import config_dict

from stablerep_jax.config_utils import parse_preset

PRESETS = (
    "vit_b16_cc12m_1x", "vit_b16_cc12m_2x", "vit_b16_cc12m_3x",
    "vit_b16_redcaps_1x", "vit_b16_redcaps_2x", "vit_b16_redcaps_3x",
    "vit_b16_cc12m_pp_1x", "vit_b16_redcaps_pp_1x", "vit_b16_laion_pp",
    "vit_s16_cc12m_1x", "simclr_b16_cc12m_1x", "tiny",
)


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the paper's ViT-B/16 CC12M 1x values."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 1376            # captions per global batch (x n_img x num_crop images)
    c.epochs = 15.0                # "1x"; ignored when total_steps > 0
    c.total_steps = 0              # > 0 overrides epochs
    c.stop_at_step = 0             # > 0: checkpoint and exit at this step (schedule unchanged)
    c.checkpoint_every = 1000      # steps; a final checkpoint is always written
    c.keep_checkpoints = 3         # newest finished checkpoints kept; -1 keeps all (0 is refused)
    c.log_every = 50
    c.preemption_check_every = 10  # multi-host SIGTERM agreement every N steps, only when JAX's
                                   # preemption service is off (else its sync point picks the step)
    c.init_from = config_dict.placeholder(str)   # params of a `convert` or `train` checkpoint
    # WORKDIR/lease.json: one trainer per workdir. Another trainer's lease is taken over once
    # its heartbeat (rewritten every heartbeat_s) is older than timeout_s; until then a second
    # trainer refuses, naming the holder (stablerep_jax/lease.py).
    c.lease = ml_collections.ConfigDict()
    c.lease.timeout_s = 300.0
    c.lease.heartbeat_s = 30.0

    c.data = ml_collections.ConfigDict()
    c.data.train_files = config_dict.placeholder(str)   # glob of TFRecord shards
    c.data.num_captions = 0        # captions in the data set; 0 = read the shards' manifest.json
    c.data.n_img = 6               # m: images of a caption in a batch
    c.data.num_crop = 1            # crops per sampled image (SimCLR baseline: n_img=1, num_crop=2)
    c.data.aug = "strong"          # "strong" (SimCLR recipe) or "weak" (crop scale 0.5-1)
    c.data.min_crop_scale = 0.0    # > 0: smallest crop area fraction instead of the recipe's
    c.data.downsample = False      # the optional downsample augmentation
    c.data.downsample_prob = 0.05
    c.data.down_res = (64, 128)
    c.data.permute_window = 10_000  # records permuted together (a window, not a shuffle buffer)
    c.data.max_bad_fraction = 0.01  # drop undecodable records, fail above this fraction
    c.data.tokenizer = config_dict.placeholder(str)  # CLIP tokenizer dir (StableRep++)
    c.data.image_dtype = "bfloat16"
    # The host crops, resizes and flips each view (uint8) and draws its colour parameters; the
    # colour stage (jitter, grayscale, blur) and normalisation run in the jitted train step.

    c.model = ml_collections.ConfigDict()
    c.model.variant = "base"       # tiny / small / base / large (timm vit_*_patch16_224)
    c.model.depth = 0              # > 0 overrides the variant's depth (tests)
    c.model.patch_size = 16
    c.model.image_size = 224       # crop side fed to the ViT (its position embedding's size)
    c.model.mlp_dim = 4096         # projection head hidden width
    c.model.emb_dim = 256          # projection head output width
    c.model.dtype = "bfloat16"     # compute dtype; params stay float32
    c.model.remat = False          # recompute each transformer block in the backward pass:
                                   # less memory for ~1/3 more FLOPs (benchmarks/memory.py)
    c.model.attention = "auto"     # both towers' attention: auto (the measured best per
                                   # platform: cudnn on NVIDIA GPUs, xla elsewhere), einsum (our
                                   # reference math), xla (= dot_product, jax.nn's) or cudnn
                                   # (fused; NVIDIA GPUs, bf16). Safe to change on resume
    c.model.attention_pad_to = 2   # pad the tokens (197, 77) to a multiple of this for every
                                   # kind but einsum, padded keys masked: cuDNN has no backward
                                   # pass for odd lengths. 1: no padding
    c.model.add_language = False   # StableRep++
    c.model.text_width = 512
    c.model.text_depth = 12
    c.model.text_heads = 8
    c.model.context_length = 77
    c.model.vocab_size = 49408
    c.model.vl_projection = "linear"   # "linear" or "mlp"
    c.model.embed_dim = 512            # image-text embedding width (linear projection)
    c.model.logit_scale_init = 14.285714285714286   # 1 / 0.07, stored as its log
    # The input pipeline reads its crop size from the data section: a reference to
    # model.image_size, not a second value. Set --config.model.image_size; setting
    # data.image_size is an error (train's check_config).
    c.data.image_size = c.model.get_ref("image_size").identity()

    c.loss = ml_collections.ConfigDict()
    c.loss.temperature = 0.1
    c.loss.temperature_cosine = False  # reference --ssl-temp-cos: min -> max over training
    c.loss.temperature_min = 0.05
    c.loss.temperature_max = 0.1
    c.loss.w1 = 1.0                # image-image weight (StableRep++)
    c.loss.w2 = 1.0                # image-text weight (StableRep++)
    c.loss.logit_scale_max = 100.0

    c.optim = ml_collections.ConfigDict()
    c.optim.blr = 2e-4
    c.optim.lr = 0.0               # > 0: absolute lr, overrides blr
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.weight_decay = 0.1
    c.optim.warmup_epochs = 0.5
    c.optim.warmup_steps = 0       # > 0 overrides warmup_epochs
    c.optim.grad_clip = 0.0        # global-norm clip; 0 = off

    c.knn = ml_collections.ConfigDict()
    c.knn.every = 0                # > 0: k-NN monitor every N steps
    c.knn.dataset = config_dict.placeholder(str)
    c.knn.data_dir = config_dict.placeholder(str)
    c.knn.k = 20
    c.knn.temperature = 0.07
    return c


# (data set, schedule) -> (epochs, warmup epochs): the reference README's schedule table.
SCHEDULES = {
    ("cc12m", "1x"): (15.0, 0.5), ("cc12m", "2x"): (31.0, 1.0), ("cc12m", "3x"): (46.0, 1.5),
    ("redcaps", "1x"): (13.0, 0.45), ("redcaps", "2x"): (27.0, 0.9),
    ("redcaps", "3x"): (40.0, 1.35),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
    preset = parse_preset(arg, PRESETS, default="vit_b16_cc12m_1x")
    c = base_config()
    c.preset = preset
    parts = preset.split("_")
    if parts[:2] == ["vit", "b16"] and parts[2] in ("cc12m", "redcaps"):
        # vit_b16_<data>_<schedule> or vit_b16_<data>_pp_<schedule> (StableRep++)
        c.epochs, c.optim.warmup_epochs = SCHEDULES[(parts[2], parts[-1])]
        c.model.add_language = parts[3] == "pp"
    elif preset == "vit_b16_laion_pp":
        c.model.add_language = True
        c.data.n_img = 2
        c.batch_size = 4096        # 2 x 4096 images, as the LAION subset has 2 images per caption
    elif preset == "vit_s16_cc12m_1x":
        c.model.variant = "small"
    elif preset == "simclr_b16_cc12m_1x":
        c.data.n_img = 1
        c.data.num_crop = 2
        c.batch_size = 4096
    elif preset == "tiny":
        c.batch_size = 8
        c.total_steps = 20
        c.checkpoint_every = 10
        c.log_every = 1
        c.data.n_img = 2
        c.model.image_size = 32
        c.data.permute_window = 64
        c.data.image_dtype = "float32"
        c.model.variant = "tiny"
        c.model.depth = 2
        c.model.patch_size = 8
        c.model.mlp_dim = 64
        c.model.emb_dim = 32
        c.model.dtype = "float32"
        c.model.text_width = 32
        c.model.text_depth = 2
        c.model.text_heads = 2
        c.model.embed_dim = 32
        c.optim.blr = 1e-3
        c.optim.warmup_steps = 2
    return c
