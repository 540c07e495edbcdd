r"""Train-step throughput: our compiled JAX step vs the same model, loss and optimizer in PyTorch
eager (timm ViT + reference head, reference loss math, AdamW), on the same batch, in one run.
Also the achieved model FLOP/s of our step per chip (`stablerep_jax.flops`: the model's matmuls
and attention, PaLM's MFU count; XLA's cost analysis misses the cuBLAS/cuDNN calls on GPUs and
is printed only as a cross-check) and its MFU against this machine's measured matmul peak (best
of a few large jitted matmuls on random data) and against a data-sheet peak (--peak_tflops, or
the table in `flops` for known chips).

  python benchmarks/train_step.py                          # ViT-S/16, 224px, CPU defaults
  python benchmarks/train_step.py --variant base --captions 64 --views 6 --dtype bfloat16 --skip_torch
  python benchmarks/train_step.py ... --attention cudnn --attention_pad_to 64 --peak_tflops 989

Runs without TensorFlow (the step is `stablerep_jax.train_step`); `measure_step` is the
function other benchmarks (train_levers.py, accelerator.py) call.

Prints one table; nothing is asserted. On a GPU/TPU the JAX side runs on the accelerator; the
PyTorch side runs on CUDA when available, otherwise on the CPU.

The JAX step gets the batch the input pipeline hands to `train` (`memory.abstract_batch`): uint8
views plus their colour parameters, so its time and FLOPs include the colour stage (jitter,
grayscale, blur, normalisation) that runs inside the step. The PyTorch side gets the same views
as float input without that stage (the reference runs it in its data-loader workers).
"""
from __future__ import annotations

import argparse
import json
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
from stablerep_jax import config_utils, flops, optim, parallel, train_step  # noqa: E402
from stablerep_jax.data import recipe  # noqa: E402  (not `augment`: that one needs TensorFlow)


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
    p.add_argument("--json", default="", help="also write the numbers here")
    p.add_argument("--attention", default=None,
                   help="model.attention (default: the config's, auto)")
    p.add_argument("--attention_pad_to", type=int, default=None,
                   help="model.attention_pad_to (default: the config's)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the chip's data-sheet peak for MFU (default: flops' table, if known)")
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
    if getattr(args, "attention", None) is not None:
        config.model.attention = args.attention
    if getattr(args, "attention_pad_to", None) is not None:
        config.model.attention_pad_to = args.attention_pad_to
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
        elif name == recipe.PARAMS_KEY:
            batch[name] = random_view_params(rng, spec.shape[:-1])
        elif name == "labels":
            batch[name] = np.arange(spec.shape[0], dtype=np.int32)
        else:
            batch[name] = rng.integers(0, config.model.vocab_size, spec.shape, dtype=np.int32)
    return batch


def random_view_params(rng, shape) -> np.ndarray:
    """Colour-stage parameters [*shape, NUM_PARAMS] with the strong recipe's probabilities and
    ranges (layout `recipe.P_*`), so the step computes what a real batch makes it compute."""
    out = np.zeros(tuple(shape) + (recipe.NUM_PARAMS,), np.float32)
    n = int(np.prod(shape))
    flat = out.reshape(n, recipe.NUM_PARAMS)
    b, c, s, h = recipe.JITTER
    flat[:, recipe.P_JITTER] = rng.random(n) < recipe.JITTER_PROB
    flat[:, recipe.P_ORDER] = np.argsort(rng.random((n, 4)), axis=1)
    low, high = np.array([1 - b, 1 - c, 1 - s, -h]), np.array([1 + b, 1 + c, 1 + s, h])
    flat[:, recipe.P_FACTORS] = rng.uniform(low, high, (n, 4))
    flat[:, recipe.P_GRAY] = rng.random(n) < recipe.GRAYSCALE_PROB
    flat[:, recipe.P_BLUR] = rng.random(n) < recipe.BLUR_PROB
    flat[:, recipe.P_SIGMA] = rng.uniform(*recipe.BLUR_SIGMA, n)
    return out


def torch_images(batch: dict) -> np.ndarray:
    """The PyTorch side's float32 input: finished views as they are, uint8 views scaled to
    [0, 1] and normalised with ImageNet's mean/std (no colour stage)."""
    images = batch["images"]
    if images.dtype != np.uint8:
        return images.astype(np.float32)
    mean, std = np.array(recipe.IMAGENET_MEAN), np.array(recipe.IMAGENET_STD)
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


