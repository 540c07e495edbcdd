r"""StableRep's comparison in miniature on a CPU: data -> train three ways -> linear probes.
`run(config, workdir)` is the whole demo; `python -m stablerep_jax.demo` (`__main__.py`) calls it.

The config (configs/demo.py, which explains the design) holds the configs of the jobs it runs:
`train` (StableRep), `simclr`, `simclr_real`, `probe` and `sd`; this module only fills in what comes from
WORKDIR (the data globs, the checkpoints, the probe set). Every stage writes into WORKDIR (data
in `data_dir`) and is reused when the demo is rerun (data with a manifest, training checkpoints
resume), so an interrupted demo picks up where it stopped. Data, metrics, probe results and
figures go through `fileio` (any tf.io.gfile URL); orbax checkpoints go to `checkpoint_dir` when
set (orbax cannot write ram://). The end is a printed table, `report.md` (the table, real vs
synthetic images of the same captions, loss curves, probe top-1 per lr, generation throughput)
and `demo_results.json`.
"""
from __future__ import annotations

import contextlib
import os
import time

import jax
from absl import logging

import numpy as np

from stablerep_jax import checkpoint, features, fileio, linear_probe, parallel, train
from stablerep_jax.contact_sheet import save_contact_sheet
from stablerep_jax.data import eval_data, records
from stablerep_jax.demo import toy_world
from stablerep_jax.demo.report import (markdown_table, plot_curves, plot_probe_attributes,
                                       plot_throughput)
from stablerep_jax.metrics import read_metrics
from stablerep_jax.models.encoder import build_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO, "configs")


def config_file(name: str) -> str:
    path = os.path.join(CONFIGS_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the demo reads the repository's configs/; "
                                "install with `pip install -e .` from a checkout")
    return path


# --------------------------------------------------------------------------------------------
# Stage 1: data


DATA_SETS = ("synthetic", "real")


def make_data(config, data_dir: str) -> dict[str, str]:
    """Writes (or reuses) both training sets of the same captions; returns their shard globs.
    synthetic: K images per caption from the generator (toy renders, or Stable Diffusion);
    real: one toy render per caption, from seeds the synthetic set never uses."""
    if config.generator not in ("toy", "sd"):
        raise ValueError(f"config.generator={config.generator!r}: use 'toy' or 'sd'")
    dirs = {name: os.path.join(data_dir, name) for name in DATA_SETS}
    if records.read_manifest(dirs["synthetic"]) is None:
        if config.generator == "toy":
            toy_world.write_toy_dataset(dirs["synthetic"], num_captions=config.num_captions,
                                        images_per_caption=config.images_per_caption,
                                        image_size=config.stored_size, seed=config.seed)
        else:
            _generate_with_sd(config, dirs["synthetic"])
    if records.read_manifest(dirs["real"]) is None:
        toy_world.write_toy_dataset(dirs["real"], num_captions=config.num_captions,
                                    images_per_caption=1, image_size=config.stored_size,
                                    seed=config.seed, stream="real")
    return {name: os.path.join(path, "*.tfrecord") for name, path in dirs.items()}


def _generate_with_sd(config, data_dir: str) -> None:
    """The toy grammar's captions, rendered by a real (or test) Stable Diffusion (`config.sd`)."""
    from stablerep_jax import generate

    if not config.model:
        raise ValueError("config.generator='sd' needs --config.model (a diffusers folder or hub id)")
    gen = _job_config(config, "sd", set_by_demo=("captions", "output_dir"))
    gen.captions = os.path.join(os.path.dirname(data_dir), "sd_captions.txt")
    gen.output_dir = data_dir
    specs = toy_world.sample_captions(config.num_captions, config.seed)
    fileio.write_text_atomic(gen.captions, "\n".join(s.text for s in specs) + "\n")
    generate.run(gen)


def _job_config(config, name: str, set_by_demo: tuple[str, ...]):
    """`config.<name>` with its references resolved (a plain config for the job); the fields
    the demo fills in from its workdir must be left unset."""
    job = config[name].copy_and_resolve_references()
    for key in set_by_demo:
        *parents, leaf = key.split(".")
        node = job
        for parent in parents:
            node = node[parent]
        if node[leaf] is not None:
            raise ValueError(f"--config.{name}.{key}={node[leaf]!r}: the demo sets it from "
                             "WORKDIR; leave it unset")
    return job


def _shard_files(glob: str) -> list[str]:
    """The finished shards of one of `make_data`'s sets, as its manifest lists them."""
    directory = os.path.dirname(glob)
    return [os.path.join(directory, name) for name in records.read_manifest(directory)["shards"]]


