"""Plain PyTorch models used by the examples, tests and benchmarks. Nothing evefx-specific here."""
from __future__ import annotations

from torch import nn

__all__ = ["DemoNet"]


class DemoNet(nn.Module):
    """The 3-conv MNIST network of the seed tutorials (about 6k parameters): convs of 4, 8 and 16
    channels, a hidden Linear of 16. ``width`` multiplies every one of them (``width=2``: 8/16/32
    and 32, about 23k parameters), the same layers otherwise.

    Example:
        >>> DemoNet()(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: int = 1):
        super().__init__()
        c1, c2, c3 = 4 * width, 8 * width, 16 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * c3, 16 * width),  # 4 x 4 positions after three stride-2 convs of 28 x 28
            nn.ReLU(),
            nn.Linear(16 * width, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
