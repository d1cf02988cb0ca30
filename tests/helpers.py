"""Helpers shared by core tests (kept out of conftest so they can be imported explicitly)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evefx import load_spec
from evefx.passes import Sequential
from evefx.pipeline import EveModule
from evefx.trace import propagate_shapes, trace
from tests.probe import ProbePass


def probe_model(model, section=None):
    """``model`` traced, shapes propagated, with a Probe after every conv/linear output block."""
    import copy

    gm = trace(copy.deepcopy(model), cls=EveModule)
    propagate_shapes(gm, (torch.zeros(1, 1, 28, 28),))
    spec_section = load_spec({"passes": [section or {"kind": "quantize"}]}).passes[0]
    gm = Sequential([ProbePass(spec_section, "passes[0]")])(gm).graph_module
    gm.recompile()
    return gm


class TokenClassifier(nn.Module):
    """Token ids and a padding mask in, class scores out (a text model's inputs)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, tokens, keep):
        h = F.relu(self.fc1(self.emb(tokens))) * keep.unsqueeze(-1)
        return self.fc2(h.sum(1) / keep.sum(1, keepdim=True))


class ColourNet(nn.Module):
    """A user's 3x32x32 classifier that needs a constructor argument (not an evefx example)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def colour_data(n: int = 120, classes: int = 3, seed: int = 0):
    """``(inputs, labels)``: 3x32x32 images whose class is the brightest colour channel (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = torch.rand(n, 3, 32, 32, generator=gen) * 0.5
    x[torch.arange(n), y] += 0.5
    return x, y


class TokenNet(nn.Module):
    """A user's classifier of token ids (integer inputs): embedding, mean over the sequence, two linears."""

    def __init__(self, vocab: int = 50, dim: int = 16, num_classes: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, num_classes)

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


class TokenMaskNet(TokenNet):
    """TokenNet with a second input: a padding mask (1 for tokens, 0 for padding) over which it averages."""

    def forward(self, ids, mask):
        pooled = (self.emb(ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.fc2(torch.relu(self.fc1(pooled)))


def token_data(n: int = 100, length: int = 12, vocab: int = 50, classes: int = 4, seed: int = 0):
    """``(ids, labels)``: int64 token ids whose class is the first token modulo ``classes``."""
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return ids, ids[:, 0] % classes


class ResidualDepthwiseNet(nn.Module):
    """A user's block: a residual add around a depthwise conv (its channels coupled to the conv before it)."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width)
        self.c2, self.b2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width)
        self.c3, self.b3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=2 * width), nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = x + F.hardswish(self.b3(self.c3(x)))
        return self.fc(x.mean((2, 3)))
