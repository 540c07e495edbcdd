"""Stable Diffusion sampling across the local devices, one compiled function per batch shape.

We load the diffusers Flax pipeline (`FlaxStableDiffusionPipeline.from_pretrained`) for its
modules and weights, but run our own sampling loop around them instead of the pipeline's
`jit=True` pmap: the pipeline draws every latent of a batch from one PRNG key, so an image
would depend on its batch position, the batch size and the device count. Here each image's
initial latent comes from its own key,

    key(image_seed, caption_id) = fold_in(PRNGKey(image_seed), caption_id)

(image k of a caption uses image_seed = seed + k), so what an image shows depends only on the
model, the caption, the sampling settings and (seed, caption_id, k), not on its batch, host or
resume point. Its pixels are bit-identical for the same batch shape (devices x per-device batch;
padding a partial batch changes nothing, and a resume with the same devices and batch rewrites the
same bytes). Another batch shape compiles to other kernels, so float rounding differs: measured on
a tiny SD (32px, 3 DDIM steps, 32 images, 8 devices x 1 image vs 1 x 4 and 2 x 3), float32 images
agree to within 1 level of 255 (4 of 98,304 values differ) and bfloat16 ones (the default) differ
in 39-51% of their values, by at most 7 levels (mean 0.48-0.65). `benchmarks/generate.py
--layouts` measures this; `tests/test_generate.py` holds looser bounds (README, generate).

One call samples `per_device_batch` images on every local device: params are replicated once,
token ids and seeds are sharded over a 1-D device mesh, and `shard_map` runs the per-device
program (text encoder, `lax.fori_loop` over scheduler steps with classifier-free guidance,
VAE decode, uint8 conversion), so a whole batch is one dispatch. This is what `jax.pmap` does,
written with the mesh API that JAX keeps developing.
"""
from __future__ import annotations

import dataclasses
import functools
import logging as std_logging
import os
import time
from collections.abc import Sequence

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from diffusers import FlaxStableDiffusionPipeline
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stablerep_jax.generation import captions as captions_lib

AXIS = "devices"
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
SCHEDULERS = ("ddim", "pndm", "dpm-solver")
MAX_SEED = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Everything besides the weights that decides what an image looks like."""
    num_inference_steps: int = 50
    guidance_scale: float = 2.0
    resolution: int = 512
    scheduler: str = "ddim"
    negative_prompt: str = ""
    dtype: str = "bfloat16"

    def check(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={self.scheduler!r}: choose one of {SCHEDULERS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: choose one of {tuple(DTYPES)}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps}: must be >= 1")
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution}: must be a positive multiple of 8")


def _scheduler_class(name: str):
    return {"ddim": diffusers.FlaxDDIMScheduler, "pndm": diffusers.FlaxPNDMScheduler,
            "dpm-solver": diffusers.FlaxDPMSolverMultistepScheduler}[name]


def check_model(model: str) -> None:
    """A clear error for a local model path that is missing or not a diffusers directory.

    Anything that does not look like a path (`org/name`) is left to the hub download."""
    if not model:
        raise ValueError("model is empty: set --config.model to a hub id or a local diffusers "
                         "directory")
    looks_local = (os.path.isabs(model) or model.startswith((".", "~"))
                   or model.count("/") != 1 or os.path.exists(model))
    if not looks_local:
        return
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model={model!r}: no such directory (give a local diffusers "
                                "directory or a hub id such as "
                                "stable-diffusion-v1-5/stable-diffusion-v1-5)")
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"model={model!r}: not a diffusers pipeline directory "
                                "(no model_index.json)")


@dataclasses.dataclass(frozen=True)
class SafetyChecker:
    """Stable Diffusion's safety checker as data: CLIP vision config, params, preprocessor."""
    vision_config: object
    params: dict
    feature_extractor: object


def make_scheduler(name: str, config):
    """The named Flax scheduler from a model's scheduler config, with the two fixes diffusers'
    PyTorch StableDiffusionPipeline applies to every SD scheduler (the reference generated its
    images with it): `steps_offset` 1 and no clipping of the predicted latent (DDIM's default
    clip to [-1, 1] is for pixel-space models; SD v1 configs that omit it would get it)."""
    config = dict(config)
    config["steps_offset"] = 1
    config["clip_sample"] = False
    return _scheduler_class(name).from_config(config)


