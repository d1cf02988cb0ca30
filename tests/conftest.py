"""Shared fixtures: small deterministic models and inputs."""
from __future__ import annotations

import pytest
import torch

from examples.models import DemoNet


@pytest.fixture
def demo_net() -> DemoNet:
    torch.manual_seed(0)
    return DemoNet().eval()


@pytest.fixture
def mnist_batch() -> torch.Tensor:
    return torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
