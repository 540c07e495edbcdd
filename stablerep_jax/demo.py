r"""The whole chain on a CPU in minutes: generate -> train (StableRep and SimCLR) -> linear probe.

  python -m stablerep_jax.demo --workdir=/tmp/stablerep_demo [--config.generator=sd --config.model=SD]
  python -m stablerep_jax.demo --workdir=DIR --config.train.model.depth=6 --config.probe.epochs=50

The config (configs/demo.py) holds the configs of the jobs it runs: `train` (StableRep),
`simclr`, `probe` and `sd`; this module only fills in what comes from WORKDIR (the data glob,
the checkpoints and the probe folder). Every stage writes into WORKDIR and is reused when the
demo is rerun (data with a manifest, training checkpoints resume), so an interrupted demo picks
up where it stopped. Data, metrics, probe results and figures go through `fileio` (any
tf.io.gfile URL); orbax checkpoints go to `checkpoint_dir` when set (orbax cannot write ram://).
The end is a printed table, `report.md` (contact sheet, loss curves, probe top-1 per lr for each
encoder, generation throughput) and `demo_results.json`.
"""
from __future__ import annotations

import os
import time

import jax
from absl import flags, logging

from stablerep_jax import checkpoint, cli, fileio, linear_probe, train
from stablerep_jax.contact_sheet import save_contact_sheet
from stablerep_jax.data import records, shards
from stablerep_jax.generation import toy_world
from stablerep_jax.metrics import read_metrics
from stablerep_jax.models.encoder import build_model
from stablerep_jax.report import markdown_table, plot_curves, plot_probe_accuracy, plot_throughput

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config_file(name: str) -> str:
    path = os.path.join(CONFIGS_DIR, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the demo reads the repository's configs/; "
                                "install with `pip install -e .` from a checkout")
    return path


# --------------------------------------------------------------------------------------------
# Stage 1: data


def make_data(config, workdir: str) -> str:
    """Writes (or reuses) the training records; returns the shard glob."""
    data_dir = os.path.join(workdir, "data")
    if records.read_manifest(data_dir) is None:
        if config.generator == "toy":
            toy_world.write_toy_dataset(data_dir, num_captions=config.num_captions,
                                        images_per_caption=config.images_per_caption,
                                        image_size=config.stored_size, seed=config.seed)
        elif config.generator == "sd":
            _generate_with_sd(config, data_dir)
        else:
            raise ValueError(f"config.generator={config.generator!r}: use 'toy' or 'sd'")
    return os.path.join(data_dir, "*.tfrecord")


def _generate_with_sd(config, data_dir: str) -> None:
    """The toy grammar's captions, rendered by a real (or test) Stable Diffusion (`config.sd`)."""
    from stablerep_jax import generate

    if not config.model:
        raise ValueError("config.generator='sd' needs --config.model (a diffusers folder or hub id)")
    gen = _job_config(config, "sd", set_by_demo=("captions", "output_dir"))
    gen.captions = os.path.join(os.path.dirname(data_dir), "captions.txt")
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


def samples_sheet(data_glob: str, workdir: str, rows: int = 6) -> str:
    first = shards.matching_files(data_glob)[0]
    recs = records.read_records(first, limit=rows)
    path = os.path.join(workdir, "contact_sheet.png")
    save_contact_sheet(path, [(r.caption, r.images) for r in recs], thumb_size=64)
    return path


# --------------------------------------------------------------------------------------------
# Stage 2: training


class Preempted(Exception):
    """A training stage stopped early (SIGTERM) with a checkpoint: rerun the demo to resume."""


def train_config(config, name: str, data_glob: str):
    """`config.train` (StableRep) or `config.simclr` pointed at the demo's data."""
    c = _job_config(config, name, set_by_demo=("data.train_files",))
    c.data.train_files = data_glob
    return c


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


def probe(config, checkpoint_dir: str, folder: str, workdir: str) -> dict:
    """`config.probe` on one encoder's checkpoint and the demo's probe folder."""
    c = _job_config(config, "probe", set_by_demo=("checkpoint", "dataset"))
    c.checkpoint = checkpoint_dir
    c.dataset = f"folder:{folder}"
    return linear_probe.run(c, workdir)


# --------------------------------------------------------------------------------------------
# The job


RUNS = {"StableRep": "train", "SimCLR": "simclr"}     # encoder name -> its config field


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


