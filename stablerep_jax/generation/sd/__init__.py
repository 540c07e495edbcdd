"""Stable Diffusion components in our own Flax code, loading diffusers' PyTorch weights."""
