r"""The prepared accelerator run: the train step and Stable Diffusion sampling measured per chip on
whatever accelerator JAX sees, in one command that ends within 10 minutes on one H100/H200.

  python benchmarks/accelerator.py                       # on a GPU/TPU machine
  python benchmarks/accelerator.py --out DIR --published_peak_tflops 989
  python benchmarks/accelerator.py --tiny                # the same chain at tiny sizes on a CPU

Each part runs in its own process under its own timeout (at most what is left of `--budget_s`),
in this order; the times are estimates for one H100/H200 (nothing has been measured on one yet:
every part's wall time lands in summary.json, so the first run replaces these guesses):

  preflight         JAX's backend and devices; which packages each part needs are missing   ~10 s
  attention:NAME    the train step (ViT-B/16, bf16, the paper's 43 captions x 6 views per chip)
                    with model.attention = einsum, dot_product and (NVIDIA GPUs) cudnn:
                    images/s, XLA FLOPs, utilisation of the measured and published bf16 peaks,
                    device bytes in use; the ratio of each to einsum. The step takes uint8
                    views + colour parameters and runs the colour stage itself, as in
                    training; einsum's part also times that stage alone
                    (`device_augment.finish_views` on the step's 258 views): ms per image
                                                                                      ~60 s each
  train_step        benchmarks/train_step.py --variant base --dtype bfloat16 at 43 x 6, against
                    PyTorch eager when torch sees a CUDA GPU (skipped otherwise: without PyTorch
                    it would repeat attention:einsum)                                      ~90 s
  memory            benchmarks/memory.py: XLA's memory analysis of that step on this chip  ~45 s
  sd_model          a random SD-v1.5-sized model written once, for the two parts below     ~45 s
  sizing            benchmarks/sizing.py --skip_training (the training half is attention:einsum):
                    SD-v1.5 512px, 50 DDIM steps, guidance 2, 8 images per call: images/s per
                    chip, GFLOP per image, utilisation                                    ~120 s
  generate          benchmarks/generate.py --size sd15 (25 steps): ours vs diffusers' PyTorch
                    pipeline on the same latents                                          ~120 s

Every part's output (its log, and its JSON where it writes one) goes under the results folder
(`--out`, else $OUT, else outputs/accelerator/TIMESTAMP), then summary.json and summary.md, whose
table is printed last: images/s per chip, utilisation of the measured matmul peak and of the
published peak, bytes in use. Parts that do not fit the budget are listed as not run. The driver
itself never imports JAX, so it never holds the accelerator. Exit status 1 when a part failed or
timed out. `--part NAME` runs one part in this process (the driver calls itself that way).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")
sys.path.insert(0, REPO)

GIB = 1024 ** 3
# Published dense bf16 peaks (TFLOP/s, vendor data sheets), by JAX's device_kind. Used only when
# --published_peak_tflops is not given; labelled "published" wherever it is printed.
PUBLISHED_BF16_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,       # H100 SXM
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,                 # v5e
    "TPU v5": 459.0,                      # v5p
    "TPU v6 lite": 918.0,                 # v6e (Trillium)
}
ATTENTIONS = ("einsum", "dot_product", "cudnn")
# What each part imports beyond JAX (module names), so preflight can skip what cannot run.
NEEDS = {
    "attention": ("ml_collections", "optax", "tensorflow"),
    "train_step": ("ml_collections", "optax", "tensorflow", "torch", "timm"),
    "memory": ("ml_collections", "optax", "tensorflow"),
    "sd_model": ("diffusers", "transformers", "torch"),
    "generate": ("diffusers", "transformers", "torch"),
    "gen_sweep": ("transformers", "torch"),
}


@dataclasses.dataclass
class Part:
    name: str
    argv: list            # the command (argv[0] is the Python interpreter)
    timeout_s: float      # this part's own limit (the budget left may cut it shorter)
    json_name: str = ""   # the JSON file it writes under the scratch folder, if any
    env: dict = dataclasses.field(default_factory=dict)
    skip: str = ""        # a reason not to run it


@dataclasses.dataclass
class Sizes:
    """Workload sizes: the paper's per-chip batch on an accelerator, seconds-long ones on a CPU."""
    variant: str = "base"
    captions: int = 43
    views: int = 6
    image_size: int = 224
    depth: int = 0
    patch_size: int = 16
    mlp_dim: int = 4096
    emb_dim: int = 256
    dtype: str = "bfloat16"
    steps: int = 5
    sd_size: str = "sd15"
    gen_batch: int = 8
    gen_steps: int = 50
    gen_repeats: int = 2
    gen_resolution: int = 512
    gen_sweep: str = "16,32,64"     # per-device batches beyond gen_batch


