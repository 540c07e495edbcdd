r"""Memory per device of the compiled train step, from XLA's own memory analysis, with and without
`model.remat`, and which accelerators it fits.

  python benchmarks/memory.py                       # this machine's backend (CPU: compile only)
  python benchmarks/memory.py --tpu_topology v5e:4x8 --devices 32   # TPU compiler, no TPU needed

For every combination of --variants (ViT-B/16, ViT-L/16), --kinds (StableRep, StableRep++) and
remat off/on, the script builds the train step exactly as `train` does (model, AdamW with ZeRO-1
moments, sharded loss) for `--captions` captions x `--views` images per device (the paper's
43 x 6 by default) on a mesh of `--devices` devices, lowers it with abstract inputs
(jax.ShapeDtypeStruct: nothing is allocated) and compiles it. It prints XLA's
`compiled.memory_analysis()` per device (arguments, outputs, aliased = donated state, temporaries;
in use at the peak = arguments + outputs - aliased + temporaries) and the FLOPs the compiled
program costs (`cost_analysis()`), so the price of remat shows as extra FLOPs (and, beside it,
`model_flops`: the model's own count from `stablerep_jax.flops`, which leaves remat out). It
runs without TensorFlow.

The batch is the one the input pipeline hands to `train`: uint8 views plus their colour
parameters, so the step includes the colour stage (jitter, grayscale, blur, normalisation) that
`device_augment.model_images` runs inside it (`abstract_batch`, which benchmarks/train_step.py
and sizing.py share).

`--tpu_topology` compiles for a TPU slice without one (JAX's deviceless ahead-of-time path; it
needs the `libtpu` wheel importable, e.g. `pip install libtpu`, or its folder in --libtpu_path).
The numbers are the TPU compiler's: the same program a TPU job would run. A CPU compile shows no
remat saving: XLA's CPU pipeline expands the optimisation barriers that keep the recomputation
after the forward pass, so it is merged back into the forward pass (common-subexpression
elimination) or scheduled next to it; measured on the ViT-B step, remat adds 23% FLOPs on CPU and
leaves the temporaries unchanged, while the TPU compiler's temporaries drop 7x. The CPU
compiler's temporaries are also larger than the TPU compiler's for the same program (59.5 vs
32.9 GiB for ViT-B without remat): read a CPU table as an upper bound, not a GPU/TPU number.

Nothing is asserted; `--json PATH` also writes every number.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIB = 1024 ** 3
# Usable device memory the table checks against (GiB), smallest first.
CHIPS = (("TPU v5e", 16), ("TPU v4", 32), ("A100/H100 80GB", 80), ("TPU v5p", 95))
PRESETS = {"stablerep": "vit_b16_cc12m_1x", "stablerep++": "vit_b16_cc12m_pp_1x"}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="base,large", help="comma-separated ViT variants")
    p.add_argument("--kinds", default="stablerep,stablerep++", help="stablerep and/or stablerep++")
    p.add_argument("--remat", default="off,on", help="off, on or off,on")
    p.add_argument("--captions", type=int, default=43, help="captions per device")
    p.add_argument("--views", type=int, default=6, help="images per caption (n_img)")
    p.add_argument("--image_size", type=int, default=224)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--depth", type=int, default=0, help="> 0 overrides the variant's depth")
    p.add_argument("--mlp_dim", type=int, default=4096)
    p.add_argument("--emb_dim", type=int, default=256)
    p.add_argument("--text_depth", type=int, default=0, help="> 0 overrides the text tower's")
    p.add_argument("--text_width", type=int, default=0, help="> 0 overrides the text tower's")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--devices", type=int, default=0,
                   help="mesh size (default: every device of the backend or topology)")
    p.add_argument("--tpu_topology", default="", help="e.g. v5e:4x8, v4:2x2x1, v5p:2x2x4")
    p.add_argument("--libtpu_path", default="", help="folder holding the libtpu package")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    for name in ("variants", "kinds", "remat"):
        setattr(args, name, [x.strip() for x in getattr(args, name).split(",") if x.strip()])
    bad = [k for k in args.kinds if k not in PRESETS]
    bad += [r for r in args.remat if r not in ("off", "on")]
    if bad:
        p.error(f"unknown value(s) {bad}: --kinds takes {', '.join(PRESETS)}, --remat off/on")
    return args


def target_devices(args) -> list:
    """The devices to build the mesh on: this backend's, or a deviceless TPU topology's."""
    import jax
    if not args.tpu_topology:
        devices = jax.devices()
    else:
        if args.libtpu_path:
            sys.path.insert(0, args.libtpu_path)
        from jax.experimental import topologies
        devices = topologies.get_topology_desc(args.tpu_topology, "tpu").devices
    n = args.devices or len(devices)
    if n > len(devices):
        raise SystemExit(f"--devices {n}: the target has only {len(devices)} devices")
    return list(devices[:n])


def train_config(args, kind: str, variant: str, remat: bool, n_devices: int):
    from stablerep_jax import config_utils
    c = config_utils.load_config(os.path.join(REPO, "configs", "stablerep.py") + ":"
                                 + PRESETS[kind])
    c.batch_size = args.captions * n_devices
    c.data.n_img = args.views
    c.model.image_size = args.image_size
    c.data.image_dtype = args.dtype
    c.model.variant = variant
    c.model.patch_size = args.patch_size
    c.model.depth = args.depth
    c.model.mlp_dim = args.mlp_dim
    c.model.emb_dim = args.emb_dim
    c.model.dtype = args.dtype
    c.model.remat = remat
    if args.text_depth > 0:
        c.model.text_depth = args.text_depth
    if args.text_width > 0:
        c.model.text_width = c.model.embed_dim = args.text_width
        c.model.text_heads = max(1, args.text_width // 64)
    c.optim.warmup_steps = 1
    return c


def abstract_batch(config) -> dict:
    """ShapeDtypeStructs of one global batch as the input pipeline yields it to `train`
    (`pipeline.make_train_iterator`): uint8 views and their colour parameters (finished inside
    the step)."""
    import jax
    import jax.numpy as jnp

    from stablerep_jax.data import recipe
    b, size = config.batch_size, config.model.image_size
    views = config.data.n_img * config.data.num_crop
    batch = {"images": jax.ShapeDtypeStruct((b, views, size, size, 3), jnp.uint8),
             recipe.PARAMS_KEY: jax.ShapeDtypeStruct((b, views, recipe.NUM_PARAMS), jnp.float32),
             "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if config.model.add_language:
        batch["tokens"] = jax.ShapeDtypeStruct((b, config.model.context_length), jnp.int32)
    return batch


def compile_step(config, devices):
    """The train step compiled for `devices` from abstract inputs; (compiled, seconds)."""
    from stablerep_jax import parallel, train_step
    mesh = parallel.make_mesh(devices)
    parts = train_step.build_training(config, mesh, total_steps=100, steps_per_epoch=0)
    start = time.perf_counter()
    compiled = parts.step_fn.lower(parts.abstract_state, abstract_batch(config)).compile()
    return compiled, time.perf_counter() - start


def memory_row(compiled) -> dict:
    """XLA's per-device memory analysis of a compiled program, in bytes."""
    from stablerep_jax import train_step
    m = compiled.memory_analysis()
    row = {"argument": int(m.argument_size_in_bytes), "output": int(m.output_size_in_bytes),
           "alias": int(m.alias_size_in_bytes), "temp": int(m.temp_size_in_bytes)}
    row["peak"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    row["flops"] = train_step.compiled_flops(compiled)   # what XLA counts: remat's cost shows
    return row


def fits(peak_bytes: int) -> list[str]:
    return [name for name, gib in CHIPS if peak_bytes <= gib * GIB]


def measure(args) -> dict:
    import jax
    devices = target_devices(args)
    platform = devices[0].platform
    kind_name = getattr(devices[0], "device_kind", platform)
    print(f"target: {platform} ({kind_name}), mesh of {len(devices)} devices, "
          f"{args.captions} captions x {args.views} images per device, {args.dtype}, colour "
          "stage in the step", flush=True)
    rows = []
    for variant in args.variants:
        for kind in args.kinds:
            for remat in args.remat:
                config = train_config(args, kind, variant, remat == "on", len(devices))
                row = dict(variant=variant, kind=kind, remat=remat)
                try:
                    compiled, row["compile_s"] = compile_step(config, devices)
                except jax.errors.JaxRuntimeError as e:
                    if "RESOURCE_EXHAUSTED" not in str(e):
                        raise
                    # TPU compilers refuse a program larger than the chip; keep their number.
                    row.update(too_big_for_target=True, message=str(e).splitlines()[0][:300])
                    rows.append(row)
                    print(f"{variant} {kind} remat={remat}: does not fit {kind_name}: "
                          f"{row['message']}", flush=True)
                    continue
                row.update(memory_row(compiled))
                row["model_flops"] = _model_flops_per_device(config, len(devices))
                row["fits"] = fits(row["peak"])
                rows.append(row)
                print(f"{variant} {kind} remat={remat}: peak {row['peak'] / GIB:.2f} GiB "
                      f"(args {row['argument'] / GIB:.2f}, temp {row['temp'] / GIB:.2f}), "
                      f"{row['flops'] / 1e12:.2f} TFLOP, compiled in {row['compile_s']:.0f} s",
                      flush=True)
    return dict(platform=platform, device_kind=kind_name, devices=len(devices),
                captions_per_device=args.captions, views=args.views, dtype=args.dtype,
                image_size=args.image_size, rows=rows)


def _model_flops_per_device(config, n_devices: int) -> float:
    """The model's FLOPs per step per device (`stablerep_jax.flops`: no remat recomputation,
    no elementwise work), beside XLA's `flops` of the compiled program."""
    from stablerep_jax import train_step
    return train_step.model_flops_per_step(config) / n_devices


def table(results: dict) -> str:
    """A markdown table: one row per (variant, kind, remat), remat's FLOP cost vs remat off."""
    base = {(r["variant"], r["kind"]): r for r in results["rows"]
            if r["remat"] == "off" and not r.get("too_big_for_target")}
    lines = ["| model | remat | arguments GiB | temporaries GiB | peak GiB per device | "
             "TFLOP per step | fits (16 / 32 / 80 / 95 GiB) |", "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        if r.get("too_big_for_target"):
            lines.append(f"| ViT-{r['variant']} {r['kind']} | {r['remat']} | - | - | "
                         f"over {results['device_kind']}: {r['message']} | - | - |")
            continue
        ref = base.get((r["variant"], r["kind"]))
        cost = ""
        if r["remat"] == "on" and ref and ref.get("flops"):
            cost = f" ({r['flops'] / ref['flops'] - 1:+.0%})"
        lines.append(
            f"| ViT-{r['variant']} {r['kind']} | {r['remat']} | {r['argument'] / GIB:.2f} | "
            f"{r['temp'] / GIB:.2f} | {r['peak'] / GIB:.2f} | {r['flops'] / 1e12:.2f}{cost} | "
            f"{', '.join(r['fits']) or 'none'} |")
    return "\n".join(lines)


def main(argv=None):
    args = _args(argv)
    results = measure(args)
    print()
    print(table(results))
    if args.json:
        from stablerep_jax import fileio
        fileio.write_json_atomic(args.json, results)


if __name__ == "__main__":
    main()
