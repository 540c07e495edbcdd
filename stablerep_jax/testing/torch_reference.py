"""The reference PyTorch math and modules of StableRep, written for this project (never copied),
for parity tests and benchmarks; never used in training. Needs the `torch` extra.

Mirrors, with the reference repository's layout and state-dict key names: `MultiPosConLoss` /
`MultiPosConLossMM` at world size 1, the `image_mlp` projection head (`layer1`, `bn1`, ...) run
per view group, and StableRep++'s CLIP-style text path. Also the helpers parity tests need to
give modules non-trivial weights and read them as numpy.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(p: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return -(p * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def multi_pos_loss(feats: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    feats = F.normalize(feats, dim=-1, p=2)
    n = feats.shape[0]
    mask = torch.eq(labels.view(-1, 1), labels.view(1, -1)).to(feats.dtype)
    logits_mask = torch.scatter(torch.ones_like(mask), 1,
                                torch.arange(n, device=feats.device).view(-1, 1), 0)
    mask = mask * logits_mask
    logits = feats @ feats.T / temperature
    logits = logits - (1 - logits_mask) * 1e9
    logits = logits - logits.max(dim=-1, keepdim=True)[0].detach()
    p = mask / mask.sum(1, keepdim=True).clamp(min=1.0)
    return soft_cross_entropy(p, logits)


def image_text_loss(image_feats, image_emb, text_emb, v_labels, t_labels, logit_scale,
                    temperature, w1, w2) -> dict:
    img_loss = multi_pos_loss(image_feats, v_labels, temperature)
    v = F.normalize(image_emb, dim=-1, p=2)
    t = F.normalize(text_emb, dim=-1, p=2)
    logits_v = logit_scale * v @ t.T
    logits_t = logit_scale * t @ v.T
    v_mask = torch.eq(v_labels.view(-1, 1), t_labels.view(1, -1)).to(v.dtype)
    t_mask = torch.eq(t_labels.view(-1, 1), v_labels.view(1, -1)).to(v.dtype)
    p_v = v_mask / v_mask.sum(1, keepdim=True).clamp(min=1.0)
    p_t = t_mask / t_mask.sum(1, keepdim=True).clamp(min=1.0)
    img_txt = (soft_cross_entropy(p_v, logits_v) + soft_cross_entropy(p_t, logits_t)) / 2
    return {"loss": w1 * img_loss + w2 * img_txt, "image_loss": img_loss, "img_txt_loss": img_txt}


def projection_head(in_dim: int, mlp_dim: int, out_dim: int) -> nn.Sequential:
    """The reference `image_mlp` with its key names (BatchNorm1d: one process, so SyncBatchNorm
    is the same)."""
    return nn.Sequential(OrderedDict([
        ("layer1", nn.Linear(in_dim, mlp_dim)), ("bn1", nn.BatchNorm1d(mlp_dim)),
        ("relu1", nn.ReLU(inplace=True)),
        ("layer2", nn.Linear(mlp_dim, mlp_dim)), ("bn2", nn.BatchNorm1d(mlp_dim)),
        ("relu2", nn.ReLU(inplace=True)),
        ("layer3", nn.Linear(mlp_dim, out_dim)),
    ]))




class VisionEncoder(nn.Module):
    """timm ViT + head; each view group goes through the head separately, as in the reference."""

    def __init__(self, visual: nn.Module, width: int, mlp_dim: int, emb_dim: int):
        super().__init__()
        self.visual = visual
        self.image_mlp = projection_head(width, mlp_dim, emb_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, V, 3, H, W] -> feats [V*B, emb] (view-major)."""
        b, v = images.shape[:2]
        flat = images.transpose(0, 1).reshape(v * b, *images.shape[2:])
        feats = torch.split(self.visual(flat), b, dim=0)
        return torch.cat([self.image_mlp(f) for f in feats], dim=0)


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The reference's `add_weight_decay`: no decay on 1-D params and biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mask: torch.Tensor):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, x):                      # x: [L, N, D], as CLIP
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=self.attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class TextEncoder(nn.Module):
    """The text path of the reference `VisionTextEncoder` (keys at the top level, as there)."""

    def __init__(self, vocab: int, context: int, width: int, depth: int, heads: int):
        super().__init__()
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(context, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[ResidualAttentionBlock(width, heads, mask) for _ in range(depth)])
        self.ln_final = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)]


def randomize_(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Perturbs every parameter and BN buffer so biases, norms and running stats are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.5 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return module


def state_dict_numpy(module: nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
    # Copies: .numpy() shares memory, and torch updates BN buffers in place.
    return {prefix + k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}