def _model_folder(model: str, *parts: str) -> str:
    """A sub-folder of a local model directory or of the hub snapshot (cached, offline-safe)."""
    path = os.path.expanduser(model)
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(model, allow_patterns=[f"{p}/*" for p in parts])
    return os.path.join(path, parts[0])


def load_safety_checker(model: str) -> SafetyChecker:
    """The model's `safety_checker/` (Flax weights) and `feature_extractor/`.

    diffusers' Flax safety checker cannot even be constructed on current JAX (its init calls
    `jnp.clip(a_min=...)`), so we read its config and weights ourselves and apply the same
    rule in `nsfw_flags`."""
    import flax.serialization
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = _model_folder(model, "safety_checker", "feature_extractor")
    weights = os.path.join(folder, "flax_model.msgpack")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"safety_checker=True but model={model!r} has no Flax safety "
                                f"checker weights ({weights} is missing)")
    with open(weights, "rb") as f:
        params = flax.serialization.msgpack_restore(f.read())
    config = CLIPConfig.from_pretrained(folder)
    extractor = CLIPImageProcessor.from_pretrained(
        os.path.join(os.path.dirname(folder), "feature_extractor"))
    return SafetyChecker(config.vision_config, params, extractor)


def load_pipeline(model: str, settings: SamplingSettings, *, from_pt: bool = False,
                  split_head_dim: bool = False):
    """(pipeline, params) from a hub id or local diffusers directory, without its safety
    checker (see `load_safety_checker`), params cast to `settings.dtype` (diffusers' own
    to_bf16 uses the removed `jax.tree_map`), the scheduler swapped for `settings.scheduler`
    with a float32 state."""
    check_model(model)
    dtype = DTYPES[settings.dtype]
    # diffusers says it once per Flax class; our logs should carry our messages instead.
    std_logging.getLogger("diffusers").setLevel(std_logging.ERROR)
    try:
        pipeline, params = FlaxStableDiffusionPipeline.from_pretrained(
            os.path.expanduser(model), dtype=dtype, from_pt=from_pt,
            split_head_dim=split_head_dim, safety_checker=None, feature_extractor=None)
    except (OSError, ValueError, EnvironmentError) as e:
        raise OSError(f"model={model!r}: cannot load a Flax Stable Diffusion pipeline "
                      f"(from_pt={from_pt}): {e}") from e
    scheduler = make_scheduler(settings.scheduler, pipeline.scheduler.config)
    pipeline.scheduler = scheduler
    params = dict(params)
    params["scheduler"] = scheduler.create_state()

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    for name in ("unet", "vae", "text_encoder"):
        params[name] = jax.tree_util.tree_map(cast, params[name])
    return pipeline, params


