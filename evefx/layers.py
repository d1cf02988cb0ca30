"""Facts about layers and inputs that several parts of evefx need, each computed in one place.

Example:
    >>> out_channels(nn.Linear(4, 2)), out_channels(nn.Conv2d(3, 8, 3)), out_channels(nn.ReLU())
    (2, 8, None)
    >>> channel_axis(nn.Linear(4, 2))
    -1
    >>> layer_macs(nn.Conv2d(3, 8, 3), (1, 8, 26, 26))  # 8 * 3 * 3 * 3 weights at 26 * 26 positions
    146016
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch import fx, nn

from evefx.errors import ShapeError

__all__ = [
    "out_channels", "in_channels", "channel_axis", "shape_of", "output_positions", "layer_macs", "count_macs", "count_params",
    "as_inputs", "eval_mode", "runs_torch_forward",
]


def out_channels(module: nn.Module) -> int | None:
    """Output channels of a conv layer, ``out_features`` of a linear one, ``None`` for other modules.

    Example:
        >>> out_channels(nn.Conv2d(3, 8, 3))
        8
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    return getattr(module, "out_channels", None)


def runs_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` computes what a ``torch.nn`` layer computes: an instance of one, or of a
    subclass that keeps its forward (torchvision's ``Conv3DSimple(nn.Conv3d)`` only changes
    ``__init__``). Such a module is traced as a leaf and compaction slices it like the layer.

    Example:
        >>> runs_torch_forward(torchvision.models.video.resnet.Conv3DSimple(3, 8))
        True
    """
    owner = next(c for c in type(module).__mro__ if "forward" in c.__dict__)
    return (owner is not nn.Module and owner.__module__.startswith(("torch.nn.", "torch.ao.nn."))
            and not issubclass(owner, (nn.Sequential, nn.ModuleList, nn.ModuleDict)))


def in_channels(module: nn.Module) -> int | None:
    """Input channels of a conv layer, ``in_features`` of a linear one, ``None`` for other modules.

    Example:
        >>> in_channels(nn.Conv2d(3, 8, 3)), in_channels(nn.Linear(4, 2))
        (3, 4)
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    return getattr(module, "in_channels", None)


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


def output_positions(module: nn.Module, out_shape: tuple[int, ...] | None) -> int | None:
    """Per sample, how many times a conv/linear layer applies its whole weight: the spatial positions
    of a conv's output ``[N, C, *spatial]``, the rows of a Linear's ``[N, *rows, C]`` (1 for
    ``[N, C]``). ``None`` without a recorded shape or for other modules.

    Example:
        >>> output_positions(nn.Conv2d(3, 8, 3), (1, 8, 26, 26)), output_positions(nn.Linear(4, 2), (5, 7, 2))
        (676, 7)
    """
    axis = channel_axis(module)
    if out_shape is None or axis is None:
        return None
    return math.prod(out_shape[2:]) if axis == 1 else math.prod(out_shape[1:-1])


def layer_macs(module: nn.Module, out_shape: tuple[int, ...] | None) -> int | None:
    """Multiply-accumulates per sample of a conv/linear layer with output shape ``out_shape``: its
    weight's elements (``out * in / groups * kernel``) times :func:`output_positions`. ``None``
    without a recorded shape (a count without the positions would be wrong by the output's size)
    or for other modules.

    Example:
        >>> layer_macs(nn.Linear(16, 4), (1, 4)), layer_macs(nn.Linear(16, 4), None)
        (64, None)
    """
    positions = output_positions(module, out_shape)
    return None if positions is None else positions * module.weight.numel()


def shape_of(node: fx.Node) -> tuple[int, ...] | None:
    """The output shape shape propagation recorded for ``node`` (``node.meta["tensor_meta"]``), or
    ``None`` (not propagated, or not a single tensor).

    Example:
        >>> shape_of(layer_nodes(evefx.transform(DemoNet(), {"passes": []}, torch.zeros(1, 1, 28, 28)))[0])
        (1, 4, 14, 14)
    """
    shape = getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def count_macs(gm: fx.GraphModule) -> int:
    """Multiply-accumulates per sample of ``gm``'s conv/linear layers (see :func:`layer_macs`), from
    the output shapes shape propagation recorded in ``node.meta``. A layer without a recorded shape
    raises :class:`~evefx.ShapeError`: transform with example inputs (or ``trace.input_shape``).

    Example:
        >>> count_macs(evefx.transform(DemoNet(), {"passes": []}, torch.zeros(1, 1, 28, 28)))
        43856
    """
    total = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if channel_axis(module) is None:
            continue
        macs = layer_macs(module, shape_of(node))
        if macs is None:
            raise ShapeError(f"layer {node.target} has no recorded output shape, so its MACs are unknown: pass "
                             "example inputs to evefx.transform (or set trace.input_shape in the spec)")
        total += macs
    return total


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers excluded).

    Example:
        >>> count_params(nn.Linear(4, 2))
        10
    """
    return sum(p.numel() for p in module.parameters())


def as_inputs(inputs: Any, what: str = "example_inputs") -> tuple[Any, ...] | None:
    """A model's positional inputs as a tuple: a tensor becomes ``(tensor,)``, a list or tuple a tuple,
    ``None`` stays ``None``; anything else raises :class:`~evefx.ShapeError` naming ``what``.

    Example:
        >>> as_inputs(torch.zeros(2)), as_inputs([torch.zeros(1), torch.ones(1)]), as_inputs(None)
        ((tensor([0., 0.]),), (tensor([0.]), tensor([1.])), None)
    """
    if inputs is None:
        return None
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (list, tuple)):
        return tuple(inputs)
    raise ShapeError(f"{what} must be a tensor or a tuple of inputs (got {type(inputs).__name__})")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule of ``model`` in eval mode for the block; each one's own train flag comes back
    afterwards (``model.train(was)`` would set them all alike), exceptions included.

    Example:
        >>> with eval_mode(gm):
        ...     out = gm(x)
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
