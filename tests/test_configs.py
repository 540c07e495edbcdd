"""Config presets behave as the paper and the reference code say; overrides and errors work.

What is pinned here is behaviour: the schedule the trainer builds from a preset, the batch the
loss sees, the command each config's docstring tells users to run.
"""
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from stablerep_jax import config_utils, optim
from stablerep_jax.models.encoder import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
STABLEREP = os.path.join(REPO, "configs", "stablerep.py")


def _module(path):
    spec = importlib.util.spec_from_file_location("cfg_" + os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _presets(path):
    return getattr(_module(path), "PRESETS", (None,))


def _load(preset):
    return config_utils.load_config(f"{STABLEREP}:{preset}")


# The reference README's schedule table (StableRep/README.md, "To reproduce the 1x, 2x, or 3x
# schedules") and its training command (43 captions x 32 GPUs = 1376, --n_img 6); the "add
# text" rows are the same command with --add_language.
# preset: (epochs, warmup_epochs, batch_size captions, n_img, add_language)
PAPER_TABLE = {
    "vit_b16_cc12m_1x": (15, 0.5, 1376, 6, False),
    "vit_b16_cc12m_2x": (31, 1.0, 1376, 6, False),
    "vit_b16_cc12m_3x": (46, 1.5, 1376, 6, False),
    "vit_b16_redcaps_1x": (13, 0.45, 1376, 6, False),
    "vit_b16_redcaps_2x": (27, 0.9, 1376, 6, False),
    "vit_b16_redcaps_3x": (40, 1.35, 1376, 6, False),
    "vit_b16_cc12m_pp_1x": (15, 0.5, 1376, 6, True),
    "vit_b16_redcaps_pp_1x": (13, 0.45, 1376, 6, True),
}


@pytest.mark.parametrize("preset", sorted(PAPER_TABLE))
def test_paper_presets_match_the_reference_table(preset):
    c = _load(preset)
    got = (c.epochs, c.optim.warmup_epochs, c.batch_size, c.data.n_img, c.model.add_language)
    assert got == PAPER_TABLE[preset]
    # The rest of the reference command: --blr 2.0e-4 --weight_decay 0.1 --beta1 0.9
    # --beta2 0.98, ViT-B/16, --ssl-temp 0.1, --ssl-mlp-dim 4096, --ssl-emb-dim 256,
    # --ssl-w1/--ssl-w2 1.0, --vl-projection linear, --num_crop 1, min_lr 0.
    assert (c.optim.blr, c.optim.weight_decay, c.optim.b1, c.optim.b2) == (2e-4, 0.1, 0.9, 0.98)
    assert (c.model.variant, c.model.patch_size, c.model.image_size) == ("base", 16, 224)
    assert (c.loss.temperature, c.loss.temperature_cosine) == (0.1, False)
    assert (c.model.mlp_dim, c.model.emb_dim, c.data.num_crop) == (4096, 256, 1)
    assert (c.loss.w1, c.loss.w2, c.model.vl_projection) == (1.0, 1.0, "linear")
    assert c.optim.min_lr == 0.0
    # lr = blr x 1376 captions x 6 images / 256 / 2 (main_stablerep.py, num_crop 1)
    assert optim.peak_learning_rate(c) == pytest.approx(2e-4 * 1376 * 6 / 512)


def _expected_length(c, steps_per_epoch):
    total = c.total_steps if c.total_steps > 0 else round(c.epochs * steps_per_epoch)
    warm = (c.optim.warmup_steps if c.optim.warmup_steps > 0
            else round(c.optim.warmup_epochs * steps_per_epoch))
    return total, warm


@pytest.mark.parametrize("preset", _presets(STABLEREP))
def test_every_train_preset_builds_the_reference_schedule(preset):
    """The trainer's own path (epoch_steps, training_length -> learning_rate_schedule): linear
    warmup that peaks exactly at warmup_epochs x steps_per_epoch, then cosine to 0."""
    from stablerep_jax import train
    c = _load(preset)
    steps_per_epoch = 1000
    c.data.num_captions = steps_per_epoch * c.batch_size + c.batch_size - 1   # a partial batch
    spe = train.epoch_steps(c, None, process_count=1)      # from data.num_captions
    total = train.training_length(c, spe)
    assert spe == steps_per_epoch
    want_total, warm = _expected_length(c, steps_per_epoch)
    assert total == want_total
    schedule = optim.learning_rate_schedule(c, total, spe)
    peak = optim.peak_learning_rate(c)
    assert float(schedule(0)) == 0.0
    assert float(schedule(warm // 2)) == pytest.approx(peak * (warm // 2) / warm, rel=1e-5)
    assert float(schedule(warm - 1)) < peak
    assert float(schedule(warm)) == pytest.approx(peak, rel=1e-6)
    halfway = warm + (total - warm) // 2
    assert float(schedule(halfway)) == pytest.approx(peak / 2, rel=1e-3)
    assert float(schedule(total)) == pytest.approx(0.0, abs=peak * 1e-6)
    assert float(schedule(total - max(1, total // 100))) > 0.0
    build_model(c.model)   # the variant, dtype, widths and image size resolve


def test_reference_lr_matches_ours_step_by_step():
    """misc.adjust_learning_rate evaluated at the fractional epoch of each step equals ours."""
    import math
    c = _load("vit_b16_redcaps_2x")
    spe = 200
    total, warm = round(c.epochs * spe), round(c.optim.warmup_epochs * spe)
    schedule = optim.learning_rate_schedule(c, total, spe)
    lr = optim.peak_learning_rate(c)
    for step in range(0, total, 37):
        epoch = step / spe
        if epoch < c.optim.warmup_epochs:
            ref = lr * epoch / c.optim.warmup_epochs
        else:
            ref = lr * 0.5 * (1 + math.cos(math.pi * (epoch - c.optim.warmup_epochs)
                                           / (c.epochs - c.optim.warmup_epochs)))
        assert float(schedule(step)) == pytest.approx(ref, rel=1e-4, abs=lr * 1e-6), step
    assert warm == 180


def test_other_presets_keep_their_documented_differences():
    simclr = _load("simclr_b16_cc12m_1x")
    assert (simclr.data.n_img, simclr.data.num_crop, simclr.epochs) == (1, 2, 15)
    laion = _load("vit_b16_laion_pp")
    assert laion.model.add_language and laion.data.n_img == 2
    assert _load("vit_s16_cc12m_1x").model.variant == "small"


_JOB = re.compile(r"python -m (stablerep_jax\.\w+)")
_CONFIG_ARG = re.compile(r"--config=configs/(\w+\.py)(?::(\w+))?")


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_preset_loads_and_the_docstring_commands_run_real_jobs(path):
    """Each preset loads to the same config twice; each docstring command names a job module
    that exists, this config file, and a preset that loads."""
    module = _module(path)
    for preset in getattr(module, "PRESETS", (None,)):
        spec = path if preset is None else f"{path}:{preset}"
        assert config_utils.load_config(spec).to_dict() == config_utils.load_config(spec).to_dict()
    doc = module.__doc__ or ""
    jobs = _JOB.findall(doc)
    assert jobs, f"{path}: the docstring must carry the command that runs it"
    for job in jobs:
        assert importlib.util.find_spec(job) is not None, f"{path}: no module {job}"
    for file, preset in _CONFIG_ARG.findall(doc):
        assert file == os.path.basename(path), f"{path}: its command loads configs/{file}"
        if preset:
            assert preset in module.PRESETS, f"{path}: command preset {preset!r} does not exist"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*vit_b16_cc12m_1x"):
        config_utils.load_config(STABLEREP + ":nope")


def test_parse_bool_is_strict():
    assert config_utils.parse_bool("False") is False
    assert config_utils.parse_bool("true") is True
    with pytest.raises(ValueError, match="not a boolean"):
        config_utils.parse_bool("maybe")


_PRINT_JOB = ("from stablerep_jax import cli; "
              "cli.run(lambda c: print('BLR', c.optim.blr, 'FILES', c.data.train_files, "
              "'BN', c.data.downsample, 'TEXT', c.model.add_language))")


def _run_cli(*args, job=_PRINT_JOB):
    """`job` (python -c source running cli.run) with command-line `args`."""
    return subprocess.run([sys.executable, "-c", job, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_command_line_overrides_reach_the_job():
    result = _run_cli("--config=configs/stablerep.py:tiny", "--config.optim.blr=0.5",
                      "--config.data.train_files=/x/*.tfrecord", "--config.data.downsample=True")
    assert result.returncode == 0, result.stderr
    assert "BLR 0.5 FILES /x/*.tfrecord BN True TEXT False" in result.stdout


def test_false_on_the_command_line_turns_a_preset_flag_off():
    result = _run_cli("--config=configs/stablerep.py:vit_b16_cc12m_pp_1x",
                      "--config.model.add_language=False")
    assert result.returncode == 0, result.stderr
    assert "TEXT False" in result.stdout


@pytest.mark.parametrize("override,message", [
    ("--config.optim.bogus=1", "unknown config key 'optim.bogus'"),
    ("--config.nothere.x=1", "unknown config key 'nothere'"),
    ("--config.batch_size=abc", "config.batch_size=abc"),
    ("--config.data.n_img=2.5", "config.data.n_img=2.5"),
    # the colour stage runs only in the train step: its old switch is not a key
    ("--config.data.augment_on_device=False", "unknown config key 'data.augment_on_device'"),
])
def test_bad_override_fails_before_the_job_and_names_the_key(override, message):
    result = _run_cli("--config=configs/stablerep.py:tiny", override)
    assert result.returncode != 0
    assert message in result.stderr
    assert "BLR" not in result.stdout


_IMAGE_SIZE_JOB = ("from stablerep_jax import cli, train; "
                   "from stablerep_jax.data import augment; "
                   "from stablerep_jax.models.encoder import build_model; "
                   "cli.run(lambda c: train.check_image_size(c) or print('SIZES', "
                   "build_model(c.model).image_size, "
                   "augment.AugmentSpec.from_config(c.data).size))")


def test_one_image_size_override_sets_the_model_and_the_crop():
    """--config.model.image_size reaches the ViT and the input pipeline's crop size."""
    result = _run_cli("--config=configs/stablerep.py:tiny", "--config.model.image_size=48",
                      job=_IMAGE_SIZE_JOB)
    assert result.returncode == 0, result.stderr
    assert "SIZES 48 48" in result.stdout


def test_setting_data_image_size_names_model_image_size():
    result = _run_cli("--config=configs/stablerep.py:tiny", "--config.data.image_size=48",
                      job=_IMAGE_SIZE_JOB)
    assert result.returncode != 0
    assert "data.image_size=48 differs from model.image_size=32" in result.stderr
    assert "--config.model.image_size=48" in result.stderr
    assert "SIZES" not in result.stdout


@pytest.mark.parametrize("preset", _presets(STABLEREP))
def test_every_train_preset_has_one_image_size(preset):
    """data.image_size (read by the pipeline) follows model.image_size in every preset, also
    when the model's is changed in Python after loading."""
    from stablerep_jax import train
    c = _load(preset)
    train.check_image_size(c)
    c.model.image_size = 40
    assert c.data.image_size == 40
    train.check_image_size(c)