def samples_sheet(globs: dict[str, str], workdir: str, rows: int = 6) -> str:
    """Real vs synthetic images of the same captions: a row per caption, the real image first."""
    synthetic = records.read_records(_shard_files(globs["synthetic"])[0], limit=rows)
    wanted = {r.caption_id for r in synthetic}
    real = {r.caption_id: r.images[0] for path in _shard_files(globs["real"])
            for r in records.read_records(path) if r.caption_id in wanted}
    path = os.path.join(workdir, "contact_sheet.png")
    save_contact_sheet(path, [(f"{r.caption} (real | {len(r.images)} synthetic)",
                               [real[r.caption_id], *r.images]) for r in synthetic],
                       thumb_size=64)
    return path


# --------------------------------------------------------------------------------------------
# Stage 2: training


class Preempted(Exception):
    """A training stage stopped early (SIGTERM) with a checkpoint: rerun the demo to resume."""


def train_config(config, name: str, data_glob: str):
    """`config.train` (StableRep), `config.simclr` or `config.simclr_real` on the demo's data."""
    c = _job_config(config, name, set_by_demo=("data.train_files",))
    c.data.train_files = data_glob
    return c


def run_config(config, slug: str, globs: dict[str, str]):
    """The train config of one of `RUNS` on its data set."""
    _, field, data_set = RUNS[slug]
    return train_config(config, field, globs[data_set])


def train_run(cfg, name: str, workdir: str, checkpoint_dir: str) -> None:
    """Trains one encoder (resuming a finished or interrupted run); raises `Preempted` when
    SIGTERM stopped it, so that no half-trained encoder is probed."""
    logging.info("training %s (%d steps)", name, cfg.total_steps)
    result = train.train_and_evaluate(cfg, workdir, checkpoint_workdir=checkpoint_dir)
    if result.preempted:
        raise Preempted(f"training {name} stopped by SIGTERM at step {result.step} of "
                        f"{result.total_steps}; rerun the same command to resume")


def random_checkpoint(train_cfg, directory: str) -> str:
    """A randomly initialised encoder saved like a trained one: the probe's floor."""
    try:
        checkpoint.resolve_step_dir(directory)
        return directory
    except FileNotFoundError:
        pass
    model = build_model(train_cfg.model)
    variables = train.init_variables(model, train_cfg, jax.random.PRNGKey(train_cfg.seed))
    checkpoint.save_model(directory, 0, variables["params"], variables.get("batch_stats", {}),
                          train_cfg.model.to_dict())
    return directory


# --------------------------------------------------------------------------------------------
# Stage 3: probe


def probe_set(config, data_dir: str) -> dict:
    """The held-out probe renders (written once, reused): {split: (paths, caption specs)}."""
    root = os.path.join(data_dir, "probe_set")
    toy_world.write_toy_probe_set(root, config.probe_train_images, config.probe_test_images,
                                  image_size=config.stored_size, seed=config.seed + 1)
    return toy_world.read_toy_probe_set(root)


def probe_encoder(config, checkpoint_dir: str, images: dict, mesh) -> dict:
    """{attribute: the sweep's results} for one encoder: its frozen features of the probe set
    are extracted once (centre crops, float32) and `config.probe`'s sweep runs per attribute."""
    p = _job_config(config, "probe", set_by_demo=("checkpoint", "dataset"))
    if p.mode != "cached_features":
        raise ValueError(f"--config.probe.mode={p.mode!r}: the demo probes every attribute on "
                         "features extracted once, so it runs mode 'cached_features' only; run "
                         "python -m stablerep_jax.linear_probe for the augmented protocol")
    encoder = features.load_encoder(checkpoint_dir)
    encode = features.make_encode_fn(encoder.model, mesh)
    variables = features.replicate(encoder.variables, mesh)
    feats, specs = {}, {}
    for split, (paths, split_specs) in images.items():
        unlabelled = eval_data.FolderSplit(split, tuple(paths), (0,) * len(paths))
        feats[split] = features.split_features(encode, variables, unlabelled, encoder.image_size,
                                               p.extract_batch_size, mesh,
                                               desc=f"{split} features")[0]
        specs[split] = split_specs
    results = {}
    for attribute in config.probe_attributes:
        labels = {split: toy_world.attribute_labels(specs[split], attribute) for split in specs}
        results[attribute] = linear_probe.probe_cached(
            p, (feats["train"], labels["train"]), (feats["test"], labels["test"]),
            len(toy_world.ATTRIBUTE_VALUES[attribute]), mesh)
    return results


