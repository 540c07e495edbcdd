"""Model FLOPs of StableRep / StableRep++, counted from the model's shapes.

The MFU definition of PaLM (Chowdhery et al. 2022, appendix B): every matmul costs 2 m n k
FLOPs, attention included (Q K^T and the weighted sum of V, over the full L x L logits, causal
or not), elementwise work (norms, activations, softmax, the optimizer) is not counted, and a
training step costs 3 x its forward pass (the backward pass is two matmuls per forward one).
Recomputation (`model.remat`) and padding (`model.attention_pad_to`) are not useful work, so
they are not counted either: the count depends only on what the model computes.

Counted per forward pass:
  ViT       patch embedding (a matmul over the patches), per block: qkv, Q K^T, A V, proj,
            fc1, fc2 over L = patches + 1 tokens
  head      layer1, layer2, layer3 of the projection MLP, per image
  text      (StableRep++) per caption: the same per-block matmuls over context_length tokens
  projection (StableRep++) image and text projections into the joint space
  loss      the similarity logits: image x image, and image x text both ways (StableRep++)

XLA's own `cost_analysis()` agrees on CPUs (tests/test_flops.py: within 5%; it also counts the
elementwise work), but on GPUs it leaves out the cuBLAS/cuDNN custom calls, i.e. nearly all
of the work, so achieved FLOP/s and MFU come from here.
"""
from __future__ import annotations

from typing import Mapping

from stablerep_jax.chips import PUBLISHED_BF16_TFLOPS, published_peak_flops  # noqa: F401
from stablerep_jax.models.vit import VIT_VARIANTS

TRAIN_FACTOR = 3   # forward + backward (gradients of activations and of weights)

def matmul(m: int, k: int, n: int) -> int:
    """FLOPs of an [m, k] x [k, n] matmul."""
    return 2 * m * k * n


def transformer_block(tokens: int, width: int, mlp_hidden: int) -> int:
    """One pre-norm transformer block on `tokens` tokens: fused qkv, Q K^T and A V over all
    heads (heads x head_dim = width), output projection, and the MLP."""
    return (matmul(tokens, width, 3 * width)           # qkv
            + 2 * matmul(tokens, width, tokens)        # Q K^T and A V, all heads together
            + matmul(tokens, width, width)             # proj
            + matmul(tokens, width, mlp_hidden)        # fc1
            + matmul(tokens, mlp_hidden, width))       # fc2


def vit_forward(width: int, depth: int, patch_size: int, image_size: int,
                mlp_ratio: float = 4.0) -> int:
    """One image through the ViT (timm vit_*_patch16: CLS token, no head)."""
    patches = (image_size // patch_size) ** 2
    embed = matmul(patches, 3 * patch_size * patch_size, width)
    return embed + depth * transformer_block(patches + 1, width, int(width * mlp_ratio))


def head_forward(in_dim: int, mlp_dim: int, out_dim: int) -> int:
    """One row through the projection head (Linear -> BN -> ReLU -> Linear -> BN -> ReLU ->
    Linear)."""
    return matmul(1, in_dim, mlp_dim) + matmul(1, mlp_dim, mlp_dim) + matmul(1, mlp_dim, out_dim)


def text_forward(width: int, depth: int, context_length: int) -> int:
    """One caption through the StableRep++ text tower (token embedding is a lookup: 0)."""
    return depth * transformer_block(context_length, width, 4 * width)


def _get(config: Mapping, key: str, default):
    try:
        return config[key]
    except (KeyError, AttributeError):
        return default


def _shape(model_config: Mapping) -> dict:
    """The sizes `models.encoder.build_model` reads from the model config."""
    variant = model_config["variant"]
    if variant not in VIT_VARIANTS:
        raise ValueError(f"model.variant={variant!r}; choose one of {', '.join(VIT_VARIANTS)}")
    width, depth, _ = VIT_VARIANTS[variant]
    if int(_get(model_config, "depth", 0)) > 0:
        depth = int(model_config["depth"])
    return dict(width=width, depth=depth, patch_size=int(_get(model_config, "patch_size", 16)),
                image_size=int(model_config["image_size"]),
                mlp_dim=int(model_config["mlp_dim"]), emb_dim=int(model_config["emb_dim"]),
                add_language=bool(_get(model_config, "add_language", False)),
                text_width=int(_get(model_config, "text_width", 512)),
                text_depth=int(_get(model_config, "text_depth", 12)),
                context_length=int(_get(model_config, "context_length", 77)),
                vl_projection=str(_get(model_config, "vl_projection", "linear")),
                embed_dim=int(_get(model_config, "embed_dim", 512)))


def forward_flops(model_config: Mapping, captions: int, views: int,
                  loss: bool = True) -> dict[str, int]:
    """Forward FLOPs of one batch of `captions` captions x `views` images, by part: "vit",
    "head", "text", "projection", "loss" (the last three 0 where the model has none; "loss"
    also 0 when `loss` is False). `model_config` is the train config's `model` section or its
    dict form (what a checkpoint stores)."""
    s = _shape(model_config)
    images = captions * views
    parts = dict(vit=images * vit_forward(s["width"], s["depth"], s["patch_size"],
                                          s["image_size"]),
                 head=images * head_forward(s["width"], s["mlp_dim"], s["emb_dim"]),
                 text=0, projection=0, loss=0)
    if loss:
        parts["loss"] = matmul(images, s["emb_dim"], images)       # image-image similarities
    if not s["add_language"]:
        return parts
    parts["text"] = captions * text_forward(s["text_width"], s["text_depth"],
                                            s["context_length"])
    if s["vl_projection"] == "mlp":   # heads ending at the image head's width (emb_dim)
        joint = s["emb_dim"]
        parts["projection"] = (images * head_forward(s["width"], s["mlp_dim"], joint)
                               + captions * head_forward(s["text_width"], s["mlp_dim"], joint))
    else:
        joint = s["embed_dim"]
        parts["projection"] = (matmul(images, s["width"], joint)
                               + matmul(captions, s["text_width"], joint))
    if loss:   # image -> text and text -> image logits are two matmuls in losses.py
        parts["loss"] += 2 * matmul(images, joint, captions)
    return parts


def train_flops_per_step(model_config: Mapping, captions: int, views: int) -> float:
    """Model FLOPs of one training step (3 x forward) of `captions` x `views` images."""
    return float(TRAIN_FACTOR * sum(forward_flops(model_config, captions, views).values()))


def train_flops_per_image(model_config: Mapping, captions: int, views: int) -> float:
    """`train_flops_per_step` / images: the loss's share grows with the batch, the rest not."""
    return train_flops_per_step(model_config, captions, views) / (captions * views)


def utilisation(flops_per_step: float, seconds_per_step: float, chips: int,
                peak_flops_per_chip: float) -> dict:
    """Achieved model TFLOP/s per chip and, when `peak_flops_per_chip` > 0, MFU against it."""
    achieved = flops_per_step / seconds_per_step / max(chips, 1)
    return dict(tflops_per_sec_per_chip=achieved / 1e12,
                mfu=achieved / peak_flops_per_chip if peak_flops_per_chip > 0 else None)
