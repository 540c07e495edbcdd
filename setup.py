"""stablerep-jax: StableRep (multi-positive contrastive learning on synthetic images) in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="stablerep_jax",
    version="0.1.0",
    description="StableRep / StableRep++ in JAX/Flax for Cloud TPU VMs and GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["stablerep_jax", "stablerep_jax.*"]),
    python_requires=">=3.10,<3.13",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.9",
        "ml_collections>=0.1.1",
        "absl-py",
        "numpy",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        "tensorboard",
        # Stable Diffusion runs on our own Flax modules (stablerep_jax/generation/sd), reading
        # the diffusers folders' safetensors; transformers only for CLIPTokenizer (kept in v5).
        "transformers>=4.40",
        "safetensors>=0.4",
        "huggingface_hub",
        "pillow",
        "matplotlib>=3.7",      # figures (demo/report.py), drawn on the Agg canvas
        "tqdm",
    ],
    extras_require={
        "tpu": ["jax[tpu]"],
        "cuda12": ["jax[cuda12]"],
        "torch": ["torch>=2.1"],
        # pytest-xdist >= 3.2 (worksteal): the README's test command runs three workers on two
        # cores (tests wait on subprocesses and compiles); tests load launch/*.yaml with sky.Task.
        # diffusers' PyTorch pipeline is the parity oracle of our Flax Stable Diffusion.
        "test": ["pytest>=7", "pytest-timeout", "pytest-xdist>=3.2", "torch>=2.1", "torchvision",
                 "timm>=0.9", "skypilot>=0.14", "diffusers>=0.30"],
    },
)
