r"""The whole chain on a CPU in minutes: generate -> train (StableRep and SimCLR) -> linear probe.

  python -m stablerep_jax.demo --workdir=/tmp/stablerep_demo [--config.generator=sd --config.model=SD]

Every stage writes into WORKDIR and is reused when the demo is rerun (data with a manifest,
training checkpoints resume), so an interrupted demo picks up where it stopped. The end is a
printed table, `report.md` (contact sheet, loss curves, probe table) and `demo_results.json`.
"""
from __future__ import annotations

import os
import time

import jax
from absl import flags, logging

from stablerep_jax import checkpoint, cli, config_utils, fileio, linear_probe, train
from stablerep_jax.contact_sheet import save_contact_sheet
from stablerep_jax.data import records, shards
from stablerep_jax.generation import toy_world
from stablerep_jax.metrics import read_metrics
from stablerep_jax.models.encoder import build_model
from stablerep_jax.report import markdown_table, plot_curves

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
    """The toy grammar's captions, rendered by a real (or test) Stable Diffusion."""
    from stablerep_jax import generate

    if not config.model:
        raise ValueError("config.generator='sd' needs --config.model (a diffusers folder or hub id)")
    captions_file = os.path.join(os.path.dirname(data_dir), "captions.txt")
    specs = toy_world.sample_captions(config.num_captions, config.seed)
    fileio.write_text_atomic(captions_file, "\n".join(s.text for s in specs) + "\n")
    gen = config_utils.load_config(_config_file("generate.py"))
    gen.model = config.model
    gen.captions = captions_file
    gen.output_dir = data_dir
    gen.images_per_caption = config.images_per_caption
    gen.num_inference_steps = config.sd_steps
    gen.resolution = config.sd_resolution
    gen.save_size = config.stored_size
    gen.image_format = "png"
    gen.seed = config.seed
    generate.run(gen)


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


