"""Our Flax CLIP text encoder against transformers' PyTorch `CLIPTextModel` with random weights,
saved the ways SD folders hold it (safetensors from save_pretrained, a `.bin` state dict with
the `text_model.` prefix of transformers < 5 and of the hub's SD folders)."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from stablerep_jax.generation.sd.clip_text import load_clip_text
from tiny_sd import randomize_params

VOCAB = 1000
BOS, EOS = VOCAB - 2, VOCAB - 1      # SD's tokenizer pads with EOS after the end token
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=77)


_randomize = randomize_params


def _torch_clip(seed: int = 0, **overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPTextConfig(**{**TINY, "bos_token_id": BOS, "eos_token_id": EOS,
                                            "pad_token_id": EOS, **overrides})
    model = transformers.CLIPTextModel(config).eval()
    _randomize(model, seed)
    return model


def _ids(length: int = 77, seed: int = 0) -> np.ndarray:
    """Random ids, and a row laid out as SD's tokenizer does: BOS, words, EOS, EOS padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, VOCAB, (3, length))
    ids[2] = EOS
    ids[2, 0], ids[2, 1:5] = BOS, rng.randint(0, BOS, 4)
    return ids


def _torch_out(model, ids: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(ids)).last_hidden_state.numpy()


def _ours(folder, ids, dtype=jnp.float32) -> np.ndarray:
    module, params = load_clip_text(str(folder), dtype=dtype)
    return np.asarray(module.apply({"params": params}, jnp.asarray(ids)), np.float32)


@pytest.fixture(scope="module")
def saved_clip(tmp_path_factory):
    """(torch model, folder) of a random tiny CLIPTextModel saved with save_pretrained."""
    pytest.importorskip("torch")
    model = _torch_clip()
    folder = tmp_path_factory.mktemp("clip_text")
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").exists()
    return model, folder


@pytest.mark.torch
def test_clip_text_matches_transformers(saved_clip, close):
    model, folder = saved_clip
    ids = _ids()
    close(_ours(folder, ids), _torch_out(model, ids), 1e-5)
    short = _ids(16, seed=1)                    # fewer tokens than positions
    close(_ours(folder, short), _torch_out(model, short), 1e-5)


@pytest.mark.torch
def test_clip_text_gelu_and_bin_with_text_model_prefix(tmp_path, close):
    """SD 2's GELU text encoder, from a PyTorch `.bin` whose keys carry `text_model.` and the
    `position_ids` buffer (the hub's SD layout whatever transformers version saved it)."""
    import torch
    model = _torch_clip(seed=1, hidden_act="gelu")
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v
             for k, v in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    torch.save(state, tmp_path / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path)
    ids = _ids(seed=2)
    close(_ours(tmp_path, ids), _torch_out(model, ids), 1e-5)


@pytest.mark.torch
def test_clip_text_bfloat16_is_close(saved_clip, close):
    model, folder = saved_clip
    ids = _ids()
    close(_ours(folder, ids, jnp.bfloat16), _torch_out(model, ids), 5e-2)


@pytest.mark.torch
def test_clip_text_missing_key_is_named(saved_clip, tmp_path):
    from safetensors.numpy import load_file, save_file
    _, folder = saved_clip
    tensors = load_file(folder / "model.safetensors")
    gone = next(k for k in tensors if k.endswith("layers.1.mlp.fc2.bias"))
    del tensors[gone]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(KeyError, match=gone.replace(".", r"\.")):
        load_clip_text(str(tmp_path))


@pytest.mark.torch
def test_clip_text_unsupported_activation_is_named(saved_clip, tmp_path):
    _, folder = saved_clip
    config = json.loads((folder / "config.json").read_text())
    config["hidden_act"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        load_clip_text(str(tmp_path))


@pytest.mark.slow
@pytest.mark.torch
def test_clip_text_sd15_shape_matches_transformers(tmp_path, close):
    """SD 1.5's text encoder shape (123M parameters) at 77 tokens."""
    model = _torch_clip(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, vocab_size=49408, bos_token_id=49406,
                        eos_token_id=49407, pad_token_id=49407)
    model.save_pretrained(tmp_path)
    ids = np.random.RandomState(3).randint(0, 49408, (2, 77))
    ids[1] = 49407
    ids[1, 0], ids[1, 1:9] = 49406, np.arange(100, 108)
    close(_ours(tmp_path, ids), _torch_out(model, ids), 1e-4)