TINY = Sizes(variant="tiny", captions=2, views=2, image_size=32, depth=1, patch_size=8,
             mlp_dim=64, emb_dim=16, dtype="float32", steps=1, sd_size="tiny", gen_batch=2,
             gen_steps=2, gen_repeats=1, gen_resolution=32, gen_sweep="2,3")


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (the test)")
    p.add_argument("--out", default="", help="results folder (default: $OUT, else "
                   "outputs/accelerator/TIMESTAMP); local path or gfile URL")
    p.add_argument("--budget_s", type=float, default=540.0,
                   help="wall-clock budget of all parts together, seconds")
    p.add_argument("--published_peak_tflops", type=float, default=0.0,
                   help="the chip's published dense bf16 peak (default: from a table by device)")
    p.add_argument("--parts", default="", help="run only these parts (comma-separated names, "
                   "e.g. sd_model,generate,gen_sweep; a name before ':' selects all its kinds)")
    p.add_argument("--part", default="", help=argparse.SUPPRESS)   # internal: run one part
    p.add_argument("--attention", default="einsum", choices=ATTENTIONS, help=argparse.SUPPRESS)
    p.add_argument("--json", default="", help=argparse.SUPPRESS)
    p.add_argument("--sd_dir", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


EXIT_UNSUPPORTED = 3   # a part's exit status for "this checkout or machine cannot run me"


def unsupported(reason: str):
    """Ends a part as skipped (not failed): prints the reason last, exits EXIT_UNSUPPORTED."""
    print(reason, flush=True)
    raise SystemExit(EXIT_UNSUPPORTED)


# --------------------------------------------------------------------------------------------
# Parts that run inside this file (called as `accelerator.py --part NAME` by the driver).


def preflight_part() -> dict:
    """JAX's devices and versions, and which modules the parts need are missing here."""
    import importlib.metadata
    import importlib.util

    import jax
    device = jax.devices()[0]
    modules = sorted({m for needs in NEEDS.values() for m in needs})
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    notes = {m: importlib.metadata.version(m) for m in ("transformers", "diffusers", "torch")
             if m not in missing}
    cuda_torch = False
    if "torch" not in missing:
        import torch
        cuda_torch = bool(torch.cuda.is_available())
    return dict(platform=device.platform, device_kind=device.device_kind,
                device_count=jax.device_count(), jax=jax.__version__, missing=sorted(missing),
                notes=notes, cuda_torch=cuda_torch, cpu_count=os.cpu_count())


def _memory_stats(device) -> dict | None:
    """The allocator's bytes in use / peak / limit on `device` (None where the backend has none,
    as on CPUs)."""
    stats = device.memory_stats()
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
            if k in stats}


def attention_part(sizes: Sizes, attention: str) -> dict:
    """Our jitted train step with `model.attention`, on one device: rate, FLOPs, peak, bytes."""
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, BENCH)
    import train_step as bench
    from stablerep_jax.models import encoder
    config = bench.make_config(argparse.Namespace(
        captions=sizes.captions, views=sizes.views, image_size=sizes.image_size,
        variant=sizes.variant, mlp_dim=sizes.mlp_dim, emb_dim=sizes.emb_dim, dtype=sizes.dtype))
    config.model.depth = sizes.depth
    config.model.patch_size = sizes.patch_size
    if "attention" in config.model:
        config.model.attention = attention
    elif attention != "einsum":
        unsupported("configs/stablerep.py has no model.attention: only einsum exists here")
    if attention != "einsum" and "attention" not in {
            f.name for f in dataclasses.fields(encoder.StableRepModel)}:
        unsupported("stablerep_jax/models/encoder.py does not pass model.attention to the ViT: "
                    "this checkout cannot time another attention")
    device = jax.devices()[0]
    seconds, flops = bench.bench_jax(config, bench.random_batch(config), sizes.steps,
                                     devices=[device])
    memory = _memory_stats(device)   # before the matmul peak allocates its own buffers
    peak = bench.matmul_peak_flops(jnp.dtype(sizes.dtype).type)
    images = sizes.captions * sizes.views
    result = dict(attention=attention, images_per_step=images, seconds_per_step=seconds,
                  images_per_s=images / seconds, flops_per_step=flops,
                  flops_per_image=flops / images, matmul_peak_flops=peak,
                  utilisation_measured=flops / seconds / peak, memory=memory,
                  settings=dataclasses.asdict(sizes))
    if attention == "einsum":          # the same for every attention kind: timed once
        result["colour_stage"] = colour_stage_timing(sizes, device)
    return result


