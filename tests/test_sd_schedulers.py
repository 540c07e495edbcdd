"""Our JAX SD schedulers against diffusers' PyTorch ones: same timesteps, same final sample
(float32, 1e-5 relative) over a whole loop run in `lax.fori_loop` under `jit`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stablerep_jax.generation.sd.schedulers import make_scheduler

# Stable Diffusion v1.5's scheduler/scheduler_config.json.
SD15 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}
# diffusers' DPM-Solver calls np.array on a tensor in a way numpy 2 warns about.
QUIET = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TORCH_CLASSES = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
                 "dpm-solver": "DPMSolverMultistepScheduler"}


def fake_model(xp, sample, t):
    """A deterministic stand-in for the UNet that depends on both the sample and t."""
    return 0.5 * sample * xp.cos(t / 300.0) + 0.1 * xp.sin(t / 100.0)


def initial_sample():
    return np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)


@jax.jit
def run_jax(scheduler, x):
    """The sampler's loop: the scheduler is a jit argument and `i` a traced loop index."""
    def body(i, carry):
        x, state = carry
        t = scheduler.timesteps[i].astype(jnp.float32)
        return scheduler.step(state, i, fake_model(jnp, scheduler.scale_model_input(x, i), t), x)

    x = x * scheduler.init_noise_sigma
    return jax.lax.fori_loop(0, scheduler.num_steps, body, (x, scheduler.init_state(x)))[0]


def run_torch(name, config, steps, x):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    scheduler = getattr(diffusers, TORCH_CLASSES[name]).from_config(
        dict(config, steps_offset=1, clip_sample=False))
    scheduler.set_timesteps(steps)
    sample = torch.from_numpy(x) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = fake_model(torch, scheduler.scale_model_input(sample, t), t.float())
        sample = scheduler.step(out, t, sample).prev_sample
    return scheduler.timesteps.numpy(), sample.numpy()


def check_parity(name, config, steps):
    x = initial_sample()
    ours = make_scheduler(name, config, steps)
    timesteps, expected = run_torch(name, config, steps, x)
    np.testing.assert_array_equal(ours.timesteps, timesteps)
    assert ours.num_steps == len(timesteps)
    got = np.asarray(run_jax(ours, jnp.asarray(x)))
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error < 1e-5, (name, steps, error)


@pytest.mark.torch
@QUIET
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 3, 25, 50])
@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm-solver"])
def test_matches_diffusers(name, steps, prediction):
    check_parity(name, dict(SD15, prediction_type=prediction), steps)


@pytest.mark.torch
@QUIET
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm-solver"])
def test_timestep_spacings_match_diffusers(name, spacing):
    # SD 2.x configs name a spacing; a config read back from a loaded diffusers scheduler
    # always does (DPM-Solver's own default is linspace, the others' leading).
    check_parity(name, dict(SD15, timestep_spacing=spacing), 20)


@pytest.mark.torch
@QUIET
@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_final_sigma_min_matches_diffusers(steps):
    # With a nonzero final sigma the last step is second order from 15 steps on.
    check_parity("dpm-solver", dict(SD15, final_sigmas_type="sigma_min"), steps)


def test_pndm_takes_one_extra_model_call():
    scheduler = make_scheduler("pndm", SD15, 4)
    assert scheduler.num_steps == 5
    assert list(scheduler.timesteps) == [751, 501, 501, 251, 1]
    assert make_scheduler("pndm", SD15, 1).num_steps == 1
    assert make_scheduler("ddim", SD15, 4).num_steps == 4


@pytest.mark.parametrize("name", ["ddim", "pndm", "dpm-solver"])
def test_step_with_traced_index_is_jit_stable(name):
    """One compiled step serves every index (nothing depends on `i` at trace time)."""
    scheduler = make_scheduler(name, SD15, 5)
    x = jnp.asarray(initial_sample())
    step = jax.jit(scheduler.step)
    state = scheduler.init_state(x)
    for i in range(scheduler.num_steps):
        x, state = step(state, jnp.int32(i), 0.1 * x, x)
    assert step._cache_size() == 1
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("name, config, steps, match", [
    ("euler", SD15, 10, "'euler'"),
    ("ddim", dict(SD15, beta_schedule="squaredcos_cap_v2"), 10, "beta_schedule"),
    ("ddim", dict(SD15, prediction_type="sample"), 10, "prediction_type"),
    ("ddim", dict(SD15, timestep_spacing="karras"), 10, "timestep_spacing"),
    ("ddim", SD15, 0, "num_inference_steps"),
    ("ddim", SD15, 1000, "num_inference_steps"),   # t = 1000 with the offset
    ("pndm", dict(SD15, skip_prk_steps=False), 10, "skip_prk_steps"),
    ("dpm-solver", dict(SD15, solver_order=3), 10, "solver_order"),
    ("dpm-solver", dict(SD15, algorithm_type="sde-dpmsolver++"), 10, "algorithm_type"),
    ("dpm-solver", dict(SD15, use_karras_sigmas=True), 10, "use_karras_sigmas"),
])
def test_unsupported_choices_raise(name, config, steps, match):
    with pytest.raises(ValueError, match=match):
        make_scheduler(name, config, steps)
