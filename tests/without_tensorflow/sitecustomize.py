"""Put this folder on PYTHONPATH and TensorFlow is not installed, as far as the process can
tell: `importlib.util.find_spec("tensorflow")` is None (etils and orbax ask that) and
`import tensorflow` raises ModuleNotFoundError, as on the H200 image benchmarks/accelerator.py
runs on. tests/processes.py's `without_tensorflow` puts it there."""
import sys


def _hidden(name: str) -> bool:
    return name == "tensorflow" or name.startswith("tensorflow.")


class _WithoutTensorFlow:
    """Wraps a meta-path finder so that it never finds tensorflow."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if _hidden(name):
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, attribute):      # invalidate_caches, find_distributions, ...
        return getattr(self._finder, attribute)


sys.meta_path[:] = [_WithoutTensorFlow(f) if hasattr(f, "find_spec") else f
                    for f in sys.meta_path]