def colour_stage_timing(sizes: Sizes, device) -> dict:
    """The strong recipe's device colour stage alone (`device_augment.finish_views`, jitted) on
    one step's views (captions x views uint8 images, on `device` before timing): median
    seconds per call over `sizes.steps` calls after two warm-ups, ms per image, XLA FLOPs."""
    import functools

    import jax
    import numpy as np

    import train_step as bench
    from stablerep_jax import train
    from stablerep_jax.data import augment, device_augment
    n, size = sizes.captions * sizes.views, sizes.image_size
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), device)
    params = jax.device_put(bench.random_view_params(rng, (n,)), device)
    spec = augment.AugmentSpec(size=size, recipe="strong", dtype=sizes.dtype)
    finish = jax.jit(functools.partial(device_augment.finish_views, spec=spec))
    flops = train.compiled_flops(finish.lower(images, params).compile())
    seconds = bench.time_steps(lambda: finish(images, params).block_until_ready(), sizes.steps)
    return dict(images=n, image_size=size, dtype=sizes.dtype, seconds_per_call=seconds,
                ms_per_image=seconds / n * 1e3, flops_per_image=flops / n)


def sd_model_part(sizes: Sizes, directory: str) -> dict:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from tiny_sd import write_tiny_sd
    start = time.perf_counter()
    write_tiny_sd(directory, size=sizes.sd_size)
    return dict(size=sizes.sd_size, seconds=time.perf_counter() - start)


def run_inner_part(args) -> None:
    sizes = TINY if args.tiny else Sizes()
    if args.part == "preflight":
        result = preflight_part()
    elif args.part == "attention":
        result = attention_part(sizes, args.attention)
    elif args.part == "sd_model":
        result = sd_model_part(sizes, args.sd_dir)
    else:
        raise SystemExit(f"--part {args.part!r}: no such part")
    print(json.dumps(result, indent=1), flush=True)
    with open(args.json, "w", encoding="utf-8") as f:    # a local scratch file of the driver's
        json.dump(result, f, indent=1)


# --------------------------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Record:
    name: str
    status: str            # ok | failed | timed out | skipped | not run
    detail: str = ""
    wall_s: float = 0.0
    log: str = ""          # the log's file name under the results folder
    result: dict | None = None


