"""Stable Diffusion sampling across the local devices, one compiled function per batch shape.

The model is our own Flax text encoder, UNet and VAE decoder (`generation/sd/`), loaded from a
diffusers pipeline folder's PyTorch weights, with our own schedulers. Each image's initial latent
comes from its own key (diffusers' pipelines draw a whole batch from one key, so an image would
depend on its batch position, the batch size and the device count),

    key(image_seed, caption_id) = fold_in(PRNGKey(image_seed), caption_id)

(image k of a caption uses image_seed = seed + k), so what an image shows depends only on the
model, the caption, the sampling settings and (seed, caption_id, k), not on its batch, host or
resume point. Its pixels are bit-identical for the same batch shape (devices x per-device batch;
padding a partial batch changes nothing, and a resume with the same devices and batch rewrites the
same bytes). Another batch shape compiles to other kernels, so float rounding differs: measured on
a tiny SD (32px, 3 DDIM steps, 32 images; 8 devices x 1 image against 1 x 4 and 2 x 3, our own
modules, 2026-12-04), float32 images agree to within 1 level of 255 (4 of 98,304 values differ)
and bfloat16 ones (the default) by at most 3 levels (1 x 4: 35% of values changed, mean 0.36;
2 x 3: identical). `benchmarks/generate.py --layouts` measures this; `tests/test_generate.py`
holds looser bounds.

One call samples `per_device_batch` images on every local device: params are replicated once,
token ids and seeds are sharded over a 1-D device mesh, and `shard_map` runs the per-device
program (text encoder, `lax.fori_loop` over scheduler steps with classifier-free guidance,
VAE decode, uint8 conversion), so a whole batch is one dispatch. This is what `jax.pmap` does,
written with the mesh API that JAX keeps developing.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from stablerep_jax import program_flops
from stablerep_jax.generation import captions as captions_lib
from stablerep_jax.generation.sd import model as sd_model, schedulers
from stablerep_jax.models import attention as attention_lib

AXIS = "devices"
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
SCHEDULERS = schedulers.NAMES
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


def image_seeds(seed: int, num_images: int) -> list[int]:
    """The per-image seeds of a caption's K images (stored in the records' `seeds`)."""
    return [seed + k for k in range(num_images)]


def initial_latent(image_seed, caption_id, shape: tuple[int, ...]) -> jax.Array:
    """The starting noise of one image: float32 N(0, 1) from fold_in(PRNGKey(seed), caption)."""
    key = jax.random.fold_in(jax.random.PRNGKey(image_seed), caption_id)
    return jax.random.normal(key, shape, jnp.float32)


def _device_program(sd: sd_model.StableDiffusion, settings: SamplingSettings,
                    latent_shape: tuple[int, int, int]):
    """The per-device sampling function: (params, ids [b, L], uncond ids [L], image seeds [b],
    caption ids [b]) -> uint8 images [b, H, W, 3]. Latents are NHWC inside (Flax convolutions);
    they are drawn CHW (`initial_latent`, the layout diffusers' pipelines take) and transposed
    once."""
    guided = settings.guidance_scale != 1.0
    scheduler = schedulers.make_scheduler(settings.scheduler, sd.scheduler_config,
                                          settings.num_inference_steps)

    def program(params, prompt_ids, uncond_ids, seeds, caption_ids):
        encode = functools.partial(sd.text_encoder.apply, {"params": params["text_encoder"]})
        cond = encode(prompt_ids)
        if guided:   # one UNet call on [uncond; cond], as diffusers' pipeline does
            uncond = encode(uncond_ids[None])
            context = jnp.concatenate([jnp.broadcast_to(uncond, cond.shape), cond])
        else:
            context = cond

        latents = jax.vmap(functools.partial(initial_latent, shape=latent_shape))(seeds,
                                                                                caption_ids)
        latents = latents.transpose(0, 2, 3, 1) * scheduler.init_noise_sigma
        state = scheduler.init_state(latents)

        def body(i, carry):
            latents, state = carry
            x = jnp.concatenate([latents] * 2) if guided else latents
            x = scheduler.scale_model_input(x, i)
            t = jnp.broadcast_to(jnp.asarray(scheduler.timesteps)[i], (x.shape[0],))
            noise = sd.unet.apply({"params": params["unet"]}, x.astype(sd.unet.dtype), t,
                                  context).astype(jnp.float32)
            if guided:
                uncond_noise, cond_noise = jnp.split(noise, 2)
                noise = uncond_noise + settings.guidance_scale * (cond_noise - uncond_noise)
            return scheduler.step(state, i, noise, latents)

        latents, _ = jax.lax.fori_loop(0, scheduler.num_steps, body, (latents, state))
        latents = latents / sd.scaling_factor
        images = sd.vae.apply({"params": params["vae"]}, latents.astype(sd.vae.dtype))
        images = (images.astype(jnp.float32) / 2 + 0.5).clip(0, 1)
        return jnp.round(images * 255).astype(jnp.uint8)

    return program


def flops_per_image(sd: sd_model.StableDiffusion, settings: SamplingSettings,
                    latent_shape: tuple[int, int, int]) -> int:
    """Matmul + convolution FLOPs of one image (text encoder, every guided UNet call, VAE
    decode), counted from the sampling program's jaxpr at batch 1 with XLA attention (the same
    math as cuDNN's kernel). XLA's GPU cost analysis leaves cuBLAS/cuDNN calls out, so this is
    the count utilisation is reported against."""
    xla = dataclasses.replace(sd, text_encoder=sd.text_encoder.clone(attention="xla"),
                              unet=sd.unet.clone(attention="xla"),
                              vae=sd.vae.clone(attention="xla"))
    program = _device_program(xla, settings, latent_shape)
    params = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), sd.params)
    length = int(sd.tokenizer.model_max_length)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    one = jax.ShapeDtypeStruct((1,), jnp.int32)
    return program_flops.count_flops(program, params, ids,
                                     jax.ShapeDtypeStruct((length,), jnp.int32), one, one)


class Sampler:
    """Samples `batch_size = per_device_batch x devices` images per call, compiled once.

    `sample(prompt_ids, seeds, caption_ids)` accepts up to `batch_size` rows and pads the rest
    with copies of the last row (each image is computed independently, so padding changes no
    image); `dispatch` is the asynchronous form for keeping the devices busy.
    """

    def __init__(self, sd: sd_model.StableDiffusion, settings: SamplingSettings, *,
                 devices: Sequence | None = None, per_device_batch: int = 1):
        settings.check()
        if per_device_batch < 1:
            raise ValueError(f"per_device_batch={per_device_batch}: must be >= 1")
        self.sd = sd
        self.model: str | None = None     # set by make_sampler: where the weights came from
        self.settings = settings
        self.devices = list(devices if devices is not None else jax.local_devices())
        self.per_device_batch = per_device_batch
        self.batch_size = per_device_batch * len(self.devices)
        self.tokenizer = sd.tokenizer
        self.max_length = int(self.tokenizer.model_max_length)
        factor = sd.vae_scale_factor
        if settings.resolution % factor:
            raise ValueError(f"resolution={settings.resolution}: must be a multiple of the VAE "
                             f"scale factor {factor}")
        latent = settings.resolution // factor
        if latent % sd.unet_scale_factor:
            raise ValueError(f"resolution={settings.resolution}: the latent size {latent} must be "
                             f"a multiple of {sd.unet_scale_factor} for this UNet; use a "
                             f"multiple of {factor * sd.unet_scale_factor}")
        self.latent_shape = (sd.latent_channels, latent, latent)
        self.image_shape = (settings.resolution, settings.resolution, 3)

        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self._replicated = NamedSharding(self.mesh, P())
        self._sharded = NamedSharding(self.mesh, P(AXIS))
        self.params = jax.device_put(sd.params, self._replicated)
        uncond_ids, _ = self.prompt_ids([settings.negative_prompt])
        self._uncond_ids = jax.device_put(uncond_ids[0], self._replicated)
        program = jax.shard_map(
            _device_program(sd, settings, self.latent_shape), mesh=self.mesh,
            in_specs=(P(), P(AXIS), P(), P(AXIS), P(AXIS)), out_specs=P(AXIS),
            # No collectives: every device samples its own images.
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

    def flops_per_image(self) -> int:
        return flops_per_image(self.sd, self.settings, self.latent_shape)

    def memory_analysis(self) -> dict:
        """XLA's memory analysis of the compiled batch program (bytes per device)."""
        self.compile()
        stats = self._compiled.memory_analysis()
        fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes")
        return {f: int(getattr(stats, f, 0) or 0) for f in fields} if stats else {}

    def prompt_ids(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """`captions.sd_prompt_ids` with this model's tokenizer: (ids, truncated mask)."""
        return captions_lib.sd_prompt_ids(self.tokenizer, texts)

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
                 per_device_batch: int = 1, attention: str = "auto") -> Sampler:
    """Loads the model (params in `settings.dtype`) and builds a `Sampler` for it (compiled on
    first use). `attention`: "auto" (the measured best for the devices' platform), "xla" or
    "cudnn" (NVIDIA GPUs; where cuDNN's limits allow, XLA elsewhere)."""
    settings.check()
    devices = list(devices if devices is not None else jax.local_devices())
    kind = attention_lib.resolve(attention, devices[0].platform)
    sd = sd_model.load(model, dtype=DTYPES[settings.dtype], attention=kind)
    sampler = Sampler(sd, settings, devices=devices, per_device_batch=per_device_batch)
    sampler.model = model
    sampler.attention = kind
    logging.info("loaded %s (%s, attention %s) for %d devices x %d images", model,
                 settings.dtype, kind, len(devices), per_device_batch)
    return sampler
