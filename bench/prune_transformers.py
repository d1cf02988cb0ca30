"""Prune 50% (l1, one shot) of transformer and channels-last models at channel and head granularity,
compact, and check the compacted model against the masked one; params and MACs before and after.

    python bench/prune_transformers.py                      # every model, both granularities
    python bench/prune_transformers.py vit,encoder head     # some models, one granularity

``vit`` is torchvision's VisionTransformer (nn.MultiheadAttention: heads opaque); ``vit_explicit`` the
same configuration on an explicit attention whose heads prune. MACs are those of the conv and Linear
calls in the graph (per sample; attention's matmuls are not counted, nor attention inside a layer evefx
keeps opaque: nn.MultiheadAttention, nn.TransformerEncoder, Swin's attention function).
Untrained weights (torchvision architectures without weights); the check is allclose on random inputs.
"""
from __future__ import annotations

import logging
import platform
import sys
import time

import torch
import torchvision
from torch import nn

import evefx
from evefx.channels import compact_report


class Encoder(nn.Module):
    """A model on nn.TransformerEncoder: embedding, 2 layers (d_model 64, 4 heads, feed-forward 128), mean, classifier."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 64)
        layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


class Attention(nn.Module):
    """Explicit attention (q/k/v/out Linear, reshape to heads, matmul, softmax, matmul): heads prunable."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads, self.head_dim, self.scale = heads, dim // heads, (dim // heads) ** -0.5
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        q, k, v = (p(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class ExplicitViT(nn.Module):
    """The small ViT's configuration (image 32, patch 4, 4 layers, 4 heads, dim 128, MLP 256) on :class:`Attention`."""

    def __init__(self, dim: int = 128, heads: int = 4, layers: int = 4, mlp: int = 256):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 65, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(2 * layers + 1))
        self.attns = nn.ModuleList(Attention(dim, heads) for _ in range(layers))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim)) for _ in range(layers))
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for i, (attn, mlp) in enumerate(zip(self.attns, self.mlps)):
            x = x + attn(self.norms[2 * i](x))
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.norms[-1](x)[:, 0])


MODELS = {
    "convnext_tiny": (torchvision.models.convnext_tiny, (3, 64, 64)),
    "swin_t": (torchvision.models.swin_t, (3, 64, 64)),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                          hidden_dim=128, mlp_dim=256), (3, 32, 32)),
    "vit_explicit": (ExplicitViT, (3, 32, 32)),
    "encoder": (Encoder, (8, 16)),
    "maxvit_t": (torchvision.models.maxvit_t, (3, 224, 224)),
}


def run(name: str, granularity: str) -> str:
    make, shape = MODELS[name]
    torch.manual_seed(0)
    x = torch.randn(1, *shape)
    start = time.perf_counter()
    gm = evefx.transform(make().eval(), {"passes": [{"kind": "prune", "ratio": 0.5, "granularity": granularity}]}, x)
    evefx.prune_step(gm)
    small = evefx.compact(gm.eval(), x)  # raises if the compacted model differs from the masked one
    xs = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        err = float((small(xs) - gm(xs)).abs().max())
    r = compact_report(small)
    return (f"| {name} | {granularity} | {r.params_before:,} -> {r.params_after:,} ({r.params_ratio:.2f}x) | "
            f"{r.macs_before:,} -> {r.macs_after:,} ({r.macs_ratio:.2f}x) | {err:.1e} | {time.perf_counter() - start:.0f} s |")


def main() -> None:
    logging.getLogger("evefx").setLevel(logging.ERROR)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(MODELS)
    granularities = [sys.argv[2]] if len(sys.argv) > 2 else ["channel", "head"]
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| model | granularity | params | MACs | max abs diff compact vs masked | time |")
    print("|---|---|---|---|---|---|")
    for name in names:
        for g in granularities:
            print(run(name, g), flush=True)


if __name__ == "__main__":
    main()
