"""The package's layers, read from the source (ast, nothing imported): the reference/parity code
in `stablerep_jax.testing` and the demo (`stablerep_jax.demo`, a module or a package) sit on top;
no other module of the package imports them."""
import ast
import os

import pytest

PACKAGE = "stablerep_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)
TOP_LAYERS = (f"{PACKAGE}.testing", f"{PACKAGE}.demo")


def module_name(path: str) -> str:
    parts = os.path.relpath(path, os.path.dirname(ROOT))[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement in `source` may load (for `from a import b`, both
    `a` and `a.b`, since `b` may be a submodule), relative imports resolved against `module`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".")
                package = package[:len(package) - node.level + (1 if is_package else 0)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(name: str, layer: str) -> bool:
    return name == layer or name.startswith(layer + ".")


def package_modules():
    for directory, _, files in os.walk(ROOT):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(directory, file)
                yield path, module_name(path), file == "__init__.py"


def test_the_import_parser_sees_every_form_of_import():
    source = ("import stablerep_jax.testing.torch_reference\n"
              "def f():\n    from .. import demo\n    from ..testing import torch_reference\n")
    names = imported_names(source, "stablerep_jax.data.records", is_package=False)
    assert {"stablerep_jax.testing.torch_reference", "stablerep_jax.demo",
            "stablerep_jax.testing"} <= names
    assert "stablerep_jax.demo" in imported_names("from . import demo", "stablerep_jax", True)


@pytest.mark.parametrize("layer", TOP_LAYERS)
def test_no_module_below_a_top_layer_imports_it(layer):
    modules = list(package_modules())
    assert len(modules) > 20, ROOT
    offenders = []
    for path, module, is_package in modules:
        if within(module, layer):
            continue
        with open(path, encoding="utf-8") as f:
            names = imported_names(f.read(), module, is_package)
        offenders += [f"{module} imports {name}" for name in sorted(names) if within(name, layer)]
    assert not offenders, offenders
