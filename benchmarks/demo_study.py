r"""The demo's comparison over seeds, with every method tuned on the same training-lr grid.

  python benchmarks/demo_study.py --workdir /tmp/demo_study                    # 3 seeds x 3 blrs
  python benchmarks/demo_study.py --workdir W --tune_seeds 0                   # tune on seed 0 only
  python benchmarks/demo_study.py --workdir W --seeds 0,1 --blrs 1e-3,3e-3 --set train.total_steps=200

For each seed the demo's data (real and synthetic sets of the same captions, the probe set) is
written once; then each method of the demo (StableRep on synthetic, SimCLR on synthetic, SimCLR
on real: the demo config's runs, with the demo's probes of every attribute) is trained at each
base lr of the grid (`optim.blr` of its own config), plus one random encoder per seed.

Each method is reported at ITS best base lr: the one with the highest mean-over-attributes top-1
averaged over the tuning seeds (all seeds unless --tune_seeds names some: then the other seeds
train each method only at that lr). The table gives, per method, that lr, the mean over seeds and
range (min-max) of the mean over attributes and each seed's value; then per attribute, the whole
grid, and whether StableRep beats both SimCLR rows by at least --margin points in every seed.
Everything goes to WORKDIR/study.json; a rerun reuses finished runs (training resumes).
"""
from __future__ import annotations

import argparse
import ast
import time
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from stablerep_jax import config_utils, fileio  # noqa: E402
from stablerep_jax.demo import comparison  # noqa: E402

TARGET = "StableRep (synthetic)"
BASELINES = ("SimCLR (synthetic)", "SimCLR (real)")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--preset", default="default", choices=("default", "test"))
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--blrs", type=_floats, default=[5e-4, 1.5e-3, 4.5e-3],
                   help="the training base-lr grid every method is tuned on")
    p.add_argument("--tune_seeds", type=_ints, default=[],
                   help="seeds the lr grid runs on (default: every seed)")
    p.add_argument("--margin", type=float, default=3.0,
                   help="points by which StableRep should beat each SimCLR row in every seed")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a demo config override, e.g. train.total_steps=200 (repeatable)")
    return p.parse_args(argv)


def demo_config(args, seed: int):
    config = config_utils.load_config(os.path.join(REPO, "configs", f"demo.py:{args.preset}"))
    overrides = {"seed": seed}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key] = _literal(value)
    config_utils.apply_overrides(config, overrides)
    return config


def _literal(text: str):
    """A Python literal (number, tuple, bool) or, failing that, the text as a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


class Seed:
    """One seed's data and the demo stages run on it, each result kept in WORKDIR/seedS/."""

    def __init__(self, args, seed: int, mesh):
        self.config = demo_config(args, seed)
        self.root = os.path.join(args.workdir, f"seed{seed}")
        data_dir = os.path.join(self.root, "data")
        self.globs = comparison.make_data(self.config, data_dir)
        self.images = comparison.probe_set(self.config, data_dir)
        self.mesh = mesh

    def _probe(self, name: str, checkpoint_dir: str) -> dict:
        path = os.path.join(self.root, "probe", f"{name}.json")
        if fileio.exists(path):
            return fileio.read_json(path)
        results = comparison.probe_encoder(self.config, checkpoint_dir, self.images, self.mesh)
        row = comparison.method_row(results, self.config.probe.base_lrs, self.config.mean_over)
        fileio.write_json_atomic(path, row)
        return row

    def method(self, slug: str, blr: float) -> dict:
        """Trains (or reuses) one method at one base lr and probes it: comparison.method_row, or
        a row that records the divergence when training stopped on a non-finite state."""
        name = f"{slug}_blr{blr:g}"
        cfg = comparison.run_config(self.config, slug, self.globs)
        cfg.optim.blr = blr
        directory = os.path.join(self.root, name)
        diverged = os.path.join(self.root, "probe", f"{name}.diverged.json")
        if fileio.exists(diverged):
            return fileio.read_json(diverged)
        try:
            comparison.train_run(cfg, f"{comparison.RUNS[slug][0]} at base lr {blr:g}",
                                 directory, directory)
        except FloatingPointError as e:       # the train job's guard: nothing non-finite saved
            row = {"diverged": str(e), "mean": float("nan"), "mean_all": float("nan")}
            fileio.write_json_atomic(diverged, row)
            return row
        return self._probe(name, directory)

    def random(self) -> dict:
        cfg = comparison.run_config(self.config, "stablerep", self.globs)
        directory = comparison.random_checkpoint(
            cfg, os.path.join(self.root, comparison.RANDOM[0]))
        return self._probe(comparison.RANDOM[0], directory)


def run_study(args) -> dict:
    """{method name: {seed: {blr: row}}} (the random encoder under blr None)."""
    from stablerep_jax import parallel

    mesh = parallel.make_mesh()
    tune = args.tune_seeds if args.tune_seeds else args.seeds
    rows: dict = {}
    seeds = list(tune) + [s for s in args.seeds if s not in tune]
    for seed in seeds:
        stage = Seed(args, seed, mesh)
        for slug in comparison._runs(stage.config):
            name = comparison.RUNS[slug][0]
            if seed in tune:
                blrs = args.blrs
            else:                       # the best on the tuning seeds
                blrs = [best_blr(rows[name], tune, args.blrs)]
            for blr in blrs:
                print(f"== seed {seed}: {name}, training base lr {blr:g}", flush=True)
                rows.setdefault(name, {}).setdefault(seed, {})[blr] = stage.method(slug, blr)
        rows.setdefault(comparison.RANDOM[1], {})[seed] = {None: stage.random()}
    return rows


