r"""The prepared accelerator run: the train step and Stable Diffusion sampling measured per chip on
whatever accelerator JAX sees, against PyTorch on the same chip, in one command.

  python benchmarks/accelerator.py                       # on a GPU/TPU machine
  python benchmarks/accelerator.py --parts generate,train_step --budget_s 300
  python benchmarks/accelerator.py --tiny                # the same chain at tiny sizes on a CPU

Each part runs in its own process under its own timeout (at most what is left of `--budget_s`),
in this order (most wanted first, so a short budget drops the least wanted):

  preflight         JAX's backend and devices; which packages each part needs are missing
  sd_model          a random SD-v1.5-shaped diffusers pipeline folder, for the parts below
  generate          benchmarks/generate.py: our sampler (attention auto) vs diffusers' PyTorch
                    pipeline, same latents, 512 px, 50 DDIM steps, guidance 2, 8 per call:
                    images/s, model GFLOP per image, utilisation of a bf16 matmul peak measured
                    on random data and of the data-sheet peak, pixel difference
  generate:xla      the same batch with XLA attention (what `auto` is chosen against)
  train_step        benchmarks/train_step.py: ViT-B/16 bf16 at 43 x 6 per chip (attention auto)
                    vs PyTorch eager (timm), model FLOPs, MFU
  levers:attention  benchmarks/train_levers.py --attention: xla and cuDNN padded to 64 tokens
  gen_sweep         our sampler at per-device batch 16 / 32 / 64: images/s and bytes
  levers:batch      the train step at 86 x 6 and 172 x 6 per chip
  levers:profile    the top 10 ops of a traced train step
  levers:xla_flags  the job's XLA GPU flags off and on
  memory            benchmarks/memory.py: XLA's memory analysis of the train step

Nothing here needs TensorFlow. Every part's log and JSON go under the results folder (`--out`,
else $OUT, else outputs/accelerator/TIMESTAMP), then summary.json and summary.md, whose table is
printed last. Parts that do not fit the budget are listed as not run. The driver never imports
JAX, so it never holds the accelerator. Exit status 1 when a part failed or timed out.
`--part NAME` runs one part in this process (the driver calls itself that way).
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

from stablerep_jax.chips import PUBLISHED_BF16_TFLOPS  # noqa: E402  (no JAX import)

GIB = 1024 ** 3
# What each part imports beyond JAX (module names), so preflight can skip what cannot run.
NEEDS = {
    "train_step": ("ml_collections", "optax", "torch", "timm"),
    "levers": ("ml_collections", "optax"),
    "memory": ("ml_collections", "optax"),
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
    attention_settings: str = "xla:2,cudnn:64"   # train_step measures auto (cuDNN, pad 2)
    batch_captions: str = "86,172"  # per chip, beyond the paper's 43


TINY = Sizes(variant="tiny", captions=2, views=2, image_size=32, depth=1, patch_size=8,
             mlp_dim=64, emb_dim=16, dtype="float32", steps=1, sd_size="tiny", gen_batch=2,
             gen_steps=2, gen_repeats=1, gen_resolution=32, gen_sweep="2,3",
             attention_settings="xla:2,cudnn:64", batch_captions="3")


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
    """Every part after preflight, most wanted first, with its command, limit and (if any)
    reason to skip it."""
    s = TINY if args.tiny else Sizes()
    py, me = sys.executable, os.path.abspath(__file__)
    tiny = ["--tiny"] if args.tiny else []
    sd_dir = os.path.join(scratch, "sd")
    # PyTorch shares the GPU with JAX in these: JAX allocates on demand instead of taking 75% of
    # the memory up front.
    shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    no_torch = not pre.get("cuda_torch") and not args.tiny
    peak = ["--peak_tflops", str(args.published_peak_tflops)] if args.published_peak_tflops \
        else []

    def scratch_json(name):
        return os.path.join(scratch, name)

    parts = [Part("sd_model", [py, me, "--part", "sd_model", "--sd_dir", sd_dir, "--json",
                               scratch_json("sd_model.json"), *tiny], 150, "sd_model.json")]
    generate = [py, os.path.join(BENCH, "generate.py"), "--size", s.sd_size, "--model", sd_dir,
                "--steps", str(s.gen_steps), "--resolution", str(s.gen_resolution), "--dtype",
                s.dtype, "--repeats", str(s.gen_repeats)]
    part = Part("generate", generate + ["--batch", str(s.gen_batch), "--peak", "--json",
                                        scratch_json("generate.json")],
                300, "generate.json", env=dict(shared))
    if no_torch:
        part.argv.append("--skip-torch")
    parts.append(part)
    parts.append(Part("generate:xla", generate + [
        "--batch", str(s.gen_batch), "--attention", "xla", "--skip-torch", "--json",
        scratch_json("generate_xla.json")], 200, "generate_xla.json"))
    train = [py, os.path.join(BENCH, "train_step.py"), "--variant", s.variant, "--dtype",
             s.dtype, "--captions", str(s.captions), "--views", str(s.views), "--image_size",
             str(s.image_size), "--mlp_dim", str(s.mlp_dim), "--emb_dim", str(s.emb_dim),
             "--steps", str(s.steps), "--json", scratch_json("train_step.json"), *peak]
    parts.append(Part("train_step", train + (["--skip_torch"] if no_torch else []), 200,
                      "train_step.json", env=dict(shared)))
    levers = [py, os.path.join(BENCH, "train_levers.py"), *tiny, *peak, "--timeout_s", "170"]
    parts.append(Part("levers:attention", levers + [
        "--attention", "--attention_settings", s.attention_settings, "--json",
        scratch_json("levers_attention.json")], 300, "levers_attention.json"))
    parts.append(Part("gen_sweep", generate + [
        "--sweep", s.gen_sweep, "--skip-torch", "--json", scratch_json("gen_sweep.json")],
        360, "gen_sweep.json"))
    parts.append(Part("levers:batch", levers + [
        "--batch", "--batch_captions", s.batch_captions, "--json",
        scratch_json("levers_batch.json")], 300, "levers_batch.json"))
    parts.append(Part("levers:profile", levers + [
        "--profile", "--json", scratch_json("levers_profile.json")], 150, "levers_profile.json"))
    parts.append(Part("levers:xla_flags", levers + [
        "--xla_flags", "--json", scratch_json("levers_xla_flags.json")], 300,
        "levers_xla_flags.json"))
    memory = [py, os.path.join(BENCH, "memory.py"), "--variants", s.variant, "--kinds",
              "stablerep", "--remat", "off", "--captions", str(s.captions), "--views",
              str(s.views), "--image_size", str(s.image_size), "--patch_size",
              str(s.patch_size), "--depth", str(s.depth), "--mlp_dim", str(s.mlp_dim),
              "--emb_dim", str(s.emb_dim), "--dtype", s.dtype, "--devices", "1",
              "--json", scratch_json("memory.json")]
    parts.append(Part("memory", memory, 120, "memory.json"))
    if args.tiny:       # one CPU device, like a user's laptop; JAX and PyTorch off any GPU
        for part in parts:
            part.env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", XLA_FLAGS="")
    if args.parts:
        wanted = args.parts.split(",")
        for part in parts:
            if part.name not in wanted and part.name.split(":")[0] not in wanted:
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


def _ok(by_name: dict, name: str) -> dict | None:
    r = by_name.get(name)
    return r.result if r and r.result else None


def measured_peak(by_name: dict) -> float:
    """The bf16 matmul peak (random operands) measured by the generate or train_step part."""
    gen, train = _ok(by_name, "generate") or {}, _ok(by_name, "train_step") or {}
    return (gen.get("matmul_peak_tflops") or 0) * 1e12 or train.get("matmul_peak_flops") or 0.0


def training_rows(by_name: dict, peak: float, peak_pub: float) -> list[dict]:
    """The train step: the headline against PyTorch, then the attention and batch levers."""
    rows = []
    head = _ok(by_name, "train_step")
    if head:
        achieved = head["model_flops_per_image"] * head["images_per_s"]
        rows.append(dict(
            job=(f"training, {head['images_per_step']} images/step, attention="
                 f"{head['attention']} (pad {head['attention_pad_to']})"),
            images_per_s=head["images_per_s"], flops_per_image=head["model_flops_per_image"],
            utilisation_measured=achieved / peak if peak else None,
            measured_peak_flops=peak or None,
            utilisation_published=achieved / peak_pub if peak_pub else None,
            peak_bytes_in_use=head.get("allocator_peak_bytes"),
            vs_pytorch=head.get("vs_torch"), pytorch_images_per_s=head.get("torch_images_per_s")))
    for name, lever in (("levers:attention", "attention"), ("levers:batch", "batch")):
        result = (_ok(by_name, name) or {}).get(lever) or {}
        for row in result.get("rows", []):
            if row.get("error") or row.get("skipped") or not row.get("images_per_s_per_chip"):
                continue
            achieved = row["model_flops_per_image"] * row["images_per_s_per_chip"]
            images = row.get("images_per_step") or (head or {}).get("images_per_step")
            rows.append(dict(
                job=(f"training, {images} images/step, attention={row['attention']} "
                     f"(pad {row['attention_pad_to']})"),
                images_per_s=row["images_per_s_per_chip"],
                flops_per_image=row["model_flops_per_image"],
                utilisation_measured=achieved / peak if peak else None,
                measured_peak_flops=peak or None,
                utilisation_published=achieved / peak_pub if peak_pub else None,
                peak_bytes_in_use=row.get("allocator_peak_bytes")))
    return rows


def summarize(args, records: list[Record], pre: dict) -> dict:
    """The numbers people want from the parts' JSON: one table row per measured setting."""
    kind = pre.get("device_kind", "?")
    peak_pub, peak_source = published_peak(args, kind)
    by_name = {r.name: r for r in records}
    peak = measured_peak(by_name)
    rows = generation_rows(by_name, peak, peak_pub) + training_rows(by_name, peak, peak_pub)
    memory = _ok(by_name, "memory")
    xla_peak = memory["rows"][0].get("peak") if memory and memory.get("rows") else None
    return dict(device_kind=kind, platform=pre.get("platform"), jax=pre.get("jax"),
                versions=pre.get("notes"), published_peak_flops=peak_pub,
                published_peak_source=peak_source, measured_peak_flops=peak,
                xla_memory_analysis_peak_bytes=xla_peak, rows=rows,
                parts=[dict(name=r.name, status=r.status, detail=r.detail,
                            wall_s=round(r.wall_s, 1), log=r.log) for r in records],
                results={r.name: r.result for r in records if r.result})   # self-contained


def generation_rows(by_name: dict, peak: float, peak_pub: float) -> list[dict]:
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
    sys.path.insert(0, BENCH)
    import train_levers          # tables only: it imports no JAX
    for name, lever in (("levers:profile", "profile"), ("levers:xla_flags", "xla_flags")):
        result = (s["results"].get(name) or {}).get(lever)
        if result:
            lines += ["", train_levers.table(result)]
    relayed = [f"{name}: {line.strip()}" for name, text in logs.items()
               for line in text.splitlines() if line.startswith(("ratio", "same latents", "torch"))]
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
