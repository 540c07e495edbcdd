r"""Train-step throughput: our compiled JAX step vs the same model, loss and optimizer in PyTorch
eager (timm ViT + reference head, reference loss math, AdamW), on the same batch, in one run.
Also the achieved FLOP/s of our step (XLA's cost analysis) over this machine's measured matmul
peak (best of a few large jitted matmuls), i.e. a model-FLOPs utilisation.

  python benchmarks/train_step.py                          # ViT-S/16, 224px, CPU defaults
  python benchmarks/train_step.py --variant base --captions 64 --views 6 --dtype bfloat16 --skip_torch

Prints one table; nothing is asserted. On a GPU/TPU the JAX side runs on the accelerator; the
PyTorch side runs on CUDA when available, otherwise on the CPU.

The JAX step gets the batch the input pipeline hands to `train` (`memory.abstract_batch`): with
`data.augment_on_device` (the config's default; `--augment_on_device false` to change it) uint8
views plus their colour parameters, so its time and FLOPs include the colour stage (jitter,
grayscale, blur, normalisation) that runs inside the step. The PyTorch side gets the same views
as float input without that stage (the reference runs it in its data-loader workers).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# torchvision (via timm) loads triton, whose LLVM crashes when loaded after TensorFlow's: import
# the PyTorch side first, before anything imports TensorFlow.
try:
    import timm  # noqa: F401
    import torch  # noqa: F401
except ImportError:
    timm = None

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))    # benchmarks/ (memory.py)

import memory  # noqa: E402  (benchmarks/memory.py: the batch as the pipeline yields it)
from stablerep_jax import config_utils, optim, parallel, train  # noqa: E402
from stablerep_jax.data import augment  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="small", choices=["tiny", "small", "base", "large"])
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--captions", type=int, default=4, help="captions per global batch")
    p.add_argument("--views", type=int, default=2, help="images per caption (n_img)")
    p.add_argument("--mlp_dim", type=int, default=4096)
    p.add_argument("--emb_dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--skip_torch", action="store_true")
    memory.add_augment_on_device_flag(p)
    return p.parse_args()


def make_config(args):
    config = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py"))
    config.batch_size = args.captions
    config.data.n_img = args.views
    config.model.image_size = args.image_size
    config.model.variant = args.variant
    config.model.mlp_dim = args.mlp_dim
    config.model.emb_dim = args.emb_dim
    config.model.dtype = args.dtype
    config.data.image_dtype = args.dtype     # the model's input, as memory.py sets it
    config.optim.warmup_steps = 1
    memory.set_augment_on_device(config, getattr(args, "augment_on_device", None))
    return config


def random_batch(config) -> dict:
    """A fixed random global batch with `memory.abstract_batch`'s shapes and dtypes: random
    pixels (uint8, or normal in data.image_dtype for finished views), colour parameters drawn as
    `augment.ViewDraws` draws them, labels 0..B-1, random tokens."""
    rng = np.random.default_rng(0)
    batch = {}
    for name, spec in memory.abstract_batch(config).items():
        if name == "images" and spec.dtype == np.uint8:
            batch[name] = rng.integers(0, 256, spec.shape, dtype=np.uint8)
        elif name == "images":
            batch[name] = rng.normal(size=spec.shape).astype(spec.dtype)
        elif name == augment.PARAMS_KEY:
            batch[name] = random_view_params(rng, spec.shape[:-1])
        elif name == "labels":
            batch[name] = np.arange(spec.shape[0], dtype=np.int32)
        else:
            batch[name] = rng.integers(0, config.model.vocab_size, spec.shape, dtype=np.int32)
    return batch


def random_view_params(rng, shape) -> np.ndarray:
    """Colour-stage parameters [*shape, NUM_PARAMS] with the strong recipe's probabilities and
    ranges (layout `augment.P_*`), so the step computes what a real batch makes it compute."""
    out = np.zeros(tuple(shape) + (augment.NUM_PARAMS,), np.float32)
    n = int(np.prod(shape))
    flat = out.reshape(n, augment.NUM_PARAMS)
    b, c, s, h = augment.JITTER
    flat[:, augment.P_JITTER] = rng.random(n) < augment.JITTER_PROB
    flat[:, augment.P_ORDER] = np.argsort(rng.random((n, 4)), axis=1)
    low, high = np.array([1 - b, 1 - c, 1 - s, -h]), np.array([1 + b, 1 + c, 1 + s, h])
    flat[:, augment.P_FACTORS] = rng.uniform(low, high, (n, 4))
    flat[:, augment.P_GRAY] = rng.random(n) < augment.GRAYSCALE_PROB
    flat[:, augment.P_BLUR] = rng.random(n) < augment.BLUR_PROB
    flat[:, augment.P_SIGMA] = rng.uniform(*augment.BLUR_SIGMA, n)
    return out


def torch_images(batch: dict) -> np.ndarray:
    """The PyTorch side's float32 input: finished views as they are, uint8 views scaled to
    [0, 1] and normalised with ImageNet's mean/std (no colour stage)."""
    images = batch["images"]
    if images.dtype != np.uint8:
        return images.astype(np.float32)
    mean, std = np.array(augment.IMAGENET_MEAN), np.array(augment.IMAGENET_STD)
    return ((images / 255.0 - mean) / std).astype(np.float32)