def nsfw_flags(vision_config, params, pixel_values):
    """bool [n]: Stable Diffusion's safety-checker rule on CLIP image embeddings (cosine to 17
    concept and 3 special-care embeddings above their thresholds; special care lowers the
    concept thresholds by 0.01). diffusers' Flax checker computes the same but calls
    `jnp.clip(a_min=...)`, which current JAX rejects, so the rule is evaluated here on its
    params. `pixel_values` float [n, 3, H, W] from the pipeline's feature extractor."""
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionModule

    x = jnp.transpose(jnp.asarray(pixel_values, jnp.float32), (0, 2, 3, 1))
    pooled = FlaxCLIPVisionModule(vision_config).apply({"params": params["vision_model"]}, x)[1]
    embeds = pooled @ params["visual_projection"]["kernel"]

    def cosine(a, b):
        a = a / jnp.maximum(jnp.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        b = b / jnp.maximum(jnp.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return a @ b.T

    special = jnp.round(cosine(embeds, params["special_care_embeds"])
                        - params["special_care_embeds_weights"][None, :], 3)
    adjustment = jnp.any(special > 0, axis=1, keepdims=True) * 0.01
    concept = jnp.round(cosine(embeds, params["concept_embeds"])
                        - params["concept_embeds_weights"][None, :] + adjustment, 3)
    return jnp.any(concept > 0, axis=1)


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The per-image seeds of a caption's K images (stored in the records' `seeds`)."""
    return [seed + k for k in range(num_images)]


def initial_latent(image_seed, caption_id, shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of one image: float32 N(0, 1) from fold_in(PRNGKey(seed), caption)."""
    key = jax.random.fold_in(jax.random.PRNGKey(image_seed), caption_id)
    return jax.random.normal(key, shape, jnp.float32)


def _device_program(pipeline, settings: SamplingSettings, latent_shape: tuple[int, int, int]):
    """The per-device sampling function: (params, ids [b, L], uncond ids [L], image seeds [b],
    caption ids [b]) -> uint8 images [b, H, W, 3]."""
    text_encoder, unet, vae, scheduler = (pipeline.text_encoder, pipeline.unet, pipeline.vae,
                                          pipeline.scheduler)
    guided = settings.guidance_scale != 1.0
    steps = settings.num_inference_steps

    def program(params, prompt_ids, uncond_ids, seeds, caption_ids):
        cond = text_encoder(prompt_ids, params=params["text_encoder"])[0]
        if guided:   # one UNet call on [uncond; cond], as the pipeline does
            uncond = text_encoder(uncond_ids[None], params=params["text_encoder"])[0]
            context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
        else:
            context = cond

        latents = jax.vmap(functools.partial(initial_latent, shape=latent_shape))(seeds,
                                                                                caption_ids)
        state = scheduler.set_timesteps(params["scheduler"], num_inference_steps=steps,
                                        shape=latents.shape)
        latents = latents * state.init_noise_sigma

        def body(step, carry):
            latents, state = carry
            t = jnp.asarray(state.timesteps, jnp.int32)[step]
            x = jnp.concatenate([latents] * 2) if guided else latents
            x = scheduler.scale_model_input(state, x, t)
            noise = unet.apply({"params": params["unet"]}, x,
                               jnp.broadcast_to(t, (x.shape[0],)),
                               encoder_hidden_states=context).sample.astype(jnp.float32)
            if guided:
                uncond_noise, cond_noise = jnp.split(noise, 2)
                noise = uncond_noise + settings.guidance_scale * (cond_noise - uncond_noise)
            latents, state = scheduler.step(state, noise, t, latents).to_tuple()
            return latents, state

        latents, _ = jax.lax.fori_loop(0, steps, body, (latents, state))
        latents = latents / vae.config.scaling_factor
        images = vae.apply({"params": params["vae"]}, latents.astype(vae.dtype),
                           method=vae.decode).sample
        images = (images.astype(jnp.float32) / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1)
        return jnp.round(images * 255).astype(jnp.uint8)

    return program


class Sampler:
    """Samples `batch_size = per_device_batch x devices` images per call, compiled once.

    `sample(prompt_ids, seeds, caption_ids)` accepts up to `batch_size` rows and pads the rest
    with copies of the last row (each image is computed independently, so padding changes no
    image); `dispatch` is the asynchronous form for keeping the devices busy.
    """

    def __init__(self, pipeline, params, settings: SamplingSettings, *,
                 devices: Sequence | None = None, per_device_batch: int = 1,
                 safety_checker: SafetyChecker | None = None):
        settings.check()
        if per_device_batch < 1:
            raise ValueError(f"per_device_batch={per_device_batch}: must be >= 1")
        self.pipeline = pipeline
        self.model: str | None = None     # set by make_sampler: where the weights came from
        self.settings = settings
        self.devices = list(devices if devices is not None else jax.local_devices())
        self.per_device_batch = per_device_batch
        self.batch_size = per_device_batch * len(self.devices)
        self.tokenizer = pipeline.tokenizer
        self.max_length = int(self.tokenizer.model_max_length)
        factor = pipeline.vae_scale_factor
        if settings.resolution % factor:
            raise ValueError(f"resolution={settings.resolution}: must be a multiple of the VAE "
                             f"scale factor {factor}")
        latent = settings.resolution // factor
        unet_factor = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
        if latent % unet_factor:
            raise ValueError(f"resolution={settings.resolution}: the latent size {latent} must be "
                             f"a multiple of {unet_factor} for this UNet; use a multiple of "
                             f"{factor * unet_factor}")
        self.latent_shape = (pipeline.unet.config.in_channels, latent, latent)
        self.image_shape = (settings.resolution, settings.resolution, 3)

        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(AXIS))
        self.safety_checker = safety_checker
        self._safety_fn = None
        self.params = jax.device_put(params, self._replicated)
        uncond_ids, _ = captions_lib.tokenize(self.tokenizer, [settings.negative_prompt])
        self._uncond_ids = jax.device_put(uncond_ids[0], self._replicated)
        program = jax.shard_map(
            _device_program(pipeline, settings, self.latent_shape), mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(), P(AXIS), P(AXIS)), out_specs=P(AXIS),
            # No collectives here; the schedulers' zero-initialised states would otherwise need
            # per-field `pcast`s to enter the loop as per-device ("varying") values.
            check_vma=False)
        self._jitted = jax.jit(program)
        self._compiled = None
        self.compile_seconds = None

    def compile(self) -> float:
        """Compiles the batch program once (ahead of time); returns the seconds it took."""
        if self._compiled is None:
            start = time.perf_counter()
            n = self.batch_size
            abstract = (
                jax.ShapeDtypeStruct((n, self.max_length), jnp.int32, sharding=self._sharded),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self._sharded),
                jax.ShapeDtypeStruct((n,), jnp.int32, sharding=self._sharded))
            self._compiled = self._jitted.lower(self.params, abstract[0], self._uncond_ids,
                                                *abstract[1:]).compile()
            self.compile_seconds = time.perf_counter() - start
            logging.info("compiled the sampler for %d devices x %d images in %.1f s",
                         len(self.devices), self.per_device_batch, self.compile_seconds)
        return self.compile_seconds

    def unsafe(self, images: np.ndarray) -> np.ndarray:
        """bool [n]: the images the safety checker flags (all False without one)."""
        checker = self.safety_checker
        if checker is None or len(images) == 0:
            return np.zeros(len(images), bool)
        from PIL import Image
        if self._safety_fn is None:
            self._safety_fn = jax.jit(functools.partial(nsfw_flags, checker.vision_config))
        features = checker.feature_extractor(
            [Image.fromarray(im) for im in images], return_tensors="np").pixel_values
        return np.asarray(self._safety_fn(checker.params, features), bool)

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return captions_lib.tokenize(self.tokenizer, texts)

    def dispatch(self, prompt_ids: np.ndarray, seeds: Sequence[int],
                 caption_ids: Sequence[int]) -> tuple[jax.Array, int]:
        """Starts sampling up to `batch_size` images; returns (device array, valid rows)."""
        prompt_ids = np.asarray(prompt_ids, np.int32)
        seeds = np.asarray(seeds, np.int64)
        caption_ids = np.asarray(caption_ids, np.int64)
        n = len(prompt_ids)
        if not 0 < n <= self.batch_size or len(seeds) != n or len(caption_ids) != n:
            raise ValueError(f"dispatch: {n} prompts, {len(seeds)} seeds, {len(caption_ids)} "
                             f"caption ids for a batch of {self.batch_size}")
        if seeds.min() < 0 or seeds.max() > MAX_SEED or caption_ids.min() < 0 \
                or caption_ids.max() > MAX_SEED:
            raise ValueError(f"seeds and caption ids must lie in [0, {MAX_SEED}]")
        pad = self.batch_size - n
        if pad:
            prompt_ids = np.concatenate([prompt_ids, np.repeat(prompt_ids[-1:], pad, 0)])
            seeds = np.concatenate([seeds, np.repeat(seeds[-1:], pad)])
            caption_ids = np.concatenate([caption_ids, np.repeat(caption_ids[-1:], pad)])
        self.compile()
        args = [jax.device_put(x, self._sharded) for x in
                (prompt_ids, seeds.astype(np.int32), caption_ids.astype(np.int32))]
        return self._compiled(self.params, args[0], self._uncond_ids, args[1], args[2]), n

    def initial_latents(self, seeds: Sequence[int], caption_ids: Sequence[int]) -> np.ndarray:
        """float32 [n, C, h, w]: the noise the images of (seeds, caption_ids) start from."""
        return np.stack([np.asarray(initial_latent(s, c, self.latent_shape))
                         for s, c in zip(seeds, caption_ids)])

    def sample(self, prompt_ids: np.ndarray, seeds: Sequence[int],
               caption_ids: Sequence[int]) -> np.ndarray:
        """uint8 [n, H, W, 3] images for n <= batch_size rows (blocking)."""
        images, n = self.dispatch(prompt_ids, seeds, caption_ids)
        return np.asarray(images)[:n]


def make_sampler(model: str, settings: SamplingSettings, *, devices: Sequence | None = None,
                 per_device_batch: int = 1, from_pt: bool = False,
                 safety_checker: bool = False, split_head_dim: bool = False) -> Sampler:
    """Loads the model and builds a `Sampler` for it (compiled on first use)."""
    settings.check()
    checker = load_safety_checker(model) if safety_checker else None
    pipeline, params = load_pipeline(model, settings, from_pt=from_pt,
                                     split_head_dim=split_head_dim)
    sampler = Sampler(pipeline, params, settings, devices=devices,
                      per_device_batch=per_device_batch, safety_checker=checker)
    sampler.model = model
    return sampler
