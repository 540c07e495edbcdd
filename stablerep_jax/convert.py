r"""Imports released PyTorch StableRep checkpoints (timm ViT layout) into our checkpoint format.

  python -m stablerep_jax.convert --config=configs/convert.py:base \
      --config.pth=vit_base.pth --config.output_dir=OUT

`pth` is a local path or any tf.io.gfile URL (gs://); `output_dir` a local path or gs://.
Accepted inputs (`torch.load(..., weights_only=True)`):
  * the reference's training checkpoint: a dict whose `model` (or `state_dict`) holds `visual.*`
    (timm ViT), `image_mlp.*` (head) and, for StableRep++, the text tower, projections and
    `logit_scale`; keys may carry DistributedDataParallel's `module.` prefix;
  * a plain timm ViT state dict (no head: the head is then randomly initialised, and logged).

The mapping itself (`state_dict_to_variables`) is torch-free: numpy arrays in, Flax variables
out, driven by the key maps in `models/vit.py`, `models/heads.py` and `models/text.py`. Every
key of the file must be used and every parameter of the model filled, with matching shapes;
otherwise the error lists the offending keys.
"""
from __future__ import annotations

import argparse
import io
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from stablerep_jax import checkpoint, fileio, parallel
from stablerep_jax.models.encoder import build_model
from stablerep_jax.models.heads import head_key_map
from stablerep_jax.models.text import text_key_map
from stablerep_jax.models.vit import TRANSFORMS, VIT_VARIANTS, KeyMap, infer_vit_shape, timm_key_map

# Keys that carry no weights of our model: timm's classifier, BN's step counters.
_IGNORED = (re.compile(r"^(visual\.)?head\.(weight|bias)$"),
            re.compile(r"\.num_batches_tracked$"))
_TEXT_ROOTS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.",
               "text_projection", "image_projection", "logit_scale")


# --------------------------------------------------------------------------------------------
# Reading the file (torch only here)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Loads a `.pth` safely (weights only) and returns its model state dict as numpy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading .pth files needs PyTorch: "
                          "pip install 'stablerep_jax[torch]'") from e
    # The reference saves its argparse options next to the weights; allow just that class.
    try:
        source = io.BytesIO(fileio.read_bytes(path)) if fileio.is_url(path) else path
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except Exception as e:   # torch raises UnpicklingError/RuntimeError for unsafe or bad files
        raise ValueError(f"cannot read {path} as a weights-only PyTorch checkpoint: {e}") from e
    state = unwrap_state_dict(obj, path)
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[key] = (value.float() if value.is_floating_point() else value).numpy()
    return out


def unwrap_state_dict(obj: Any, path: str = "checkpoint") -> dict:
    """The reference's {"model": state_dict, ...} (or "state_dict") -> the state dict itself."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    for key in ("model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    return dict(obj)


def strip_module_prefix(state_dict: Mapping[str, Any]) -> dict:
    """Drops DistributedDataParallel's leading `module.` from every key that has it."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


# --------------------------------------------------------------------------------------------
# The mapping (numpy only)


def describe_state_dict(state_dict: Mapping[str, np.ndarray], text_heads: int = 8,
                        import_text: bool = True) -> dict:
    """Reads the model's shape off the weights: layout, ViT sizes, head and text tower presence.

    Returns {"prefix", "vit" (infer_vit_shape), "has_head", "text" (dict of text fields, or
    None)}. Raises ValueError when the keys look like neither supported layout.
    """
    if "visual.cls_token" in state_dict:
        prefix = "visual."
    elif "cls_token" in state_dict:
        prefix = ""
    else:
        sample = ", ".join(sorted(state_dict)[:8])
        raise ValueError("not a StableRep or timm ViT state dict: no 'visual.cls_token' or "
                         f"'cls_token' key (first keys: {sample})")
    vit = infer_vit_shape(state_dict, prefix)
    if vit["variant"] is None:
        raise ValueError(f"{prefix}cls_token has width {vit['width']}, which matches no ViT "
                         "variant "
                         f"({', '.join(f'{k}={v[0]}' for k, v in VIT_VARIANTS.items())})")
    has_head = any(k.startswith("image_mlp.") for k in state_dict)
    text = None
    if import_text and "token_embedding.weight" in state_dict:
        vocab, width = np.shape(state_dict["token_embedding.weight"])
        depth = 0
        while f"transformer.resblocks.{depth}.attn.in_proj_weight" in state_dict:
            depth += 1
        linear = "text_projection" in state_dict
        mlp = any(k.startswith("text_projection.") for k in state_dict)
        if not (linear or mlp):
            raise KeyError("the text tower is present but 'text_projection' is missing")
        text = {
            "text_width": int(width), "vocab_size": int(vocab), "text_depth": depth,
            "text_heads": int(text_heads),
            "context_length": int(np.shape(state_dict["positional_embedding"])[0])
            if "positional_embedding" in state_dict else 77,
            "vl_projection": "linear" if linear else "mlp",
            "embed_dim": int(np.shape(state_dict["text_projection"])[1]) if linear else 512,
        }
    return {"prefix": prefix, "vit": vit, "has_head": has_head, "text": text}


