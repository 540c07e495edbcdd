r"""The levers of the train step's speed per chip, each measured by one function that returns a
JSON-ready dict (benchmarks/accelerator.py calls them; this script runs them on its own):

  batch_sweep      the per-chip batch: 43 x 6 = 258 (the paper's), 86 x 6 = 516, 172 x 6 = 1032
                   images (what 2x / 4x fewer chips would carry): images/s, model TFLOP/s, MFU
                   against a given peak, peak bytes (XLA's memory analysis and the allocator's)
  xla_flags_sweep  the XLA GPU flags the train job sets (`stablerep_jax.xla_flags`) off and on,
                   and optionally each candidate flag on top: XLA reads its flags once per
                   process, so every setting runs in a process of its own
  attention_sweep  model.attention and model.attention_pad_to (e.g. cudnn padded to 2 vs 64)
  profile_step     a jax.profiler trace of a few steps and the top ops by device time, parsed
                   from the trace's .xplane.pb with `jax.profiler.ProfileData` (no TensorBoard,
                   no TensorFlow); the trace folder stays for TensorBoard / Perfetto / XProf

  python benchmarks/train_levers.py --all --peak_tflops 989 --json levers.json
  python benchmarks/train_levers.py --profile --profile_dir /tmp/trace
  python benchmarks/train_levers.py --all --tiny          # seconds-long sizes on a CPU (tests)

Every setting (and the profile) runs in a subprocess of its own (`run_in_subprocess`), so this
process never holds the accelerator, each batch has its own allocator peak, and an
out-of-memory batch is recorded as such ("error") instead of ending the sweep. Sizes: ViT-B/16 in bf16 at 224 px, the config's
attention ("auto": cuDNN padded to model.attention_pad_to on NVIDIA GPUs), its colour stage in
the step, as `train` runs. Nothing here needs TensorFlow. Timings are medians over `steps` steps
after two warm-ups; nothing is asserted.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)
sys.path.insert(0, BENCH)

BATCH_CAPTIONS = (43, 86, 172)     # x 6 views: 258, 516, 1032 images per chip
MEM_FRACTION = "XLA_PYTHON_CLIENT_MEM_FRACTION"


@dataclasses.dataclass
class Sizes:
    """The step measured: ViT-B/16 bf16 at 224 px per chip, or seconds-long on a CPU (`TINY`)."""
    variant: str = "base"
    depth: int = 0
    image_size: int = 224
    patch_size: int = 16
    mlp_dim: int = 4096
    emb_dim: int = 256
    dtype: str = "bfloat16"
    captions: int = 43
    views: int = 6
    steps: int = 5
    batch_captions: tuple = BATCH_CAPTIONS


TINY = Sizes(variant="tiny", depth=1, image_size=32, patch_size=8, mlp_dim=64, emb_dim=16,
             dtype="float32", captions=2, views=2, steps=1, batch_captions=(2, 4))


def sizes_for(tiny: bool) -> Sizes:
    return dataclasses.replace(TINY) if tiny else Sizes()


# --------------------------------------------------------------------------------------------
# One measurement (in this process)


def make_config(sizes: Sizes, captions: int | None = None, attention: str | None = None,
                attention_pad_to: int | None = None):
    """The train config of the step measured: configs/stablerep.py with `sizes`, on one chip."""
    import train_step as bench     # benchmarks/train_step.py
    config = bench.make_config(argparse.Namespace(
        captions=captions or sizes.captions, views=sizes.views, image_size=sizes.image_size,
        variant=sizes.variant, mlp_dim=sizes.mlp_dim, emb_dim=sizes.emb_dim, dtype=sizes.dtype,
        attention=attention, attention_pad_to=attention_pad_to))
    config.model.depth = sizes.depth
    config.model.patch_size = sizes.patch_size
    return config


def measure(sizes: Sizes, captions: int | None = None, attention: str | None = None,
            attention_pad_to: int | None = None, peak_flops: float = 0.0) -> dict:
    """`train_step.measure_step` on this process's first device, plus what was measured.
    `peak_flops` 0: the chip's data-sheet peak from `flops.PUBLISHED_BF16_TFLOPS` (MFU None
    for a chip it does not know)."""
    import jax

    import train_step as bench
    from stablerep_jax import flops
    config = make_config(sizes, captions, attention, attention_pad_to)
    device = jax.devices()[0]
    peak = peak_flops or flops.published_peak_flops(device.device_kind)
    result = bench.measure_step(config, sizes.steps, devices=[device], peak_flops=peak)
    return dict(result, captions=config.batch_size, views=sizes.views,
                platform=device.platform, device_kind=device.device_kind,
                xla_flags=os.environ.get("XLA_FLAGS", ""))


def run_in_subprocess(what: str, sizes: Sizes, env: dict | None = None,
                      timeout_s: float = 600, **kwargs) -> dict:
    """`measure(sizes, **kwargs)` (what="measure") or `profile_step(sizes, **kwargs)`
    (what="profile") in a fresh Python process with `env` (default: this one's), so that XLA
    reads that environment's XLA_FLAGS, the allocator starts empty and this process never holds
    the accelerator. Returns its dict, or {"error": the last lines of its output} when it
    failed (e.g. out of memory) or ran past `timeout_s` (then also "timed_out": True), with
    "wall_s" either way."""
    if _jax_started():
        print("train_levers: this process has started JAX and may hold the accelerator's "
              "memory; the subprocess may run out of it (call the levers from a process that "
              "has not, or set XLA_PYTHON_CLIENT_PREALLOCATE=false)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="levers_") as scratch:
        out = os.path.join(scratch, "result.json")
        request = dict(what=what, sizes=dataclasses.asdict(sizes), kwargs=kwargs, out=out)
        argv = [sys.executable, os.path.abspath(__file__), "--_run", json.dumps(request)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, env=dict(os.environ if env is None else env),
                                  capture_output=True, text=True, timeout=timeout_s,
                                  check=False, cwd=REPO)
        except subprocess.TimeoutExpired:
            return dict(error=f"timed out after {timeout_s:.0f} s", timed_out=True,
                        wall_s=time.perf_counter() - start)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-6:]
            return dict(error="\n".join(tail) or f"exit status {proc.returncode}", wall_s=wall)
        with open(out, encoding="utf-8") as f:
            return dict(json.load(f), wall_s=wall)


def _jax_started() -> bool:
    if "jax" not in sys.modules:
        return False
    from stablerep_jax import xla_flags
    return xla_flags._backend_started()


def measure_in_subprocess(sizes: Sizes, env: dict | None = None, timeout_s: float = 600,
                          **kwargs) -> dict:
    """`measure` in a process of its own (`run_in_subprocess`)."""
    return run_in_subprocess("measure", sizes, env, timeout_s, **kwargs)


def _run_request(text: str) -> None:
    """The subprocess side of `run_in_subprocess`."""
    request = json.loads(text)
    sizes = Sizes(**{**request["sizes"],
                     "batch_captions": tuple(request["sizes"]["batch_captions"])})
    run = {"measure": measure, "profile": profile_step}[request["what"]]
    result = run(sizes, **request["kwargs"])
    with open(request["out"], "w", encoding="utf-8") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------------
# (a) per-chip batch


def batch_sweep(sizes: Sizes, captions: tuple | None = None, peak_flops: float = 0.0,
                timeout_s: float = 600) -> dict:
    """The step at each per-chip batch (`captions` x sizes.views images; default 43 / 86 / 172
    x 6), one process each: images/s per chip, model TFLOP/s per chip, MFU against
    `peak_flops` (FLOP/s per chip; 0: the data-sheet table's, None for an unknown chip), XLA's
    and the allocator's peak bytes. A batch that does not fit is a row with "error". The
    processes may take 95% of the device memory (XLA_PYTHON_CLIENT_MEM_FRACTION, unless set)."""
    # JAX takes 75% of a GPU's memory by default: the largest batch may need more (ViT-B/16 at
    # 258 images held 31 GiB on an H200). A value already in the environment wins.
    env = {**os.environ, MEM_FRACTION: os.environ.get(MEM_FRACTION, "0.95")}
    rows = []
    for n in captions or sizes.batch_captions:
        r = measure_in_subprocess(sizes, env=env, captions=n, peak_flops=peak_flops,
                                  timeout_s=timeout_s)
        rows.append(dict(captions=n, images_per_step=n * sizes.views, **_row(r)))
    return dict(lever="batch", views=sizes.views, rows=rows)


def _row(r: dict) -> dict:
    """The numbers a lever's table shows, from one `measure` result (or its error)."""
    if "error" in r:
        return dict(error=r["error"], wall_s=r.get("wall_s"))
    keys = ("images_per_s_per_chip", "seconds_per_step", "tflops_per_sec_per_chip", "mfu",
            "peak_flops_per_chip", "model_flops_per_image", "xla_peak_bytes",
            "allocator_peak_bytes", "compile_s", "attention", "attention_pad_to", "device_kind",
            "xla_flags", "wall_s")
    return {k: r.get(k) for k in keys}


# --------------------------------------------------------------------------------------------
# (b) XLA flags


def flag_settings(candidates=()) -> dict[str, str]:
    """Setting name -> STABLEREP_XLA_GPU_FLAGS value: "off" (none of the job's flags), "job"
    (`xla_flags.GPU_FLAGS`) and "job+NAME" for each of `candidates` (names of
    `xla_flags.CANDIDATE_GPU_FLAGS`, or "all")."""
    from stablerep_jax import xla_flags
    if candidates == "all" or candidates == ("all",):
        candidates = tuple(xla_flags.CANDIDATE_GPU_FLAGS)
    unknown = [c for c in candidates if c not in xla_flags.CANDIDATE_GPU_FLAGS]
    if unknown:
        raise ValueError(f"unknown candidate flag(s) {unknown}; choose from "
                         f"{', '.join(xla_flags.CANDIDATE_GPU_FLAGS)} or all")
    job = " ".join(xla_flags.GPU_FLAGS)
    settings = {"off": "none", "job": job}
    for name in candidates:
        settings[f"job+{name}"] = f"{job} {xla_flags.CANDIDATE_GPU_FLAGS[name]}".strip()
    return settings


def xla_flags_sweep(sizes: Sizes, candidates=(), peak_flops: float = 0.0,
                    timeout_s: float = 600) -> dict:
    """The step once per flag setting (`flag_settings`), each in a process whose XLA_FLAGS is
    this one's plus that setting's flags, applied the way the train job applies them
    (`xla_flags.apply`). Rows carry images/s, TFLOP/s, MFU and the XLA_FLAGS that were set;
    "vs_off" is each setting's images/s over the "off" row's."""
    from stablerep_jax import xla_flags
    base = {k: v for k, v in os.environ.items() if k != xla_flags.ENV}
    rows = []
    for name, value in flag_settings(candidates).items():
        env = dict(base, **{xla_flags.ENV: value})
        xla_flags.apply(env)
        r = measure_in_subprocess(sizes, env=env, peak_flops=peak_flops, timeout_s=timeout_s)
        rows.append(dict(setting=name, flags=xla_flags.job_flags(env), **_row(r)))
    off = rows[0].get("images_per_s_per_chip")
    for row in rows:
        rate = row.get("images_per_s_per_chip")
        row["vs_off"] = rate / off if rate and off else None
    return dict(lever="xla_flags", env=xla_flags.ENV, rows=rows)


# --------------------------------------------------------------------------------------------
# model.attention and its padding


ATTENTION_SETTINGS = (("einsum", 1), ("xla", 2), ("cudnn", 2), ("cudnn", 64))


def attention_sweep(sizes: Sizes, settings=ATTENTION_SETTINGS, peak_flops: float = 0.0,
                    timeout_s: float = 600) -> dict:
    """The step per (model.attention, model.attention_pad_to), one process each. A kind this
    machine lacks (cudnn off NVIDIA GPUs or in float32) is recorded as skipped."""
    rows = []
    for kind, pad_to in settings:
        row = dict(attention=kind, attention_pad_to=pad_to)
        if kind == "cudnn" and sizes.dtype != "bfloat16":
            rows.append(dict(row, skipped=f"cuDNN attention needs bfloat16, not {sizes.dtype}"))
            continue
        r = measure_in_subprocess(sizes, attention=kind, attention_pad_to=pad_to,
                                  peak_flops=peak_flops, timeout_s=timeout_s)
        rows.append(dict(row, **_row(r)))
    return dict(lever="attention", rows=rows)


# --------------------------------------------------------------------------------------------
# (c) profile


# Lines of a device plane that summarise others (or are not ops): left out of the op times.
_SUMMARY_LINES = {"XLA Modules", "Steps", "XLA TraceMe", "Framework Ops",
                  "Framework Name Scope", "Source code", "Launch Stats"}


def _stats(event) -> dict:
    try:
        return dict(event.stats)
    except Exception:   # a stat value the reader cannot convert
        return {}


def op_times(xplane_path: str) -> tuple[dict, str]:
    """{op name: [total ns, count]} from a trace's .xplane.pb, and where they were read.

    Device planes (/device:GPU:N, /device:TPU:N) give each kernel or op event; where a plane
    has an "XLA Ops" line only that line counts (the others summarise or repeat it). An event
    is named by its `hlo_op` stat when it has one (the HLO instruction a GPU kernel belongs
    to, from XLA's kernel annotation), else its `tf_op` stat, else its own name (a cuBLAS or
    cuDNN kernel outside an annotation). Without device planes (a CPU), the host plane's events that
    carry an `hlo_op` stat (XLA's CPU thunks) count, summed over the threads that ran them."""
    from jax.profiler import ProfileData
    data = ProfileData.from_file(xplane_path)
    planes = list(data.planes)
    device = [p for p in planes if p.name.startswith("/device:")]
    totals: dict = collections.defaultdict(lambda: [0.0, 0])

    def add(event, name):
        entry = totals[name]
        entry[0] += float(event.duration_ns)
        entry[1] += 1

    if device:
        for plane in device:
            lines = list(plane.lines)
            ops_lines = [line for line in lines if line.name == "XLA Ops"]
            for line in ops_lines or [line for line in lines
                                      if line.name not in _SUMMARY_LINES]:
                for event in line.events:
                    stats = _stats(event)
                    add(event, stats.get("hlo_op") or stats.get("tf_op") or event.name)
        return dict(totals), "device planes: " + ", ".join(p.name for p in device)
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                op = _stats(event).get("hlo_op")
                if op:
                    add(event, op)
    return dict(totals), "host plane (XLA CPU ops, summed over threads)"


def profile_step(sizes: Sizes, trace_dir: str, steps: int = 3, top: int = 10) -> dict:
    """Traces `steps` steps of the compiled step (after a warm-up) into `trace_dir` with
    jax.profiler, then ranks the ops by device time: the top `top` with total and per-step
    milliseconds, share of all op time and count. The trace folder stays for TensorBoard's /
    XProf's profile plugin or Perfetto."""
    import jax

    import train_step as bench
    from stablerep_jax import parallel, train_step
    config = make_config(sizes)
    device = jax.devices()[0]
    mesh = parallel.make_mesh([device])
    parts = train_step.build_training(config, mesh, total_steps=100, steps_per_epoch=0)
    state = parts.init(jax.random.PRNGKey(0))
    batch = jax.device_put(bench.random_batch(config), parallel.batch_sharded(mesh))
    compiled = parts.step_fn.lower(state, batch).compile()
    for _ in range(2):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
    traced_s = time.perf_counter() - start
    found = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not found:
        raise FileNotFoundError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
    totals, source = op_times(found[-1])
    all_ns = sum(ns for ns, _ in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]
    ops = [dict(op=name, total_ms=ns / 1e6, ms_per_step=ns / 1e6 / steps,
                share=ns / all_ns if all_ns else 0.0, count=count)
           for name, (ns, count) in ranked]
    return dict(lever="profile", platform=device.platform, device_kind=device.device_kind,
                steps=steps, traced_wall_s=traced_s, xplane=found[-1], source=source,
                op_ms_per_step=all_ns / 1e6 / steps, distinct_ops=len(totals), top=ops,
                attention=str(config.model.attention),
                images_per_step=config.batch_size * sizes.views)


def profile_in_subprocess(sizes: Sizes, trace_dir: str, steps: int = 3, top: int = 10,
                          timeout_s: float = 600) -> dict:
    """`profile_step` in a process of its own (`run_in_subprocess`)."""
    return dict(run_in_subprocess("profile", sizes, timeout_s=timeout_s, trace_dir=trace_dir,
                                  steps=steps, top=top), lever="profile")


# --------------------------------------------------------------------------------------------
# Tables


def _gib(x) -> str:
    return f"{x / 1024 ** 3:.2f}" if x else "-"


def _pct(x) -> str:
    return f"{x:.1%}" if x else "-"


def _rate(row: dict) -> list[str]:
    if row.get("error"):
        return ["error: " + row["error"].splitlines()[-1][:80], "-", "-", "-", "-", "-"]
    return [f"{row['images_per_s_per_chip']:.4g}", f"{row['seconds_per_step'] * 1e3:.1f}",
            f"{row['tflops_per_sec_per_chip']:.4g}", _pct(row.get("mfu")),
            _gib(row.get("xla_peak_bytes")), _gib(row.get("allocator_peak_bytes"))]


_RATE_HEAD = ("images/s per chip | ms/step | model TFLOP/s per chip | MFU | XLA peak GiB | "
              "allocator peak GiB")


def table(result: dict) -> str:
    """A markdown table of one lever's result."""
    lever = result["lever"]
    if lever == "profile":
        if result.get("error"):
            return "profile: error: " + result["error"]
        lines = [f"top {len(result['top'])} ops by device time ({result['source']}; "
                 f"{result['op_ms_per_step']:.2f} ms of op time per step, "
                 f"{result['distinct_ops']} ops)", "",
                 "| # | op | ms/step | share | count |", "|---|---|---|---|---|"]
        lines += [f"| {i} | {op['op'][:90]} | {op['ms_per_step']:.3f} | {op['share']:.1%} | "
                  f"{op['count']} |" for i, op in enumerate(result["top"], 1)]
        return "\n".join(lines)
    if lever == "batch":
        lines = [f"| captions x views | images | {_RATE_HEAD} |", "|---" * 8 + "|"]
        lines += [f"| {r['captions']} x {result['views']} | {r['images_per_step']} | "
                  + " | ".join(_rate(r)) + " |" for r in result["rows"]]
        return "\n".join(lines)
    if lever == "xla_flags":
        lines = [f"| setting | flags | {_RATE_HEAD} | vs off |", "|---" * 9 + "|"]
        for r in result["rows"]:
            ratio = f"{r['vs_off']:.3f}" if r.get("vs_off") else "-"
            lines.append(f"| {r['setting']} | {' '.join(r['flags']) or '(none)'} | "
                         + " | ".join(_rate(r)) + f" | {ratio} |")
        return "\n".join(lines)
    if lever == "attention":
        lines = [f"| attention | pad to | {_RATE_HEAD} |", "|---" * 8 + "|"]
        for r in result["rows"]:
            cells = (["skipped: " + r["skipped"]] + ["-"] * 5 if r.get("skipped")
                     else _rate(r))
            lines.append(f"| {r['attention']} | {r['attention_pad_to']} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines)
    raise ValueError(f"no table for lever {lever!r}")


# --------------------------------------------------------------------------------------------
# Command line


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds-long sizes on a CPU")
    p.add_argument("--all", action="store_true", help="every lever below")
    p.add_argument("--batch", action="store_true", help="(a) the per-chip batch sweep")
    p.add_argument("--batch_captions", default="",
                   help="captions per chip to sweep, comma-separated (default 43,86,172)")
    p.add_argument("--xla_flags", action="store_true", help="(b) the job's XLA flags off/on")
    p.add_argument("--xla_candidates", default="",
                   help="candidate flags measured on top of the job's: names from "
                   "xla_flags.CANDIDATE_GPU_FLAGS, comma-separated, or all")
    p.add_argument("--attention", action="store_true",
                   help="model.attention x attention_pad_to: einsum/1, xla/2, cudnn/2, cudnn/64")
    p.add_argument("--attention_settings", default="",
                   help="KIND:PAD pairs for --attention, comma-separated (default: "
                   "einsum:1,xla:2,cudnn:2,cudnn:64)")
    p.add_argument("--profile", action="store_true", help="(c) the top ops of a traced step")
    p.add_argument("--profile_dir", default="", help="trace folder (default: a temporary one)")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 5; tiny 1)")
    p.add_argument("--peak_tflops", type=float, default=0.0,
                   help="the chip's data-sheet peak for MFU (default: flops' table, if known)")
    p.add_argument("--timeout_s", type=float, default=600, help="per measured setting")
    p.add_argument("--json", default="", help="also write every result here")
    p.add_argument("--_run", default="", help=argparse.SUPPRESS)   # the subprocess side
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the chosen levers, each setting in a subprocess (this process never starts JAX),
    prints a table per lever, returns {"sizes", lever: result, ...} (also to --json)."""
    args = _args(argv)
    if args._run:
        _run_request(args._run)
        return {}
    sizes = sizes_for(args.tiny)
    if args.steps > 0:
        sizes.steps = args.steps
    if args.batch_captions:
        sizes.batch_captions = tuple(int(x) for x in args.batch_captions.split(",") if x)
    candidates = tuple(x.strip() for x in args.xla_candidates.split(",") if x.strip())
    flag_settings(candidates)                  # unknown names stop here, before measuring
    wanted = dict(profile=args.profile or args.all, batch=args.batch or args.all,
                  xla_flags=args.xla_flags or args.all, attention=args.attention or args.all)
    if not any(wanted.values()):
        raise SystemExit("choose a lever: --batch, --xla_flags, --attention, --profile or --all")
    peak = args.peak_tflops * 1e12
    results: dict = {"sizes": dataclasses.asdict(sizes)}
    if wanted["profile"]:
        trace_dir = args.profile_dir or tempfile.mkdtemp(prefix="train_profile_")
        results["profile"] = profile_in_subprocess(sizes, trace_dir, args.profile_steps,
                                                   args.top, args.timeout_s)
    if wanted["batch"]:
        results["batch"] = batch_sweep(sizes, peak_flops=peak, timeout_s=args.timeout_s)
    if wanted["xla_flags"]:
        results["xla_flags"] = xla_flags_sweep(sizes, candidates, peak_flops=peak,
                                               timeout_s=args.timeout_s)
    if wanted["attention"]:
        settings = tuple((kind, int(pad)) for kind, pad in (
            item.split(":") for item in args.attention_settings.split(",") if item)) \
            or ATTENTION_SETTINGS
        results["attention"] = attention_sweep(sizes, settings, peak_flops=peak,
                                               timeout_s=args.timeout_s)
    for lever in ("profile", "batch", "xla_flags", "attention"):
        if lever in results:
            print(table(results[lever]) + "\n", flush=True)
    if args.json:
        from stablerep_jax import fileio
        fileio.write_json_atomic(args.json, results)
    return results


if __name__ == "__main__":
    main()