def method_row(results: dict, base_lrs, mean_over) -> dict:
    """One method's line of the table: top-1 and best base lr per attribute, the mean over the
    attributes `mean_over` (the object's: the headline) and over all, and the attributes whose
    best lr sits at an end of the sweep (the grid did not bracket it)."""
    ends = (min(base_lrs), max(base_lrs))
    missing = [a for a in mean_over if a not in results]
    if missing:
        raise ValueError(f"--config.mean_over names {missing}, which --config.probe_attributes "
                         f"({list(results)}) does not probe")
    return {"mean": float(np.mean([results[a]["best_top1"] for a in mean_over])),
            "mean_all": float(np.mean([r["best_top1"] for r in results.values()])),
            "top1": {a: r["best_top1"] for a, r in results.items()},
            "best_lr": {a: r["best_lr"] for a, r in results.items()},
            "best_lr_at_grid_end": [a for a, r in results.items() if r["best_lr"] in ends]}


# --------------------------------------------------------------------------------------------
# The job


# slug -> (name in the report, its config field, its data set)
RUNS = {"stablerep": ("StableRep (synthetic)", "train", "synthetic"),
        "simclr_synthetic": ("SimCLR (synthetic)", "simclr", "synthetic"),
        "simclr_real": ("SimCLR (real)", "simclr_real", "real")}
RANDOM = ("random_init", "random init")


def _runs(config) -> list[str]:
    unknown = [b for b in config.baselines if b not in RUNS or b == "stablerep"]
    if unknown:
        raise ValueError(f"--config.baselines: unknown run(s) {unknown}; choose from "
                         f"{[k for k in RUNS if k != 'stablerep']}")
    return ["stablerep"] + [k for k in RUNS if k in config.baselines]


@contextlib.contextmanager
def _timed(stage: str, seconds: dict):
    """Adds the stage's wall time to `seconds[stage]` and logs it: the report says where the
    demo's minutes go."""
    start = time.time()
    yield
    seconds[stage] = round(seconds.get(stage, 0.0) + time.time() - start, 1)
    logging.info("stage %s: %.1f s", stage, seconds[stage])


def run(config, workdir: str) -> dict:
    start = time.time()
    stage_seconds = {}
    runs = _runs(config)
    fileio.makedirs(workdir)
    data_dir = config.data_dir or os.path.join(workdir, "data")
    with _timed("data", stage_seconds):
        globs = make_data(config, data_dir)
        sheet = samples_sheet(globs, workdir)
    # Checkpoints beside the metrics unless `checkpoint_dir` says otherwise (orbax cannot write
    # every URL a workdir may be, e.g. ram://).
    ckpt_root = config.checkpoint_dir or workdir

    run_dirs = {slug: os.path.join(workdir, slug) for slug in runs}
    encoders = {slug: os.path.join(ckpt_root, slug) for slug in runs}
    train_cfgs = {slug: run_config(config, slug, globs) for slug in runs}
    for slug, cfg in train_cfgs.items():
        with _timed(f"train {slug}", stage_seconds):
            train_run(cfg, RUNS[slug][0], run_dirs[slug], encoders[slug])
    encoders[RANDOM[0]] = random_checkpoint(train_cfgs["stablerep"],
                                            os.path.join(ckpt_root, RANDOM[0]))
    names = {**{slug: RUNS[slug][0] for slug in runs}, RANDOM[0]: RANDOM[1]}

    with _timed("probe set", stage_seconds):
        images = probe_set(config, data_dir)
    mesh = parallel.make_mesh()
    results = {}
    for slug, path in encoders.items():
        logging.info("probing %s on %s", names[slug], ", ".join(config.probe_attributes))
        with _timed(f"probe {slug}", stage_seconds):
            results[slug] = probe_encoder(config, path, images, mesh)
        if jax.process_index() == 0:
            fileio.write_json_atomic(os.path.join(workdir, "probe", f"{slug}.json"), results[slug])

    methods = {names[slug]: {"data": RUNS[slug][2] if slug in RUNS else None,
                             **method_row(r, config.probe.base_lrs, config.mean_over)}
               for slug, r in results.items()}
    figures = _figures(config, workdir, run_dirs, {names[s]: r for s, r in results.items()},
                       names, data_dir)
    summary = {
        "generator": config.generator,
        "probe_attributes": list(config.probe_attributes),
        "mean_over": list(config.mean_over),
        "probe_mode": config.probe.mode,
        "probe_top1_trained": methods[RUNS["stablerep"][0]]["mean"],
        "probe_top1_random": methods[RANDOM[1]]["mean"],
        "methods": methods,
        "train_steps": config.train.total_steps,
        "views_per_step": {names[slug]: _views_per_step(cfg) for slug, cfg in train_cfgs.items()},
        "figures": {key: os.path.basename(path) for key, path in figures.items()},
        "seconds": round(time.time() - start, 1),
        "stage_seconds": stage_seconds,
    }
    if jax.process_index() == 0:
        fileio.write_json_atomic(os.path.join(workdir, "demo_results.json"), summary)
        _write_report(workdir, config, summary, sheet, figures)
    _print_table(summary)
    return summary


