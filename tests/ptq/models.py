"""Small deterministic models for the post-training tests."""
from __future__ import annotations

import torch
from torch import nn

import evefx

SHAPE = (1, 1, 8, 8)


class Tiny(nn.Module):
    """conv -> BN -> ReLU -> depthwise conv -> ReLU -> pool -> flatten -> linear -> ReLU -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16, 12)
        self.relu3 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        x = self.flatten(self.pool(x))
        return self.fc2(self.drop(self.relu3(self.fc1(x))))


def tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    m = Tiny()
    with torch.no_grad():  # give BN non-trivial statistics and the channels unequal ranges
        m.bn1.running_mean.copy_(torch.tensor([0.1, -0.2, 0.05, 0.0]))
        m.bn1.running_var.copy_(torch.tensor([0.5, 2.0, 1.0, 0.25]))
        m.bn1.weight.copy_(torch.tensor([1.0, 8.0, 0.2, 3.0]))
        m.conv2.weight.mul_(torch.tensor([0.05, 4.0, 1.0, 0.3]).reshape(4, 1, 1, 1))
    return m.eval()


def batches(n: int = 4, size: int = 16, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *SHAPE[1:], generator=gen) for _ in range(n)]


def transformed(model: nn.Module, **section) -> evefx.EveModule:
    return evefx.transform(model, {"passes": [{"kind": "quantize", **section}]}, torch.zeros(SHAPE))