def run_part(part: Part, timeout_s: float) -> tuple[str, str, float, str]:
    """Runs `part` in its own process group, echoing its output with a prefix; kills the group
    at the timeout. Returns (status, detail, wall seconds, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **part.env}
    start = time.perf_counter()
    proc = subprocess.Popen(part.argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)
    lines: list[str] = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            print(f"[{part.name}] {line}", end="", flush=True)
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)    # the part's own process group, nothing else
        proc.wait()
        code = None
    reader.join(timeout=10)
    if code is None:
        status, detail = "timed out", f"killed after {timeout_s:.0f} s"
    elif code == EXIT_UNSUPPORTED:
        status, detail = "skipped", (lines[-1].strip() if lines else "")
    else:
        status, detail = ("ok", "") if code == 0 else ("failed", f"exit status {code}")
    return status, detail, time.perf_counter() - start, "".join(lines)


def plan_parts(args, scratch: str, pre: dict) -> list[Part]:
    """Every part after preflight, with its command, limit and (if any) reason to skip it."""
    s = TINY if args.tiny else Sizes()
    py, me = sys.executable, os.path.abspath(__file__)
    tiny = ["--tiny"] if args.tiny else []
    sd_dir = os.path.join(scratch, "sd")
    # PyTorch shares the GPU with JAX in these two: JAX allocates on demand instead of taking
    # 75% of the memory up front.
    shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    torch_flag = [] if pre.get("cuda_torch") else None
    parts = []
    for name in ATTENTIONS:
        json_name = f"attention_{name}.json"
        part = Part(f"attention:{name}", [py, me, "--part", "attention", "--attention", name,
                                          "--json", os.path.join(scratch, json_name), *tiny],
                    150, json_name)
        if name == "cudnn" and pre.get("platform") != "gpu":
            part.skip = "cuDNN attention exists only on NVIDIA GPUs"
        if name == "cudnn" and s.dtype != "bfloat16":
            part.skip = "cuDNN attention needs bfloat16"
        parts.append(part)
    train = [py, os.path.join(BENCH, "train_step.py"), "--variant", s.variant, "--dtype",
             s.dtype, "--captions", str(s.captions), "--views", str(s.views), "--image_size",
             str(s.image_size), "--mlp_dim", str(s.mlp_dim), "--emb_dim", str(s.emb_dim),
             "--steps", str(s.steps)]
    part = Part("train_step", train + (torch_flag if torch_flag is not None else
                                       ["--skip_torch"]), 150, env=shared)
    if torch_flag is None and not args.tiny:
        part.skip = "PyTorch sees no CUDA GPU here (without it the part repeats attention:einsum)"
    parts.append(part)
    memory = [py, os.path.join(BENCH, "memory.py"), "--variants", s.variant, "--kinds",
              "stablerep", "--remat", "off", "--captions", str(s.captions), "--views",
              str(s.views), "--image_size", str(s.image_size), "--patch_size",
              str(s.patch_size), "--depth", str(s.depth), "--mlp_dim", str(s.mlp_dim),
              "--emb_dim", str(s.emb_dim), "--dtype", s.dtype, "--devices", "1",
              "--json", os.path.join(scratch, "memory.json")]
    parts.append(Part("memory", memory, 120, "memory.json"))
    parts.append(Part("sd_model", [py, me, "--part", "sd_model", "--sd_dir", sd_dir, "--json",
                                   os.path.join(scratch, "sd_model.json"), *tiny], 150,
                      "sd_model.json"))
    generate = [py, os.path.join(BENCH, "generate.py"), "--size", s.sd_size, "--model", sd_dir,
                "--steps", str(s.gen_steps), "--resolution", str(s.gen_resolution), "--dtype",
                s.dtype, "--repeats", str(s.gen_repeats)]
    # Ours (attention auto) against diffusers' PyTorch pipeline, same latents: the headline.
    part = Part("generate", generate + ["--batch", str(s.gen_batch), "--peak", "--json",
                                        os.path.join(scratch, "generate.json")],
                300, "generate.json", env=dict(shared))
    if torch_flag is None and not args.tiny:
        part.argv.append("--skip-torch")
    parts.append(part)
    # The same batch on XLA's attention: what `auto` is measured against.
    parts.append(Part("generate:xla", generate + [
        "--batch", str(s.gen_batch), "--attention", "xla", "--skip-torch", "--json",
        os.path.join(scratch, "generate_xla.json")], 200, "generate_xla.json"))
    parts.append(Part("gen_sweep", generate + [
        "--sweep", s.gen_sweep, "--skip-torch", "--json",
        os.path.join(scratch, "gen_sweep.json")], 360, "gen_sweep.json"))
    if args.tiny:       # one CPU device, like a user's laptop; TF and JAX off any GPU
        for part in parts:
            part.env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", XLA_FLAGS="")
    if args.parts:
        wanted = args.parts.split(",")
        for part in parts:
            if not part.skip and part.name not in wanted and part.name.split(":")[0] not in wanted:
                part.skip = "not in --parts"
    missing = set(pre.get("missing", ()))
    for part in parts:
        lacking = sorted(missing & set(NEEDS[part.name.split(":")[0]]))
        if lacking and not part.skip:
            part.skip = "missing Python packages: " + ", ".join(lacking)
    return parts


def published_peak(args, device_kind: str) -> tuple[float, str]:
    """(FLOP/s, where it came from) of the chip's published bf16 peak; (0, reason) if unknown."""
    if args.published_peak_tflops > 0:
        return args.published_peak_tflops * 1e12, "--published_peak_tflops"
    if device_kind in PUBLISHED_BF16_TFLOPS:
        return PUBLISHED_BF16_TFLOPS[device_kind] * 1e12, "data sheet table"
    return 0.0, f"unknown for {device_kind!r}: pass --published_peak_tflops"


