"""program_flops: matmul + convolution FLOPs from a jaxpr, the count behind every utilisation
figure on GPUs (whose XLA cost analysis leaves cuBLAS/cuDNN calls out)."""
import jax
import jax.numpy as jnp
import pytest

from stablerep_jax.program_flops import count_flops

F32 = jnp.float32


def test_matmuls_convolutions_and_loops_are_counted_exactly():
    def program(x, w, images):
        y = jnp.einsum("bij,bjk->bik", x, w)                       # batched matmul
        z = jax.lax.conv_general_dilated(images, jnp.ones((3, 3, 4, 8)), (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        grouped = jax.lax.conv_general_dilated(
            images, jnp.ones((1, 1, 2, 6)), (2, 2), "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
        looped = jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ jnp.ones((16, 16))),
                                   jnp.ones((2, 16)))
        return y, z, grouped, jax.jit(lambda a: a @ a.T)(looped)    # a nested jit
    x = jax.ShapeDtypeStruct((3, 8, 16), F32)
    w = jax.ShapeDtypeStruct((3, 16, 32), F32)
    images = jax.ShapeDtypeStruct((2, 10, 10, 4), F32)
    expected = (2 * 3 * 8 * 16 * 32                 # einsum
                + 2 * (2 * 10 * 10 * 8) * (3 * 3 * 4)   # 3x3 conv, 4 -> 8 channels
                + 2 * (2 * 5 * 5 * 6) * 2               # 1x1 grouped conv: 2 inputs per output
                + 5 * 2 * 2 * 16 * 16                   # 5 loop trips
                + 2 * 2 * 16 * 2)                       # looped @ looped.T
    assert count_flops(program, x, w, images) == expected


def test_a_while_loop_without_a_static_trip_count_is_refused():
    def program(x):
        return jax.lax.while_loop(lambda c: c.sum() < 10, lambda c: c @ c, x)
    with pytest.raises(ValueError, match="trip count"):
        count_flops(program, jax.ShapeDtypeStruct((4, 4), F32))


@pytest.mark.torch
def test_the_sampler_count_agrees_with_xla_cpu_and_scales_with_steps(tmp_path):
    """XLA's CPU cost analysis counts every dot and convolution (plus elementwise work) but a
    loop body once: at 1 step the two agree within 5%; each further step adds one guided UNet
    call pair exactly."""
    from tiny_sd import write_tiny_sd

    from stablerep_jax.generation import sampler as sampler_lib
    model = write_tiny_sd(str(tmp_path / "sd"))
    counts = {}
    for steps in (1, 3):
        settings = sampler_lib.SamplingSettings(num_inference_steps=steps, resolution=32,
                                                dtype="float32")
        sampler = sampler_lib.make_sampler(model, settings, devices=jax.local_devices()[:1])
        counts[steps] = sampler.flops_per_image()
        if steps == 1:
            sampler.compile()
            xla = sampler._compiled.cost_analysis()["flops"]
            assert abs(counts[1] - xla) / xla < 0.05, (counts[1], xla)
    unet_pair = (counts[3] - counts[1]) / 2
    assert unet_pair > 0.5 * counts[1]            # the UNet dominates an image's FLOPs
    assert counts[3] == counts[1] + 2 * unet_pair