def _views_per_step(cfg) -> int:
    return cfg.batch_size * cfg.data.n_img * cfg.data.num_crop


def _figures(config, workdir: str, run_dirs: dict, results: dict, names: dict,
             data_dir: str) -> dict:
    """The report's PNGs: loss curves, probe top-1 per lr per attribute for every encoder, and
    the generator's throughput when it wrote a summary.json (generate and the toy renderer do)."""
    curves = {names[slug]: [(m["step"], m["loss"]) for m in read_metrics(path)]
              for slug, path in run_dirs.items()}
    figures = {"loss curves": plot_curves(os.path.join(workdir, "loss_curves.png"), curves,
                                          title="training loss (each is its own objective)")}
    figures["probe"] = plot_probe_attributes(
        os.path.join(workdir, "probe_per_lr.png"), results,
        title=f"linear probe ({config.probe.mode}): best test top-1 over epochs per base lr")
    summary_path = os.path.join(data_dir, "synthetic", toy_world.SUMMARY_NAME)
    if fileio.exists(summary_path):
        figures["generation throughput"] = plot_throughput(
            os.path.join(workdir, "generation_throughput.png"),
            fileio.read_json(summary_path)["runs"],
            title=f"generation throughput ({config.generator} generator)")
    return figures


def _table(summary) -> str:
    attributes = summary["probe_attributes"]
    rows = []
    for name, m in summary["methods"].items():
        cells = [f"{m['top1'][a]:.1%}" + (" †" if a in m["best_lr_at_grid_end"] else "")
                 for a in attributes]
        rows.append((name, m["data"] or "-", *cells, f"**{m['mean']:.1%}**", f"{m['mean_all']:.1%}"))
    return markdown_table(["method", "data", *attributes,
                           f"mean ({', '.join(summary['mean_over'])})", "mean (all)"], rows)


def _write_report(workdir, config, summary, sheet, figures) -> None:
    classes = ", ".join(f"{a} {len(toy_world.ATTRIBUTE_VALUES[a])}"
                        for a in summary["probe_attributes"])
    views = " / ".join(str(v) for v in summary["views_per_step"].values())
    throughput = figures.get("generation throughput")
    text = f"""# StableRep demo

{config.num_captions} captions. Real: 1 image per caption; synthetic: {config.images_per_caption}
per caption from the `{config.generator}` generator; {config.stored_size}px. Each method trains
{config.train.total_steps} steps of {views} views (crops) each
({", ".join(summary["views_per_step"])}). Probe: a linear classifier on frozen CLS features of
{config.probe_train_images} held-out renders of random captions, tested on
{config.probe_test_images} more, per attribute (classes: {classes}); {config.probe.mode},
{config.probe.epochs} epochs, the best over {len(config.probe.base_lrs)} base lrs
({min(config.probe.base_lrs):g}-{max(config.probe.base_lrs):g}) and over epochs. † marks a
best lr at an end of that grid. Wall time {summary['seconds']} s.

{_table(summary)}

One seed; `python benchmarks/demo_study.py` runs several seeds and a training-lr grid.

## Real vs synthetic images of the same captions

![contact sheet]({os.path.basename(sheet)})

## Training loss

![loss curves]({os.path.basename(figures["loss curves"])})

## Linear probe: test top-1 per base learning rate

![probe]({os.path.basename(figures["probe"])})
"""
    if throughput:
        text += f"""
## Generation throughput

![generation throughput]({os.path.basename(throughput)})
"""
    fileio.write_text_atomic(os.path.join(workdir, "report.md"), text)


def _print_table(summary) -> None:
    attributes = summary["probe_attributes"]
    print("\nLinear probe on held-out renders, top-1 per attribute:")
    print(f"  {'method':22s} " + " ".join(f"{a:>10s}" for a in attributes)
          + f" {'mean':>8s} {'mean all':>8s}")
    for name, m in summary["methods"].items():
        print(f"  {name:22s} " + " ".join(f"{m['top1'][a]:10.1%}" for a in attributes)
              + f" {m['mean']:8.1%} {m['mean_all']:8.1%}")
    print(f"  (mean: over {', '.join(summary['mean_over'])})")
    print("  stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items()))
    print(f"done in {summary['seconds']} s; see report.md and demo_results.json")