def _pct(x) -> str:
    return f"{x:.1%}" if x else "-"


def summarize(args, records: list[Record], pre: dict) -> dict:
    """The numbers people want from the parts' JSON: a table per job and the attention ratios."""
    kind = pre.get("device_kind", "?")
    peak_pub, peak_source = published_peak(args, kind)
    by_name = {r.name: r for r in records}
    rows = []
    einsum = (by_name.get("attention:einsum") or Record("", "")).result
    for name in ATTENTIONS:
        r = by_name.get(f"attention:{name}")
        if not (r and r.status == "ok" and r.result):
            continue
        res = r.result
        memory = res.get("memory") or {}
        rows.append(dict(
            job=f"training, attention={name}", images_per_s=res["images_per_s"],
            flops_per_image=res["flops_per_image"],
            utilisation_measured=res["utilisation_measured"],
            measured_peak_flops=res["matmul_peak_flops"],
            utilisation_published=(res["images_per_s"] * res["flops_per_image"] / peak_pub
                                   if peak_pub else None),
            peak_bytes_in_use=memory.get("peak_bytes_in_use"),
            vs_einsum=(res["images_per_s"] / einsum["images_per_s"] if einsum else None)))
    rows += generation_rows(by_name, peak_pub)
    memory = by_name.get("memory")
    xla_peak = None
    if memory and memory.status == "ok" and memory.result and memory.result["rows"]:
        xla_peak = memory.result["rows"][0].get("peak")
    colour = (einsum or {}).get("colour_stage")
    if colour and einsum:      # its share of the step it is part of
        colour = dict(colour, share_of_step=colour["ms_per_image"] / 1e3
                      * einsum["images_per_s"])
    return dict(device_kind=kind, platform=pre.get("platform"), jax=pre.get("jax"),
                published_peak_flops=peak_pub, published_peak_source=peak_source,
                xla_memory_analysis_peak_bytes=xla_peak, colour_stage=colour, rows=rows,
                parts=[dict(name=r.name, status=r.status, detail=r.detail,
                            wall_s=round(r.wall_s, 1), log=r.log) for r in records],
                results={r.name: r.result for r in records if r.result})   # self-contained


def generation_rows(by_name: dict, peak_pub: float) -> list[dict]:
    """One row per sampler run: the headline (vs PyTorch), XLA attention, the batch sweep."""
    runs = []
    for name, key in (("generate", "ours"), ("generate:xla", "ours")):
        r = by_name.get(name)
        if r and r.result and key in r.result:
            runs.append((r.result, r.result[key]))
    r = by_name.get("gen_sweep")
    if r and r.result:
        runs += [(r.result, row) for row in r.result.get("sweep", []) if "error" not in row]
    rows = []
    for result, run in runs:
        flops = run["flops_per_image"] * run["images_per_s"]
        peak = (result.get("matmul_peak_tflops") or 0) * 1e12
        torch_rate = (result.get("torch") or {}).get("images_per_s")
        rows.append(dict(
            job=(f"generation, {result['steps']} steps, batch {run['batch']}, "
                 f"attention={run['attention']}"),
            images_per_s=run["images_per_s"], flops_per_image=run["flops_per_image"],
            utilisation_measured=flops / peak if peak else None,
            measured_peak_flops=peak or None,
            utilisation_published=flops / peak_pub if peak_pub else None,
            peak_bytes_in_use=run.get("peak_bytes_in_use"),
            vs_pytorch=(run["images_per_s"] / torch_rate
                        if torch_rate and run is result.get("ours") else None),
            pytorch_images_per_s=torch_rate if run is result.get("ours") else None))
    return rows


