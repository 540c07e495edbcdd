"""Helpers shared by the config files in `configs/` and the jobs that read them.

Config files stay plain data: `get_config(arg)` builds a ConfigDict. The helpers here parse the
`arg` strictly (a typo in a preset name is an error, the string "False" is false) and load a
config file by path the same way `ml_collections.config_flags` does, for tests and tools.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterable

import ml_collections

TRUE_STRINGS = ("1", "true", "yes", "on")
FALSE_STRINGS = ("0", "false", "no", "off", "")


def parse_bool(value) -> bool:
    """Parses a boolean strictly: bools pass, strings must be one of the known spellings."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in TRUE_STRINGS:
        return True
    if text in FALSE_STRINGS:
        return False
    raise ValueError(f"not a boolean: {value!r} (use one of {TRUE_STRINGS + FALSE_STRINGS})")


def parse_preset(arg: str | None, presets: Iterable[str], default: str) -> str:
    """Returns the preset named by `arg` (or `default`), or raises listing the valid names."""
    presets = list(presets)
    name = (arg or default).strip()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(presets)}")
    return name


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` exactly as `--config=...` would, without absl flags."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        "_config_" + os.path.basename(path).removesuffix(".py"), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def find_key(config: ml_collections.ConfigDict, dotted: str, origin: str = ""):
    """(parent ConfigDict, leaf name) of a dotted key such as `optim.blr`.

    An unknown key raises a KeyError naming the first missing part, where the key came from
    (`origin`, e.g. "--config.optim.blrr in configs/stablerep.py") and the valid keys there.
    """
    node, path = config, []
    names = dotted.split(".")
    for name in names:
        path.append(name)
        if not hasattr(node, "keys") or name not in node:
            parent = ".".join(path[:-1]) or "<top level>"
            valid = sorted(node.keys()) if hasattr(node, "keys") else []
            where = f" ({origin})" if origin else ""
            raise KeyError(f"unknown config key {'.'.join(path)!r}{where}; keys under "
                           f"{parent}: {', '.join(valid)}")
        if len(path) < len(names):
            node = node[name]
    return node, names[-1]


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Applies dotted-key overrides (`{"optim.blr": 1e-4}`) with the same checks as the flags.

    An unknown key raises a KeyError that names it; a value of the wrong type raises TypeError.
    """
    for dotted, value in overrides.items():
        node, leaf = find_key(config, dotted, origin=f"in override {dotted!r}")
        with node.ignore_type() if value is None else contextlib.nullcontext():
            node[leaf] = value
    return config
