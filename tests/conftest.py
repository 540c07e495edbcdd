"""Test setup: 8 simulated CPU devices, TensorFlow kept off accelerators, quiet logs.

The environment must be set before JAX or TensorFlow are imported anywhere.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests compile the same tiny programs (a train step of the same shapes, the same encoder),
# each in a fresh jit or a fresh process. XLA's persistent cache, shared by the session's
# processes (xdist workers and the jobs tests start inherit the directory), compiles each once;
# keys hold the program, jax version and flags, so a hit is the same executable.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="stablerep_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# torchvision loads triton, whose bundled LLVM segfaults when loaded after TensorFlow's; load it
# first (it is optional: the `test` extra) so test modules may import TF and torch in any order.
try:  # noqa: E402
    import torchvision  # noqa: F401
except ImportError:
    pass

import pathlib  # noqa: E402
import uuid  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


def rel_err(ours, ref) -> float:
    """Max absolute difference over the reference's largest magnitude."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12))


@pytest.fixture
def close(record_property):
    """Asserts a max relative error below `tol` and records it (see --junitxml) for reports."""
    count = [0]

    def check(ours, ref, tol):
        err = rel_err(ours, ref)
        count[0] += 1
        record_property(f"max_rel_err_{count[0]}", f"{err:.3g}")
        assert err < tol, f"max relative error {err:.3g} >= {tol}"
    return check


@pytest.fixture
def ram_dir():
    """A fresh directory on TensorFlow's in-memory `ram://` filesystem, removed afterwards: it
    goes through the same tf.io.gfile code path as gs://, so it proves bucket support offline."""
    import tensorflow as tf

    root = f"ram://test_{uuid.uuid4().hex}"
    yield f"{root}/out"
    if tf.io.gfile.exists(root):
        try:
            tf.io.gfile.rmtree(root)
        except tf.errors.NotFoundError:
            # The in-memory filesystem has no real directories: rmtree can trip over one it
            # listed; remove the files one by one instead (the memory is freed either way).
            for directory, _, files in tf.io.gfile.walk(root):
                for name in files:
                    tf.io.gfile.remove(f"{directory}/{name}")


def pytest_collection_modifyitems(config, items):
    """Spreads the slow tests (whole jobs, up to minutes each) over the xdist workers and starts
    each worker on its share. The README runs `--dist worksteal`, which hands each worker one
    contiguous part of this list (worker k of n: about the k-th n-th) and lets an idle worker
    steal the back half of a busy one's queue; so every part begins with every n-th slow test
    and the short tests fill the rest. Only the order changes, never what runs."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    slow = [item for item in items if item.get_closest_marker("slow") is not None]
    fast = [item for item in items if item.get_closest_marker("slow") is None]
    ordered, left = [], len(items)
    for k in range(workers):
        size = left // (workers - k)        # worksteal's split of what is left
        share = slow[k::workers]
        filler = max(0, size - len(share))
        ordered += share + fast[:filler]
        fast = fast[filler:]
        left -= size
    items[:] = ordered + fast
