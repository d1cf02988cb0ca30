"""Prune 50% (l1, one shot) of transformer and channels-last models at channel and head granularity,
compact, and check the compacted model against the masked one; params and MACs before and after.

    python bench/prune_transformers.py                      # every model, both granularities
    python bench/prune_transformers.py vit,encoder head     # some models, one granularity

MACs are those of the conv and Linear calls in the graph (per sample): attention inside a layer evefx
keeps opaque (nn.MultiheadAttention, nn.TransformerEncoder, Swin's attention function) is not counted.
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


MODELS = {
    "convnext_tiny": (torchvision.models.convnext_tiny, (3, 64, 64)),
    "swin_t": (torchvision.models.swin_t, (3, 64, 64)),
    "vit": (lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4,
                                                          hidden_dim=128, mlp_dim=256), (3, 32, 32)),
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
