"""Our Flax VAE decoder against diffusers' PyTorch `AutoencoderKL.decode` with random weights
saved by `save_pretrained`, plus the old attention key names and config errors."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from stablerep_jax.generation.sd.vae import load_vae_decoder
from tiny_sd import randomize_params

TINY = dict(block_out_channels=(32, 32), layers_per_block=1,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
            sample_size=32)


_randomize = randomize_params


def _torch_vae(seed: int = 0, **overrides):
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(**{**TINY, **overrides}).eval()
    _randomize(model, seed)
    return model


def _latents(model, side: int = 8, seed: int = 0) -> np.ndarray:
    """NHWC latents as the sampler hands them over (already divided by the scaling factor)."""
    channels = model.config.latent_channels
    return np.random.RandomState(seed).randn(2, side, side, channels).astype(np.float32)


def _torch_decode(model, latents: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        images = model.decode(torch.from_numpy(latents.transpose(0, 3, 1, 2))).sample
    return images.numpy().transpose(0, 2, 3, 1)


def _ours(folder, latents, dtype=jnp.float32) -> np.ndarray:
    module, params, _ = load_vae_decoder(str(folder), dtype=dtype)
    return np.asarray(module.apply({"params": params}, jnp.asarray(latents)), np.float32)


@pytest.fixture(scope="module")
def saved_vae(tmp_path_factory):
    """(torch model, folder, torch's decode of `_latents`) of a random tiny AutoencoderKL."""
    pytest.importorskip("torch")
    model = _torch_vae()
    folder = tmp_path_factory.mktemp("vae")
    model.save_pretrained(folder)
    assert (folder / "diffusion_pytorch_model.safetensors").exists()
    return model, folder, _torch_decode(model, _latents(model))


@pytest.mark.torch
def test_vae_decoder_matches_diffusers(saved_vae, close):
    model, folder, ref = saved_vae
    module, params, scaling_factor = load_vae_decoder(str(folder))
    assert scaling_factor == pytest.approx(model.config.scaling_factor)
    out = np.asarray(module.apply({"params": params}, jnp.asarray(_latents(model))))
    assert out.shape == (2, 16, 16, 3)
    close(out, ref, 1e-4)


@pytest.mark.torch
def test_vae_decoder_bfloat16_is_close(saved_vae, close):
    model, folder, ref = saved_vae
    out = _ours(folder, _latents(model), jnp.bfloat16)
    assert np.isfinite(out).all()
    close(out, ref, 5e-2)


@pytest.mark.torch
def test_vae_decoder_reads_old_attention_names(saved_vae, tmp_path, close):
    """Checkpoints from diffusers < 0.14 name the attention `query/key/value/proj_attn`, and
    some conversions keep its weights as 1x1 convolutions [C, C, 1, 1]."""
    from safetensors.numpy import load_file, save_file
    model, folder, ref = saved_vae
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for key, value in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, name in old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{name}.")
        if key.endswith("attentions.0.query.weight"):
            value = value[:, :, None, None]
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.bias" in renamed
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    close(_ours(tmp_path, _latents(model)), ref, 1e-4)


@pytest.mark.torch
def test_vae_decoder_without_mid_attention(tmp_path, close):
    model = _torch_vae(seed=1, mid_block_add_attention=False, block_out_channels=(32, 64),
                       latent_channels=3)
    model.save_pretrained(tmp_path)
    latents = _latents(model, side=4, seed=1)
    close(_ours(tmp_path, latents), _torch_decode(model, latents), 1e-4)


@pytest.mark.torch
@pytest.mark.parametrize("key,value", [("up_block_types", ["UpDecoderBlock2D", "AttnUp"]),
                                       ("act_fn", "gelu"), ("shift_factor", 0.0609)])
def test_vae_unsupported_config_is_named(saved_vae, tmp_path, key, value):
    _, folder, _ = saved_vae
    config = json.loads((folder / "config.json").read_text())
    config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key):
        load_vae_decoder(str(tmp_path))


@pytest.mark.torch
def test_vae_decoder_missing_key_is_named(saved_vae, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, folder, _ = saved_vae
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    del tensors["decoder.up_blocks.1.resnets.1.conv2.weight"]
    save_file(tensors, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(KeyError, match=r"decoder\.up_blocks\.1\.resnets\.1\.conv2\.weight"):
        load_vae_decoder(str(tmp_path))


@pytest.mark.slow
@pytest.mark.torch
def test_vae_decoder_sd15_shape_matches_diffusers(tmp_path, close):
    """SD 1.5's VAE (four blocks 128-512 wide, two layers each) at a 16x16 latent."""
    model = _torch_vae(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                       down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    model.save_pretrained(tmp_path)
    latents = _latents(model, side=16)[:1]
    out = _ours(tmp_path, latents)
    assert out.shape == (1, 128, 128, 3)
    close(out, _torch_decode(model, latents), 1e-4)