def run(config, workdir: str) -> dict:
    start = time.time()
    fileio.makedirs(workdir)
    data_glob = make_data(config, workdir)
    sheet = samples_sheet(data_glob, workdir)
    # Checkpoints beside the metrics unless `checkpoint_dir` says otherwise (orbax cannot write
    # every URL a workdir may be, e.g. ram://).
    ckpt_root = config.checkpoint_dir or workdir

    names = ["StableRep"] + (["SimCLR"] if config.train_simclr else [])
    run_dirs = {name: os.path.join(workdir, _slug(name)) for name in names}
    encoders = {name: os.path.join(ckpt_root, _slug(name)) for name in names}
    train_cfgs = {name: train_config(config, RUNS[name], data_glob) for name in names}
    for name, cfg in train_cfgs.items():
        logging.info("training %s (%d steps)", name, cfg.total_steps)
        result = train.train_and_evaluate(cfg, run_dirs[name], checkpoint_workdir=encoders[name])
        if result.preempted:   # never go on to probe a half-trained encoder
            raise Preempted(f"training {name} stopped by SIGTERM at step {result.step} of "
                            f"{result.total_steps}; rerun the same command to resume")
    encoders["random init"] = random_checkpoint(train_cfgs["StableRep"],
                                                os.path.join(ckpt_root, "random_init"))

    folder = os.path.join(workdir, f"probe_{config.probe_attribute}")
    toy_world.write_toy_probe_folder(
        folder, attribute=config.probe_attribute, train_per_class=config.probe_train_per_class,
        test_per_class=config.probe_test_per_class, image_size=config.stored_size,
        seed=config.seed + 1)
    results = {name: probe(config, path, folder, os.path.join(workdir, "probe", _slug(name)))
               for name, path in encoders.items()}

    figures = _figures(config, workdir, run_dirs, results)
    summary = {
        "generator": config.generator,
        "probe_attribute": config.probe_attribute,
        "probe_mode": config.probe.mode,
        "probe_top1_trained": results["StableRep"]["best_top1"],
        "probe_top1_random": results["random init"]["best_top1"],
        "probe_top1_simclr": results["SimCLR"]["best_top1"] if "SimCLR" in results else None,
        "probe": {name: {"best_top1": r["best_top1"], "best_lr": r["best_lr"]}
                  for name, r in results.items()},
        "train_steps": config.train.total_steps,
        "views_per_step": {name: _views_per_step(cfg) for name, cfg in train_cfgs.items()},
        "figures": {key: os.path.basename(path) for key, path in figures.items()},
        "seconds": round(time.time() - start, 1),
    }
    fileio.write_json_atomic(os.path.join(workdir, "demo_results.json"), summary)
    _write_report(workdir, config, summary, sheet, figures)
    _print_table(summary)
    return summary


def _views_per_step(cfg) -> int:
    return cfg.batch_size * cfg.data.n_img * cfg.data.num_crop


def _figures(config, workdir: str, run_dirs: dict, results: dict) -> dict:
    """The report's PNGs: loss curves, probe top-1 per lr for each encoder, and the
    generator's throughput when it wrote a summary.json (generate and the toy renderer do)."""
    curves = {name: [(m["step"], m["loss"]) for m in read_metrics(path)]
              for name, path in run_dirs.items()}
    figures = {"loss curves": plot_curves(os.path.join(workdir, "loss_curves.png"), curves,
                                          title="training loss (each is its own objective)")}
    for name, r in results.items():
        figures[f"probe {name}"] = plot_probe_accuracy(
            os.path.join(workdir, f"probe_{_slug(name)}.png"), r,
            title=f"{name}: linear probe on {config.probe_attribute} ({r['mode']})")
    summary_path = os.path.join(workdir, "data", toy_world.SUMMARY_NAME)
    if fileio.exists(summary_path):
        figures["generation throughput"] = plot_throughput(
            os.path.join(workdir, "generation_throughput.png"),
            fileio.read_json(summary_path)["runs"],
            title=f"generation throughput ({config.generator} generator)")
    return figures


def _write_report(workdir, config, summary, sheet, figures) -> None:
    rows = [(name, f"{r['best_top1']:.1%}", r["best_lr"]) for name, r in summary["probe"].items()]
    classes = len(toy_world.ATTRIBUTE_VALUES[config.probe_attribute])
    probe_figures = "\n\n".join(f"![{key}]({os.path.basename(path)})"
                                  for key, path in figures.items() if key.startswith("probe "))
    throughput = figures.get("generation throughput")
    views = " / ".join(str(v) for v in summary["views_per_step"].values())
    text = f"""# StableRep demo

Generator: `{config.generator}`; {config.num_captions} captions x {config.images_per_caption} images
at {config.stored_size}px; {config.train.total_steps} training steps of {views} views (crops) each
for {" and ".join(summary["views_per_step"])}. Probe: classify held-out renders by
**{config.probe_attribute}** ({classes} classes, chance {1.0 / classes:.1%}) with a linear
classifier on frozen CLS features ({config.probe.mode}; {config.probe.epochs} epochs, the best
over {len(config.probe.base_lrs)} base lrs). Wall time {summary['seconds']} s.

{markdown_table(["encoder", "probe top-1", "best lr"], rows)}

## Samples (a row per caption)

![contact sheet]({os.path.basename(sheet)})

## Training loss

![loss curves]({os.path.basename(figures["loss curves"])})

## Linear probe: test top-1 per base learning rate

{probe_figures}
"""
    if throughput:
        text += f"""
## Generation throughput

![generation throughput]({os.path.basename(throughput)})
"""
    fileio.write_text_atomic(os.path.join(workdir, "report.md"), text)


def _print_table(summary) -> None:
    print(f"\nLinear probe on held-out renders ({summary['probe_attribute']}):")
    for name, r in summary["probe"].items():
        print(f"  {name:12s} top-1 {r['best_top1']:6.1%}   (best lr {r['best_lr']})")
    print(f"done in {summary['seconds']} s; see report.md and demo_results.json")


def main(config) -> int:
    """Exit code 0 when the demo ran to the end, `cli.EXIT_RESUME` when SIGTERM stopped it."""
    try:
        run(config, flags.FLAGS.workdir)
    except Preempted as e:
        logging.warning("%s", e)
        return cli.EXIT_RESUME
    return cli.EXIT_OK


if __name__ == "__main__":
    from stablerep_jax import cli
    flags.DEFINE_string("workdir", "stablerep_demo", "where the demo writes everything")
    cli.run(main, default_config=_config_file("demo.py"))
