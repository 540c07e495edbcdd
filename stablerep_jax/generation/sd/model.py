"""A Stable Diffusion model as data: our Flax text encoder, UNet and VAE decoder, their params,
the CLIP tokenizer and the scheduler config, read from a diffusers pipeline folder or hub id.

No diffusers or transformers Flax class is involved: the weights are the folder's PyTorch
safetensors (or `.bin`), mapped by `weights.py`; the tokenizer is `transformers.CLIPTokenizer`,
which transformers 5 keeps. A pipeline folder needs `unet/`, `vae/`, `text_encoder/`,
`tokenizer/` and `scheduler/`; its `safety_checker/` and `feature_extractor/` are not read
(REPRODUCING.md: the reference generated without a safety checker).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
# At import, not first use: transformers loads PyTorch when it is installed, and PyTorch's triton
# must load before TensorFlow (their bundled LLVMs clash); generate imports us before records.
from transformers import CLIPTokenizer

from stablerep_jax.generation.sd import clip_text, unet as unet_lib, vae as vae_lib, weights

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class StableDiffusion:
    """Modules (stateless Flax definitions), their params, tokenizer and scheduler config."""
    text_encoder: Any
    unet: Any
    vae: Any
    params: dict                 # {"text_encoder", "unet", "vae"}: params trees in `dtype`
    tokenizer: Any
    scheduler_config: dict
    scaling_factor: float        # latents are divided by it before the VAE decodes them
    vae_scale_factor: int        # pixels per latent cell (8 for SD)
    unet_scale_factor: int       # the latent side must be a multiple of it (UNet downsamplings)
    latent_channels: int
    path: str                    # the local folder the weights were read from


def check_model(model: str) -> None:
    """A clear error for a local model path that is missing or not a diffusers directory.

    Anything that does not look like a path (`org/name`) is left to the hub download."""
    if not model:
        raise ValueError("model is empty: set --config.model to a hub id or a local diffusers "
                         "directory")
    looks_local = (os.path.isabs(model) or model.startswith((".", "~"))
                   or model.count("/") != 1 or os.path.exists(model))
    if not looks_local:
        return
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model={model!r}: no such directory (give a local diffusers "
                                "directory or a hub id such as "
                                "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"model={model!r}: not a diffusers pipeline directory "
                                "(no model_index.json)")
    absent = [c for c in COMPONENTS if not os.path.isdir(os.path.join(path, c))]
    if absent:
        raise FileNotFoundError(f"model={model!r}: the pipeline directory has no "
                                f"{', '.join(c + '/' for c in absent)}")


def _tokenizer(folder: str):
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise OSError(f"{folder}: cannot load a CLIP tokenizer: {e}") from e


def load(model: str, dtype=jnp.bfloat16, attention: str = "xla") -> StableDiffusion:
    """Reads a diffusers pipeline (local folder or hub id) into our modules, params in `dtype`.

    `attention` is the implementation every attention layer uses ("xla", "cudnn"; resolve
    "auto" per platform first with `models.attention.resolve`)."""
    check_model(model)
    path = weights.resolve_model_dir(model, ("unet", "vae", "text_encoder", "tokenizer"))
    text_module, text_params = clip_text.load_clip_text(
        os.path.join(path, "text_encoder"), dtype=dtype, attention=attention)
    unet_module, unet_params = unet_lib.load_unet(
        os.path.join(path, "unet"), dtype=dtype, attention=attention)
    vae_module, vae_params, scaling_factor = vae_lib.load_vae_decoder(
        os.path.join(path, "vae"), dtype=dtype, attention=attention)
    unet_config = weights.read_config(os.path.join(path, "unet"))
    vae_config = weights.read_config(os.path.join(path, "vae"))
    return StableDiffusion(
        text_encoder=text_module, unet=unet_module, vae=vae_module,
        params={"text_encoder": text_params, "unet": unet_params, "vae": vae_params},
        tokenizer=_tokenizer(os.path.join(path, "tokenizer")),
        scheduler_config=weights.read_config(os.path.join(path, "scheduler"),
                                             "scheduler_config.json"),
        scaling_factor=float(scaling_factor),
        vae_scale_factor=2 ** (len(vae_config["block_out_channels"]) - 1),
        unet_scale_factor=2 ** (len(unet_config["block_out_channels"]) - 1),
        latent_channels=int(unet_config.get("in_channels", 4)),
        path=path)