def summary_markdown(summary: dict, logs: dict[str, str]) -> str:
    s = summary
    lines = [f"device: {s['device_kind']} ({s['platform']}), jax {s['jax']}; published bf16 "
             f"peak: " + (f"{s['published_peak_flops'] / 1e12:g} TFLOP/s "
                          f"({s['published_peak_source']})" if s["published_peak_flops"]
                          else s["published_peak_source"]), "",
             "| part | status | wall s | detail |", "|---|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['wall_s']:.0f} | {p['detail']} |"
              for p in s["parts"]]
    lines += ["", "| job | images/s per chip | GFLOP/image (model) | of measured matmul peak | "
              "of published peak | peak bytes in use | vs reference |",
              "|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        gib = f"{r['peak_bytes_in_use'] / GIB:.2f} GiB" if r.get("peak_bytes_in_use") else "-"
        if r.get("vs_pytorch"):
            ratio = (f"{r['vs_pytorch']:.2f}x PyTorch "
                     f"({r['pytorch_images_per_s']:.3g} images/s)")
        elif r.get("vs_einsum"):
            ratio = f"{r['vs_einsum']:.2f}x einsum"
        else:
            ratio = "-"
        peak = (f" ({r['measured_peak_flops'] / 1e12:.3g} TFLOP/s)"
                if r.get("measured_peak_flops") else "")
        lines.append(f"| {r['job']} | {r['images_per_s']:.4g} | {r['flops_per_image'] / 1e9:,.1f} "
                     f"| {_pct(r['utilisation_measured'])}{peak} "
                     f"| {_pct(r['utilisation_published'])} | {gib} | {ratio} |")
    if s["xla_memory_analysis_peak_bytes"]:
        lines.append(f"\nXLA memory analysis of the train step, per device: "
                     f"{s['xla_memory_analysis_peak_bytes'] / GIB:.2f} GiB at the peak")
    colour = s.get("colour_stage")
    if colour:
        lines.append(f"\nColour stage on the device (device_augment.finish_views, "
                     f"{colour['images']} x {colour['image_size']}^2 uint8 views, "
                     f"{colour['dtype']} out): {colour['ms_per_image']:.3g} ms per image, "
                     f"{colour['flops_per_image'] / 1e6:,.0f} MFLOP per image (XLA); "
                     f"{_pct(colour['share_of_step'])} of the einsum train step's time, "
                     f"which includes it")
    relayed = [f"{name}: {line.strip()}" for name, text in logs.items()
               for line in text.splitlines() if line.startswith(("ratio", "same latents"))]
    if relayed:
        lines += ["", "From the parts' own output (one run each):"] + relayed
    return "\n".join(lines)


def results_dir(args) -> str:
    if args.out:
        return args.out
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return os.path.join("outputs", "accelerator", time.strftime("%Y%m%d-%H%M%S"))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def drive(args) -> int:
    from stablerep_jax import fileio
    out = results_dir(args)
    fileio.makedirs(out)
    deadline = time.monotonic() + args.budget_s
    records: list[Record] = []
    logs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="accelerator_") as scratch:
        me = os.path.abspath(__file__)
        pre_part = Part("preflight", [sys.executable, me, "--part", "preflight", "--json",
                                      os.path.join(scratch, "preflight.json")]
                        + (["--tiny"] if args.tiny else []), 120, "preflight.json")
        if args.tiny:
            pre_part.env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", XLA_FLAGS="")
        records.append(_run_and_record(pre_part, scratch, out, deadline, logs, fileio))
        pre = records[-1].result or {}     # without it nothing else can be planned
        for part in plan_parts(args, scratch, pre) if pre else []:
            records.append(_run_and_record(part, scratch, out, deadline, logs, fileio))
    summary = summarize(args, records, pre)
    text = summary_markdown(summary, logs)
    fileio.write_json_atomic(os.path.join(out, "summary.json"), summary)
    fileio.write_text_atomic(os.path.join(out, "summary.md"), text + "\n")
    print("\n" + text + f"\n\nresults: {out}", flush=True)
    return 1 if any(r.status in ("failed", "timed out") for r in records) else 0


def _run_and_record(part: Part, scratch: str, out: str, deadline: float, logs: dict,
                    fileio) -> Record:
    if part.skip:
        print(f"[{part.name}] skipped: {part.skip}", flush=True)
        return Record(part.name, "skipped", part.skip)
    left = deadline - time.monotonic()
    if left < 5:
        return Record(part.name, "not run", "the budget is spent")
    status, detail, wall, output = run_part(part, min(part.timeout_s, left))
    log = part.name.replace(":", "_") + ".log"
    fileio.write_text_atomic(os.path.join(out, log), output)
    logs[part.name] = output
    result = None
    if part.json_name:
        result = _read_json(os.path.join(scratch, part.json_name))
        if result is not None:
            fileio.write_json_atomic(os.path.join(out, part.json_name), result)
    return Record(part.name, status, detail, wall, log, result)


def main(argv=None) -> int:
    args = _args(argv)
    if args.part:
        run_inner_part(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
