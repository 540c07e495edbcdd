"""A random Stable Diffusion saved as a diffusers pipeline folder, for tests without a model hub.

`write_tiny_sd(directory)` builds every component with diffusers' and transformers' PyTorch
classes (UNet, VAE, CLIP text encoder, CLIP tokenizer, PNDM scheduler config, as every SD v1 repo
ships) and saves them with the pipeline's own `save_pretrained` (safetensors), so tests load it
exactly as users load a hub model: through our own Flax modules (stablerep_jax.generation.sd).
`torch_pipeline(directory)` loads the same folder into diffusers' PyTorch `StableDiffusionPipeline`
(DDIM, no safety checker): the parity oracle. Images from a random model are noise-like but
deterministic, which is all tests need.

Sizes: `tiny` for CPU tests (latent 16 at resolution 32); `sd15` is Stable Diffusion v1.5's
architecture (860M UNet, 123M text encoder, 84M VAE) with random weights, for parity and
benchmarks at the real shape; `sd2` is SD 2.x's UNet/text layout (linear projections, per-block
head counts, GELU text encoder) at tiny width.
"""
from __future__ import annotations

import json
import os

try:  # imported as `tiny_sd` by pytest (tests/ on sys.path), or as `tests.tiny_sd`
    from tiny_tokenizer import write_tiny_clip_tokenizer
except ImportError:  # pragma: no cover
    from tests.tiny_tokenizer import write_tiny_clip_tokenizer

# SD v1.5's scheduler config (the PNDM one every SD v1 repo ships).
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                    steps_offset=1)

_TINY_VAE = dict(block_out_channels=(32, 32), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2)
SIZES = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32),
        vae=_TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
        resolution=32,
    ),
    "sd2": dict(
        unet=dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  use_linear_projection=True, upcast_attention=True),
        vae=_TINY_VAE,
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="gelu"),
        resolution=32,
    ),
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  attention_head_dim=8, cross_attention_dim=768,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12),
        resolution=512,
    ),
}


def write_tiny_sd(directory: str, size: str = "tiny", seed: int = 0,
                  safe_serialization: bool = True) -> str:
    """Saves a random Stable Diffusion of the given size to `directory` as diffusers' PyTorch
    pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/);
    returns the path. `safe_serialization=False` writes `.bin` weights instead of safetensors."""
    import torch
    from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    spec = SIZES[size]
    vae_factor = 2 ** (len(spec["vae"]["block_out_channels"]) - 1)
    latent = spec["resolution"] // vae_factor
    tokenizer_dir = write_tiny_clip_tokenizer(os.path.join(directory, "_tokenizer_src"))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    with torch.no_grad():
        unet = UNet2DConditionModel(sample_size=latent, in_channels=4, out_channels=4,
                                    **spec["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                            sample_size=spec["resolution"], **spec["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, **spec["text"]))
        for module in (unet, vae, text_encoder):
            _perturb_norms(module, torch)
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=safe_serialization)
    _drop_tree(tokenizer_dir)
    _check_written(directory)
    return directory


def _perturb_norms(module, torch) -> None:
    """Norm layers start at scale 1, shift 0 and many biases at 0: a loader that swapped scale
    and bias, or dropped a bias, would still pass. Random values make every weight count."""
    gen = torch.Generator().manual_seed(1234)
    for name, p in module.named_parameters():
        if p.ndim == 1:
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_((1.0 + noise) if name.endswith("weight") else noise)


def randomize_params(model, seed: int) -> None:
    """Every parameter of a PyTorch module random (norm weights around 1, biases around 0,
    matrices and kernels fan-in scaled), so a transposed, swapped or skipped tensor shows in the
    output of a parity test."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * noise)
            else:
                p.copy_(noise * p[0].numel() ** -0.5)


def _drop_tree(path: str) -> None:
    for name in os.listdir(path):
        os.remove(os.path.join(path, name))
    os.rmdir(path)


def _check_written(directory: str) -> None:
    with open(os.path.join(directory, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if part not in index or not os.path.isdir(os.path.join(directory, part)):
            raise RuntimeError(f"{directory}: {part} was not saved")


def torch_pipeline(directory: str, torch_dtype=None):
    """diffusers' PyTorch `StableDiffusionPipeline` (DDIM, no safety checker) on the folder's
    weights, in `torch_dtype` (default float32): the reference our sampler is compared with."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler.from_pretrained(directory, subfolder="scheduler", clip_sample=False)
    pipe = StableDiffusionPipeline.from_pretrained(
        directory, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, torch_dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
