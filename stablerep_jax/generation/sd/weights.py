"""Reading a diffusers / transformers PyTorch component folder into our Flax params.

Our Flax modules are named after the PyTorch modules they mirror, so the name map is a rule,
not a table: a Flax path `down_blocks_0/resnets_1/conv1/kernel` is the PyTorch key
`down_blocks.0.resnets.1.conv1.weight`. A path segment `NAME_N` becomes `NAME.N` when NAME is
one of PyTorch's `ModuleList`s (`LIST_NAMES`); other names keep their underscores
(`time_embedding.linear_1`). Leaves: `kernel` is `weight` (linear: transposed; convolution:
OIHW -> HWIO), `scale` and `embedding` are `weight`, `bias` is `bias`.

Every Flax leaf must be found with the right shape and every PyTorch key must be used (a few
buffers excepted), so a wrong config or a foreign checkpoint fails at load, naming the key and
the file, instead of sampling noise.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

# PyTorch ModuleLists in diffusers' UNet/VAE and transformers' CLIP text model.
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                        "upsamplers", "transformer_blocks", "to_out", "net", "layers"})
# Weight files in the order we prefer them: safetensors (no pickle), then PyTorch's .bin.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
_LIST_ITEM = re.compile(r"^(.*)_(\d+)$")


def torch_key(path: Iterable[str]) -> tuple[str, str | None]:
    """(PyTorch key, transform) for a Flax param path; transform is "linear", "conv" or None."""
    *modules, leaf = list(path)
    parts = []
    for name in modules:
        m = _LIST_ITEM.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m and m.group(1) in LIST_NAMES else name)
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), "kernel"
    if leaf in ("scale", "embedding"):
        return ".".join(parts + ["weight"]), None
    return ".".join(parts + [leaf]), None


def _to_flax(value: np.ndarray, transform: str | None) -> np.ndarray:
    if transform != "kernel":
        return value
    if value.ndim == 4:                       # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:                       # linear [out, in] -> [in, out]
        return value.T
    raise ValueError(f"a kernel of rank {value.ndim}")


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], object]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], abstract_params: Mapping, *,
                         where: str, dtype=np.float32, prefix: str = "",
                         ignore: Iterable[str] = ()) -> dict:
    """Fills the tree of `abstract_params` (shapes, e.g. from `jax.eval_shape(module.init)`)
    from a PyTorch state dict. `prefix` is prepended to every PyTorch key; keys matching a regex
    in `ignore` may be left unused (old key spellings are the caller's to rename first, as
    vae.py does by path segment). Errors name `where` (the file) and the key."""
    available = dict(state_dict)
    used, missing, params = set(), [], {}
    for path, leaf in _flat(abstract_params).items():
        key, transform = torch_key(path)
        key = prefix + key
        if key not in available:
            missing.append(key)
            continue
        value = _to_flax(np.asarray(available[key]), transform)
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{where}: {key} has shape {np.shape(available[key])}, the model "
                             f"built from its config expects {tuple(leaf.shape)} "
                             f"(after the PyTorch -> Flax transpose)")
        params[path] = value.astype(dtype)
        used.add(key)
    ignored = [re.compile(p) for p in ignore]
    unused = sorted(k for k in available
                    if k not in used and not any(p.search(k) for p in ignored))
    if missing or unused:
        lines = []
        if missing:
            lines.append(f"missing ({len(missing)}): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
        if unused:
            lines.append(f"not used by the model ({len(unused)}): {', '.join(unused[:8])}"
                         + (" ..." if len(unused) > 8 else ""))
        raise KeyError(f"{where}: the weights do not match the model built from its "
                       "config.json:\n  " + "\n  ".join(lines))
    return _nest(params)


def read_state_dict(folder: str) -> tuple[dict[str, np.ndarray], str]:
    """(state dict as float32/int numpy arrays, the file it came from) for a component folder.

    safetensors when the folder has it; PyTorch `.bin` otherwise (read weights-only, needs
    the `torch` extra). Half-precision files are widened to float32 here; the caller casts."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            break
    else:
        raise FileNotFoundError(f"{folder}: no weights ({' / '.join(WEIGHT_FILES)})")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            tensors = load_file(path)
        except Exception as e:   # safetensors raises its own error types for bad headers
            raise ValueError(f"cannot read {path} as safetensors: {e}") from e
        return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
                for k, v in tensors.items()}, path
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{path}: reading PyTorch .bin weights needs PyTorch: "
                          "pip install 'stablerep_jax[torch]'") from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises UnpicklingError/RuntimeError for unsafe or bad files
        raise ValueError(f"cannot read {path} as a weights-only PyTorch file: {e}") from e
    return {k: (v.float() if v.is_floating_point() else v).numpy() for k, v in state.items()}, path


def read_config(folder: str, name: str = "config.json") -> dict:
    """A component's JSON config, with errors that name the file."""
    path = os.path.join(folder, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder}: no {name}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def resolve_model_dir(model: str, components: Iterable[str]) -> str:
    """A local diffusers directory as is; a hub id through the hub cache (offline-safe once
    downloaded), fetching only the components asked for, safetensors first."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download
    components = list(components)
    patterns = ["model_index.json", "scheduler/*"] + [f"{c}/*.json" for c in components] \
        + [f"{c}/*.txt" for c in components]
    try:
        path = snapshot_download(model, allow_patterns=patterns + [
            f"{c}/*.safetensors" for c in components])
        if not all(_has_weights(os.path.join(path, c)) for c in components
                   if c not in ("tokenizer", "scheduler")):
            path = snapshot_download(model, allow_patterns=patterns + [
                f"{c}/*.bin" for c in components])
    except Exception as e:   # hub errors (offline, 404, auth) come in many types
        raise OSError(f"model={model!r}: not a local directory, and the hub download failed: "
                      f"{e}") from e
    return path


def _has_weights(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, n)) for n in WEIGHT_FILES)


def abstract_params(module, *example_args, **example_kwargs) -> dict:
    """The params tree (shapes and dtypes only) of a Flax module, without allocating it."""
    variables = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_args,
                                                   **example_kwargs))
    return variables["params"]
