"""Facts about a layer that several passes need, each computed in one place.

Example:
    >>> out_channels(nn.Linear(4, 2)), out_channels(nn.Conv2d(3, 8, 3)), out_channels(nn.ReLU())
    (2, 8, None)
"""
from __future__ import annotations

from torch import nn

__all__ = ["out_channels"]


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv layer, ``out_features`` of a linear one, ``None`` for other modules.

    Example:
        >>> out_channels(nn.Conv2d(3, 8, 3))
        8
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    return getattr(module, "out_channels", None)