def time_steps(run_step, steps: int) -> float:
    """Median seconds per step after two warm-up steps."""
    for _ in range(2):
        run_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(dtype=jnp.float32, n: int | None = None, repeats: int = 5) -> float:
    """Best achieved FLOP/s of a jitted n x n matmul on the default device. n defaults to 2048
    on a CPU and 8192 on accelerators, where a small matmul would mostly time the dispatch.
    Random operands, like real data: a matmul of constant ones runs at another rate (on an H200,
    710-753 TFLOP/s on ones, 769-798 on random data), so it is no peak to divide by."""
    if n is None:
        n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def bench_jax(config, batch, steps: int, devices=None) -> tuple[float, float]:
    """(median seconds per step, XLA-counted FLOPs per step) of our jitted step on `devices`."""
    mesh = parallel.make_mesh(devices)
    parts = train.build_training(config, mesh, total_steps=100, steps_per_epoch=0)
    state = parts.init(jax.random.PRNGKey(0))
    global_batch = jax.device_put(batch, parallel.batch_sharded(mesh))
    flops = train.compiled_flops(parts.step_fn.lower(state, global_batch).compile())
    holder = {"state": state}

    def run():
        holder["state"], metrics = parts.step_fn(holder["state"], global_batch)
        jax.block_until_ready(metrics["loss"])

    return time_steps(run, steps), flops


def bench_torch(config, batch):
    import timm
    import torch

    from stablerep_jax import torch_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count())
    width = {"tiny": 192, "small": 384, "base": 768, "large": 1024}[config.model.variant]
    visual = timm.create_model(f"vit_{config.model.variant}_patch16_224", pretrained=False,
                               num_classes=0, img_size=config.model.image_size)
    model = torch_reference.VisionEncoder(visual, width, config.model.mlp_dim,
                                          config.model.emb_dim).to(device).train()
    opt = torch.optim.AdamW(torch_reference.adamw_param_groups(model, config.optim.weight_decay),
                            lr=optim.peak_learning_rate(config), betas=(config.optim.b1, config.optim.b2))
    images = torch.tensor(torch_images(batch)).permute(0, 1, 4, 2, 3).contiguous().to(device)
    labels = torch.tensor(batch["labels"]).long().repeat(config.data.n_img).to(device)
    autocast = config.model.dtype == "bfloat16"

    def run():
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            feats = model(images)
        loss = torch_reference.multi_pos_loss(feats.float(), labels, config.loss.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return time_steps(run, ARGS.steps)


def main():
    config = make_config(ARGS)
    size, views = config.model.image_size, config.data.n_img
    batch = random_batch(config)
    images_per_step = config.batch_size * views
    device = jax.devices()[0]
    print(f"device: {device.platform} ({device.device_kind}) x {jax.device_count()}; "
          f"ViT-{config.model.variant}/16 {size}px, {config.batch_size} captions x {views} views "
          f"= {images_per_step} images/step, dtype {config.model.dtype}; colour stage "
          f"{'in the JAX step' if augment.PARAMS_KEY in batch else 'not timed (host)'}")

    jax_time, flops = bench_jax(config, batch, ARGS.steps)
    peak = matmul_peak_flops(jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
    jax_ips = images_per_step / jax_time
    print(f"jax   : {jax_time * 1e3:9.1f} ms/step  {jax_ips:9.2f} images/s")
    achieved = flops / jax_time
    print(f"jax   : {flops / 1e9:9.1f} GFLOP/step (XLA cost analysis), achieved "
          f"{achieved / 1e9:.1f} GFLOP/s; measured matmul peak {peak / 1e9:.1f} GFLOP/s "
          f"-> utilisation {achieved / peak:.1%}")
    if not ARGS.skip_torch:
        torch_time = bench_torch(config, batch)
        torch_ips = images_per_step / torch_time
        print(f"torch : {torch_time * 1e3:9.1f} ms/step  {torch_ips:9.2f} images/s (eager)")
        print(f"ratio jax/torch images/s: {jax_ips / torch_ips:.2f}x")


if __name__ == "__main__":
    ARGS = parse_args()
    main()