def best_blr(per_seed: dict, seeds, blrs) -> float:
    """The base lr with the highest mean over `seeds` of the mean-over-attributes top-1 (ties:
    the earlier lr of the grid)."""
    means = {b: np.mean([per_seed[s][b]["mean"] for s in seeds]) for b in blrs}
    return max(blrs, key=lambda b: (-np.inf if np.isnan(means[b]) else means[b],
                                    -blrs.index(b)))


def analyse(rows: dict, args, mean_over) -> dict:
    """Each method at its best blr, with the per-seed values, the grid and the verdict."""
    tune = args.tune_seeds if args.tune_seeds else args.seeds
    table = {}
    for name, per_seed in rows.items():
        random_init = name == comparison.RANDOM[1]
        best = None if random_init else best_blr(per_seed, tune, args.blrs)
        chosen = [per_seed[s][best] for s in args.seeds]
        attributes = list(chosen[0]["top1"])
        table[name] = {
            "best_blr": best, "seeds": list(args.seeds),
            "mean": [r["mean"] for r in chosen],
            "mean_all": [r["mean_all"] for r in chosen],
            "attributes": {a: [r["top1"][a] for r in chosen] for a in attributes},
            "grid": {} if random_init else {
                f"{b:g}": [per_seed[s][b]["mean"] for s in tune] for b in args.blrs},
            "best_blr_at_grid_end": (not random_init and len(args.blrs) > 1
                                     and best in (min(args.blrs), max(args.blrs))),
            "probe_lr_at_grid_end": sorted({a for r in chosen for a in r["best_lr_at_grid_end"]}),
        }
    verdict = None
    if TARGET in table and all(b in table for b in BASELINES):
        gaps = {b: [100 * (x - y) for x, y in zip(table[TARGET]["mean"], table[b]["mean"])]
                for b in BASELINES}
        verdict = {"margin": args.margin, "gaps_points": gaps,
                   "met": all(g >= args.margin for gs in gaps.values() for g in gs)}
    return {"attributes": attributes, "mean_over": list(mean_over), "tune_seeds": list(tune),
            "methods": table,
            "verdict": verdict}


def _pct(values) -> str:
    values = 100 * np.asarray(values)
    return f"{values.mean():5.1f} [{values.min():5.1f}-{values.max():5.1f}]"


def report(study: dict) -> str:
    lines = [f"tuned on seeds {study['tune_seeds']}",
             "method                 best blr   mean [range] over seeds   per seed"]
    for method, m in study["methods"].items():
        flag = "  (best blr at the grid's end)" if m["best_blr_at_grid_end"] else ""
        blr = "-" if m["best_blr"] is None else f"{m['best_blr']:g}"
        lines.append(f"{method:22s} {blr:>8s}   {_pct(m['mean']):25s} "
                     + " ".join(f"{100 * v:5.1f}" for v in m["mean"]) + flag)
    lines.append(f"(mean: over {', '.join(study['mean_over'])}; over all probed attributes:)")
    for method, m in study["methods"].items():
        lines.append(f"{method:22s} {'':8s}   {_pct(m['mean_all']):25s} "
                     + " ".join(f"{100 * v:5.1f}" for v in m["mean_all"]))
    lines.append("")
    lines.append("per attribute at each method's best blr (mean [range] over seeds):")
    attributes = study["attributes"]
    lines.append(f"{'method':22s} " + " ".join(f"{a:>19s}" for a in attributes))
    for method, m in study["methods"].items():
        lines.append(f"{method:22s} " + " ".join(f"{_pct(m['attributes'][a]):>19s}"
                                                 for a in attributes))
    lines.append("")
    lines.append("mean over attributes (mean over the tuning seeds) per training base lr:")
    for method, m in study["methods"].items():
        if m["grid"]:
            lines.append(f"{method:22s} " + "  ".join(f"{b}: {100 * np.mean(v):5.1f}"
                                                      for b, v in m["grid"].items()))
    edges = {method: m["probe_lr_at_grid_end"] for method, m in study["methods"].items()
             if m["probe_lr_at_grid_end"]}
    if edges:
        lines.append(f"probe's best lr at an end of its grid (may be understated): {edges}")
    v = study["verdict"]
    if v:
        lines.append("")
        for b, gaps in v["gaps_points"].items():
            lines.append(f"{TARGET} - {b}: " + ", ".join(f"{g:+.1f}" for g in gaps)
                         + " points per seed")
        lines.append(f"target (>= {v['margin']:g} points over both SimCLR rows in every seed): "
                     + ("met" if v["met"] else "NOT met"))
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    study = analyse(run_study(args), args, demo_config(args, args.seeds[0]).mean_over)
    study["args"] = {"preset": args.preset, "seeds": args.seeds, "blrs": args.blrs,
                     "tune_seeds": args.tune_seeds, "set": args.set}
    study["seconds"] = round(time.time() - start, 1)
    fileio.write_json_atomic(os.path.join(args.workdir, "study.json"), study)
    print(report(study))
    print(f"study.json written to {args.workdir} ({study['seconds']} s)")
    return study


if __name__ == "__main__":
    main()