def model_config_for(description: dict, model_config: Mapping) -> dict:
    """The model config to build and save: `model_config` (train's model section) with the
    fields the weights fix read off them, after checking the weights against the config."""
    vit = description["vit"]
    prefix = description["prefix"]
    variant, image_size = model_config["variant"], int(model_config["image_size"])
    if vit["variant"] != variant:
        raise ValueError(f"the checkpoint's ViT is {vit['variant']!r} ({prefix}cls_token width "
                         f"{vit['width']}) but the config says model.variant={variant!r}; pass "
                         f"--config.model.variant={vit['variant']} (or the matching preset)")
    if vit["image_size"] != image_size:
        raise ValueError(f"{prefix}pos_embed is sized for {vit['image_size']}px images "
                         f"(patch {vit['patch_size']}), but the config says "
                         f"model.image_size={image_size}")
    default_depth = VIT_VARIANTS[variant][1]
    config = dict(model_config)
    config.update(depth=0 if vit["depth"] == default_depth else vit["depth"],
                  patch_size=vit["patch_size"], add_language=description["text"] is not None)
    if description["text"] is not None:
        config.update(description["text"])
    return config


def expected_key_map(description: dict, model_config: dict) -> KeyMap:
    """Every torch key the model's parameters come from, with its Flax destination."""
    depth = model_config["depth"] or VIT_VARIANTS[model_config["variant"]][1]
    entries: KeyMap = {}
    for key, dest in timm_key_map(depth).items():
        collection, path, transform = dest
        entries[description["prefix"] + key] = (collection, ("visual",) + path, transform)
    if description["has_head"]:
        entries.update(head_key_map("image_mlp", ("image_mlp",)))
    text = description["text"]
    if text is not None:
        entries.update(text_key_map(text["text_depth"]))
        entries["logit_scale"] = ("params", ("logit_scale",), None)
        if text["vl_projection"] == "linear":
            entries["image_projection"] = ("params", ("image_projection",), None)
            entries["text_projection"] = ("params", ("text_projection",), None)
        else:
            entries.update(head_key_map("image_projection", ("image_projection",)))
            entries.update(head_key_map("text_projection", ("text_projection",)))
    return entries


def _is_ignored(key: str, importing_text: bool) -> bool:
    if any(p.search(key) for p in _IGNORED):
        return True
    return not importing_text and key.startswith(_TEXT_ROOTS)


def check_keys(state_dict: Mapping[str, Any], key_map: KeyMap, importing_text: bool) -> None:
    """Raises KeyError listing the file's unknown keys and the model's missing ones."""
    present = set(state_dict)
    unknown = sorted(k for k in present - set(key_map) if not _is_ignored(k, importing_text))
    missing = sorted(set(key_map) - present)
    if unknown or missing:
        lines = []
        if unknown:
            lines.append(f"unknown keys ({len(unknown)}): {', '.join(unknown)}")
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
        raise KeyError("the checkpoint does not match the model:\n  " + "\n  ".join(lines))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def apply_key_map(state_dict: Mapping[str, np.ndarray], key_map: KeyMap) -> dict:
    """Maps the keys of `key_map` (all must be present) to a nested {collection: tree} dict."""
    variables: dict = {}
    for torch_key, (collection, path, transform) in key_map.items():
        value = TRANSFORMS[transform](np.asarray(state_dict[torch_key]))
        _set(variables.setdefault(collection, {}), path, value)
    return variables


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], model_config: dict,
                            description: dict, seed: int = 0) -> dict:
    """Maps a torch state dict (numpy arrays, prefixes stripped) to Flax variables.

    Returns {"params": ..., "batch_stats": ...} for `build_model(model_config)`.
    Keys and shapes are checked (errors name the torch key); parameters the file does not hold
    (only the head of a plain timm ViT) keep a fresh initialisation from `seed`.
    """
    key_map = expected_key_map(description, model_config)
    check_keys(state_dict, key_map, importing_text=description["text"] is not None)
    model = build_model(model_config)
    size = model_config["image_size"]
    images = jnp.zeros((1, 2, size, size, 3), jnp.float32)
    tokens = (jnp.zeros((1, model_config["context_length"]), jnp.int32)
              if model_config["add_language"] else None)
    init = jax.jit(lambda rng: model.init(rng, images, tokens, train=False))
    variables = jax.tree_util.tree_map(np.asarray, init(jax.random.PRNGKey(seed)))
    variables = {c: dict(variables.get(c, {})) for c in ("params", "batch_stats")}
    filled = set()
    for torch_key, (collection, path, transform) in key_map.items():
        value = TRANSFORMS[transform](np.asarray(state_dict[torch_key]))
        try:
            expected = _get(variables[collection], path)
        except KeyError:
            raise KeyError(f"{torch_key} maps to {collection}/{'/'.join(path)}, which this model "
                           "does not have") from None
        if value.shape != expected.shape:
            raise ValueError(f"shape mismatch for {torch_key}: the file has "
                             f"{np.shape(state_dict[torch_key])} (-> {value.shape} in Flax), the "
                             f"model expects {expected.shape} at {collection}/{'/'.join(path)}")
        _set(variables[collection], path, value.astype(expected.dtype))
        filled.add((collection, path))
    _check_all_filled(variables, filled, allow_random=() if description["has_head"] else
                      (("params", "image_mlp"), ("batch_stats", "image_mlp")))
    return variables


