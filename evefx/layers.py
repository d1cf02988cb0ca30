"""Facts about a layer that several passes need, each computed in one place.

Example:
    >>> out_channels(nn.Linear(4, 2)), out_channels(nn.Conv2d(3, 8, 3)), out_channels(nn.ReLU())
    (2, 8, None)
    >>> channel_axis(nn.Linear(4, 2))
    -1
"""
from __future__ import annotations

from torch import nn

__all__ = ["out_channels", "channel_axis"]


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv layer, ``out_features`` of a linear one, ``None`` for other modules.

    Example:
        >>> out_channels(nn.Conv2d(3, 8, 3))
        8
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    return getattr(module, "out_channels", None)


def channel_axis(module: nn.Module) -> int | None:
    """The axis of a layer's output that holds its channels: 1 for a conv (``[N, C, ...]``), -1 for a
    Linear (``[..., C]``: tokens ``[B, N, C]`` and channels-last blocks ``[B, H, W, C]`` too), ``None``
    for other modules. Neurons, pruners and per-channel quantizers placed after the layer use it.

    Example:
        >>> channel_axis(nn.Conv2d(3, 8, 3)), channel_axis(nn.Linear(4, 2)), channel_axis(nn.ReLU())
        (1, -1, None)
    """
    if isinstance(module, nn.Linear):
        return -1
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1
    return None