def measure_step(config, steps: int, devices=None, peak_flops: float = 0.0,
                 batch: dict | None = None) -> dict:
    """Our jitted train step for `config` on `devices` (default: all), timed on `batch` (default:
    `random_batch(config)`): median seconds per step over `steps` after two warm-ups, images/s,
    model FLOPs per step (`train_step.model_flops_per_step`) and achieved TFLOP/s per chip, MFU
    against `peak_flops` (FLOP/s per chip; None when 0), XLA's per-device memory analysis of
    the compiled step (bytes at its peak) and the allocator's peak bytes in use (None where the
    backend keeps no statistics, as on CPUs; over this process's life so far). XLA's own FLOP
    count of the compiled program is kept as `xla_flops_per_step_per_chip`, a cross-check
    that misses custom calls on GPUs. JSON-ready."""
    mesh = parallel.make_mesh(devices)
    chips = mesh.devices.size
    parts = train_step.build_training(config, mesh, total_steps=100, steps_per_epoch=0)
    state = parts.init(jax.random.PRNGKey(0))
    global_batch = jax.device_put(random_batch(config) if batch is None else batch,
                                  parallel.batch_sharded(mesh))
    start = time.perf_counter()
    compiled = parts.step_fn.lower(state, global_batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], global_batch)
        jax.block_until_ready(metrics["loss"])

    seconds = time_steps(run, steps)
    images = config.batch_size * train_step.views_per_caption(config)
    model_flops = train_step.model_flops_per_step(config)
    analysis = compiled.memory_analysis()
    xla_peak = None
    if analysis is not None:
        xla_peak = int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                       - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    stats = mesh.devices.flat[0].memory_stats() or {}
    return dict(
        images_per_step=images, chips=int(chips), seconds_per_step=seconds,
        images_per_s=images / seconds, images_per_s_per_chip=images / seconds / chips,
        compile_s=compile_s, model_flops_per_step=model_flops,
        model_flops_per_image=model_flops / images,
        **flops.utilisation(model_flops, seconds, chips, peak_flops),
        peak_flops_per_chip=peak_flops or None,
        xla_flops_per_step_per_chip=train_step.compiled_flops(compiled),
        xla_peak_bytes=xla_peak, allocator_peak_bytes=stats.get("peak_bytes_in_use"),
        attention=str(config.model.attention),
        attention_pad_to=int(config.model.get("attention_pad_to", 1)),
        dtype=str(config.model.dtype))


def bench_jax(config, batch, steps: int, devices=None) -> tuple[float, float]:
    """(median seconds per step, model FLOPs per step) of our jitted step on `devices`."""
    result = measure_step(config, steps, devices, batch=batch)
    return result["seconds_per_step"], result["model_flops_per_step"]


def bench_torch(config, batch):
    import timm
    import torch

    from stablerep_jax.testing import torch_reference

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
          f"{'in the JAX step' if recipe.PARAMS_KEY in batch else 'not timed (host)'}")

    peak_published = (ARGS.peak_tflops * 1e12 if ARGS.peak_tflops > 0
                      else flops.published_peak_flops(device.device_kind))
    result = measure_step(config, ARGS.steps, batch=batch, peak_flops=peak_published)
    jax_time, chips = result["seconds_per_step"], result["chips"]
    peak = matmul_peak_flops(jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
    jax_ips = images_per_step / jax_time
    print(f"jax   : {jax_time * 1e3:9.1f} ms/step  {jax_ips:9.2f} images/s  (attention "
          f"{result['attention']}, pad to {result['attention_pad_to']})")
    achieved = result["tflops_per_sec_per_chip"] * 1e12
    published = (f"; data-sheet peak {peak_published / 1e12:g} TFLOP/s -> MFU "
                 f"{result['mfu']:.1%}" if result["mfu"] is not None else "")
    print(f"jax   : {result['model_flops_per_image'] / 1e9:9.2f} GFLOP/image (model count), "
          f"achieved {achieved / 1e12:.3f} TFLOP/s per chip; measured matmul peak "
          f"{peak / 1e12:.3f} TFLOP/s -> utilisation {achieved / peak:.1%}{published}")
    print(f"jax   : XLA's cost analysis (cross-check; misses custom calls on GPUs): "
          f"{result['xla_flops_per_step_per_chip'] * chips / images_per_step / 1e9:.2f} "
          f"GFLOP/image")
    out = dict(result, images_per_step=images_per_step, images_per_s=jax_ips,
               matmul_peak_flops=peak, utilisation_measured=achieved / peak)
    if not ARGS.skip_torch:
        torch_time = bench_torch(config, batch)
        torch_ips = images_per_step / torch_time
        print(f"torch : {torch_time * 1e3:9.1f} ms/step  {torch_ips:9.2f} images/s (eager)")
        print(f"ratio jax/torch images/s: {jax_ips / torch_ips:.2f}x")
        out.update(torch_images_per_s=torch_ips, vs_torch=jax_ips / torch_ips)
    if ARGS.json:
        with open(ARGS.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    ARGS = parse_args()
    main()