def _check_all_filled(variables: dict, filled: set, allow_random: tuple) -> None:
    """Every model leaf must come from the file, except subtrees listed in `allow_random`."""
    unfilled = []
    for collection, tree in variables.items():
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(str(p.key) for p in path)
            if (collection, names) in filled:
                continue
            if any(collection == c and names[0] == root for c, root in allow_random):
                continue
            unfilled.append(f"{collection}/{'/'.join(names)}")
    if unfilled:
        raise KeyError(f"model parameters with no source in the checkpoint: {', '.join(unfilled)}")


# --------------------------------------------------------------------------------------------
# The job


# orbax writes arrays through TensorStore, which has drivers for local files, GCS and S3 only.
CHECKPOINT_URL_SCHEMES = ("gs://", "s3://")


def check_output_dir(output_dir: str) -> None:
    """Stops before any work when orbax cannot write a checkpoint to `output_dir`."""
    if not output_dir:
        raise ValueError("set --config.output_dir (the checkpoint goes to "
                         "OUTPUT_DIR/checkpoints/0)")
    if fileio.is_url(output_dir) and not output_dir.startswith(CHECKPOINT_URL_SCHEMES):
        raise ValueError(f"output_dir={output_dir!r}: orbax checkpoints go to a local path or "
                         f"a {' / '.join(CHECKPOINT_URL_SCHEMES)} URL (TensorStore has no "
                         f"driver for {output_dir.split('://')[0]}://)")


def _exists_on_process_0(path) -> bool:
    """Whether `path` exists, as process 0 sees it before anyone writes: every process gets the
    same answer, so all of them stop or all of them save (orbax's save needs every process)."""
    exists = np.array(path.exists() if jax.process_index() == 0 else False)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        exists = multihost_utils.broadcast_one_to_all(exists)
    return bool(exists)


def convert_pth(config) -> tuple[dict, dict]:
    """Reads and maps `config.pth`: (Flax variables, model config), with every check."""
    state_dict = strip_module_prefix(load_torch_state_dict(config.pth))
    description = describe_state_dict(state_dict, config.model.text_heads, config.import_text)
    model_config = model_config_for(description, config.model.to_dict())
    logging.info("%s: ViT-%s depth %d patch %d at %dpx; head %s; text tower %s", config.pth,
                 config.model.variant, description["vit"]["depth"],
                 description["vit"]["patch_size"], config.model.image_size,
                 "imported" if description["has_head"] else "absent",
                 "imported" if description["text"] else "absent")
    if not description["has_head"]:
        logging.warning("%s has no projection head (image_mlp.*): the head is randomly "
                        "initialised (seed %d); fine for linear probes, not a trained head",
                        config.pth, config.seed)
    return state_dict_to_variables(state_dict, model_config, description, config.seed), model_config


def run(config) -> str:
    """Converts `config.pth` and writes OUTPUT_DIR/checkpoints/0; returns the step directory.

    In a multi-process job every process converts and calls the save; orbax writes the files
    once, from process 0 (the .pth must be readable by every process: a URL or a copy each).
    """
    if not config.pth:
        raise ValueError("set --config.pth to the .pth file to import")
    check_output_dir(config.output_dir)
    existing = checkpoint.checkpoints_dir(config.output_dir) / "0"
    if _exists_on_process_0(existing):
        raise FileExistsError(f"{existing} already exists; choose another --config.output_dir")
    # Every process must reach the save, or all stop: none left waiting inside it for a dead peer.
    variables, model_config = parallel.run_together(lambda: convert_pth(config), "convert")
    step_dir = checkpoint.save_model(config.output_dir, 0, variables["params"],
                                     variables["batch_stats"], model_config)
    return str(step_dir)


def main(config):
    parallel.initialize_distributed()       # pods / SLURM: one checkpoint, written once
    run(config)


if __name__ == "__main__":
    from stablerep_jax import cli
    cli.run(main)
