"""The compiled training step without TensorFlow: state, loss, optimizer update, shardings.

`train` (the job: tf.data input, checkpoints, logging) builds its step here, and so do the
benchmarks, which therefore run on a machine without TensorFlow: nothing this module imports
reaches TensorFlow (tests/test_no_tensorflow.py runs a step and a checkpoint with
`import tensorflow` failing). The step takes the batch the input pipeline yields: finished views,
or uint8 views plus their colour parameters, which `device_augment` finishes inside the step.

  parts = build_training(config, parallel.make_mesh(), total_steps, steps_per_epoch)
  state = parts.init(jax.random.PRNGKey(config.seed))
  state, metrics = parts.step_fn(state, parallel.global_batch(mesh, host_batch))

Model FLOPs of a step come from the model's shapes (`model_flops_per_step`, see `flops`), not
from XLA's cost analysis, which leaves out the cuBLAS/cuDNN custom calls on GPUs.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from stablerep_jax import flops, losses, optim, parallel
from stablerep_jax.data import device_augment
from stablerep_jax.models.encoder import build_model


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


def views_per_caption(config) -> int:
    return config.data.n_img * config.data.num_crop


def init_variables(model, config, rng) -> dict:
    """The model's freshly initialised variables ({"params", "batch_stats"}) for this config."""
    size = config.model.image_size
    images = jnp.zeros((2, views_per_caption(config), size, size, 3), jnp.float32)
    tokens = (jnp.zeros((2, config.model.context_length), jnp.int32)
              if config.model.add_language else None)
    return model.init(rng, images, tokens, train=False)


def make_init_fn(model, tx, config):
    def init(rng):
        variables = init_variables(model, config, rng)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          batch_stats=variables.get("batch_stats", {}),
                          opt_state=tx.init(params))
    return init


def state_shardings(mesh, abstract_state: TrainState) -> TrainState:
    """Params and BN statistics replicated; optimizer moments sharded over `data` (ZeRO-1)."""
    rep = parallel.replicated(mesh)
    return TrainState(
        step=rep,
        params=jax.tree_util.tree_map(lambda _: rep, abstract_state.params),
        batch_stats=jax.tree_util.tree_map(lambda _: rep, abstract_state.batch_stats),
        opt_state=parallel.tree_zero1_shardings(mesh, abstract_state.opt_state),
    )


def make_loss_fn(model, config):
    """`loss_fn(params, batch_stats, batch, temperature) -> (loss, (parts, new_batch_stats))`."""
    n_views = views_per_caption(config)

    def loss_fn(params, batch_stats, batch: dict, temperature):
        # The encoder lays features out view-major: view 0 of every caption, then view 1, ...
        image_labels = jnp.tile(batch["labels"], n_views)
        out, mutated = model.apply({"params": params, "batch_stats": batch_stats},
                                   device_augment.model_images(batch, config.data),
                                   batch.get("tokens"), train=True,
                                   mutable=["batch_stats"])
        if config.model.add_language:
            parts = losses.multi_positive_image_text_loss(
                out["feats"], out["image_emb"], out["text_emb"], image_labels, batch["labels"],
                out["logit_scale"], temperature, config.loss.w1, config.loss.w2)
            parts["logit_scale"] = out["logit_scale"]
        else:
            parts = {"loss": losses.multi_positive_contrastive_loss(
                out["feats"], image_labels, temperature)}
        return parts["loss"], (parts, mutated["batch_stats"])

    return loss_fn


def make_train_step(model, tx, schedule, config, total_steps: int):
    """Returns the pure `train_step(state, batch) -> (state, metrics)` for jit."""
    loss_fn = make_loss_fn(model, config)
    log_scale_max = math.log(config.loss.logit_scale_max)

    def train_step(state: TrainState, batch: dict):
        temperature = optim.temperature_at(config, state.step, total_steps)
        (_, (parts, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch, temperature)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if config.model.add_language:
            params = {**params, "logit_scale": jnp.clip(params["logit_scale"], 0.0, log_scale_max)}
        metrics = {**parts, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   "temperature": jnp.asarray(temperature, jnp.float32)}
        return TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state), metrics

    return train_step


@jax.jit
def all_finite(tree) -> jax.Array:
    """One device-side reduction: are all floating-point leaves of `tree` finite?"""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def compiled_flops(compiled) -> float:
    """FLOPs XLA's cost analysis counts for one call of a compiled program (0 if unknown).

    A cross-check only: on GPUs it leaves out the cuBLAS/cuDNN custom calls (the matmuls and
    fused attention), so it undercounts a train step ~20x there. Rates and MFU use
    `model_flops_per_step`."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return 0.0
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def model_flops_per_step(config) -> float:
    """Model FLOPs of one training step of the global batch (forward + backward = 3 x forward,
    PaLM's MFU count: matmuls and attention, no remat recomputation), from `flops`."""
    return flops.train_flops_per_step(config.model, config.batch_size, views_per_caption(config))


@dataclasses.dataclass
class TrainingParts:
    """Everything a run compiles: model, schedule, sharded init and the jitted step."""
    model: Any
    schedule: optax.Schedule
    init: Any                     # rng -> TrainState, jitted with the state's shardings
    abstract_state: TrainState
    shardings: TrainState
    step_fn: Any                  # jitted (state, global batch) -> (state, metrics); donates state


def build_training(config, mesh, total_steps: int, steps_per_epoch: int) -> TrainingParts:
    model = build_model(config.model)
    schedule = optim.learning_rate_schedule(config, total_steps, steps_per_epoch)
    tx = optim.make_optimizer(config, schedule)
    # Initialise already sharded: abstract shapes -> shardings -> jit(init, out_shardings).
    init = make_init_fn(model, tx, config)
    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = state_shardings(mesh, abstract_state)
    step_fn = jax.jit(make_train_step(model, tx, schedule, config, total_steps),
                      in_shardings=(shardings, parallel.batch_sharded(mesh)),
                      out_shardings=(shardings, parallel.replicated(mesh)),
                      donate_argnums=(0,))
    return TrainingParts(model=model, schedule=schedule,
                         init=jax.jit(init, out_shardings=shardings),
                         abstract_state=abstract_state, shardings=shardings, step_fn=step_fn)