def train_config(config, data_glob: str, simclr: bool):
    c = config_utils.load_config(_config_file("stablerep.py") + ":tiny")
    c.seed = config.seed
    c.data.train_files = data_glob
    c.data.image_size = config.image_size
    c.data.min_crop_scale = config.min_crop_scale
    c.total_steps = config.train_steps
    c.checkpoint_every = config.train_steps
    c.log_every = 5
    c.model.variant = config.width_variant
    c.model.depth = config.depth
    c.model.patch_size = config.patch_size
    c.model.mlp_dim = config.mlp_dim
    c.model.emb_dim = config.emb_dim
    c.optim.blr = config.blr
    c.optim.warmup_steps = max(1, config.train_steps // 10)
    if simclr:   # same images per step: one image per caption, two crops, twice the captions
        c.data.n_img, c.data.num_crop = 1, 2
        c.batch_size = config.batch_size * config.n_img
    else:
        c.data.n_img, c.data.num_crop = config.n_img, 1
        c.batch_size = config.batch_size
    c.optim.lr = 0.0
    return c


def random_checkpoint(train_cfg, directory: str) -> str:
    """A randomly initialised encoder saved like a trained one: the probe's floor."""
    try:
        checkpoint.resolve_step_dir(directory)
        return directory
    except FileNotFoundError:
        pass
    model = build_model(train_cfg.model, train_cfg.data.image_size)
    variables = train.init_variables(model, train_cfg, jax.random.PRNGKey(train_cfg.seed))
    checkpoint.save_model(directory, 0, variables["params"], variables.get("batch_stats", {}),
                          {**train_cfg.model.to_dict(), "image_size": train_cfg.data.image_size})
    return directory


# --------------------------------------------------------------------------------------------
# Stage 3: probe


def probe(config, checkpoint_dir: str, folder: str, workdir: str) -> dict:
    c = config_utils.load_config(_config_file("linear_probe.py"))
    c.checkpoint = checkpoint_dir
    c.dataset = f"folder:{folder}"
    c.epochs = config.probe_epochs
    c.base_lrs = tuple(config.probe_base_lrs)
    c.batch_size = config.probe_batch_size
    c.use_bn = config.probe_use_bn
    c.image_size = config.image_size
    c.seed = config.seed
    return linear_probe.run(c, workdir)


# --------------------------------------------------------------------------------------------
# The job


def run(config, workdir: str) -> dict:
    start = time.time()
    fileio.makedirs(workdir)
    data_glob = make_data(config, workdir)
    sheet = samples_sheet(data_glob, workdir)

    encoders = {"StableRep": os.path.join(workdir, "stablerep")}
    train_cfgs = {"StableRep": train_config(config, data_glob, simclr=False)}
    if config.train_simclr:
        encoders["SimCLR"] = os.path.join(workdir, "simclr")
        train_cfgs["SimCLR"] = train_config(config, data_glob, simclr=True)
    for name, cfg in train_cfgs.items():
        logging.info("training %s (%d steps)", name, cfg.total_steps)
        result = train.train_and_evaluate(cfg, encoders[name])
        if result.preempted:   # never go on to probe a half-trained encoder
            raise Preempted(f"training {name} stopped by SIGTERM at step {result.step} of "
                            f"{result.total_steps}; rerun the same command to resume")
    encoders["random init"] = random_checkpoint(train_cfgs["StableRep"],
                                                os.path.join(workdir, "random_init"))

    folder = os.path.join(workdir, f"probe_{config.probe_attribute}")
    if not fileio.exists(os.path.join(folder, "test")):
        toy_world.write_toy_probe_folder(
            folder, attribute=config.probe_attribute,
            train_per_class=config.probe_train_per_class,
            test_per_class=config.probe_test_per_class, image_size=config.stored_size,
            seed=config.seed + 1)
    results = {name: probe(config, path, folder, os.path.join(workdir, "probe", name.replace(" ", "_")))
               for name, path in encoders.items()}

    curves = {name: [(m["step"], m["loss"]) for m in read_metrics(encoders[name])]
              for name in train_cfgs}
    curve_png = plot_curves(os.path.join(workdir, "loss_curves.png"), curves,
                            title="training loss (each is its own objective)")
    summary = {
        "generator": config.generator,
        "probe_attribute": config.probe_attribute,
        "probe_top1_trained": results["StableRep"]["best_top1"],
        "probe_top1_random": results["random init"]["best_top1"],
        "probe_top1_simclr": results["SimCLR"]["best_top1"] if "SimCLR" in results else None,
        "probe": {name: {"best_top1": r["best_top1"], "best_lr": r["best_lr"]}
                  for name, r in results.items()},
        "train_steps": config.train_steps,
        "images_per_step": config.batch_size * config.n_img,
        "seconds": round(time.time() - start, 1),
    }
    fileio.write_json_atomic(os.path.join(workdir, "demo_results.json"), summary)
    _write_report(workdir, config, summary, sheet, curve_png)
    _print_table(summary)
    return summary


def _write_report(workdir, config, summary, sheet, curve_png) -> None:
    rows = [(name, f"{r['best_top1']:.1%}", r["best_lr"]) for name, r in summary["probe"].items()]
    chance = 1.0 / len(toy_world.ATTRIBUTE_VALUES[config.probe_attribute])
    text = f"""# StableRep demo

Generator: `{config.generator}`; {config.num_captions} captions x {config.images_per_caption} images
at {config.stored_size}px; {config.train_steps} training steps of {summary['images_per_step']}
images each (same budget for StableRep and SimCLR). Probe: classify held-out renders by
**{config.probe_attribute}** ({len(toy_world.ATTRIBUTE_VALUES[config.probe_attribute])} classes,
chance {chance:.1%}) with a linear classifier on frozen CLS features. Wall time {summary['seconds']} s.

{markdown_table(["encoder", "probe top-1", "best lr"], rows)}

## Samples (a row per caption)

![contact sheet]({os.path.basename(sheet)})

## Training loss

![loss curves]({os.path.basename(curve_png)})
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
