"""Channel pruning at run time: a 0/1 mask on a layer's output channels, and the statistics that rank them.

:class:`ChannelPruner` sits after a layer's output block and multiplies channel ``c`` of its input
by ``mask[c]``. In training mode it also accumulates one per-channel statistic, chosen by
``criterion`` (measured on its input, before the mask, so a masked channel keeps its history):

* ``fire_rate``: fraction of positive outputs of the channel;
* ``kl_div``: KL divergence of a Gaussian fitted to the channel's outputs from the Gaussian fitted to
  the whole layer's outputs. A channel that looks like the layer's average is pruned first; a
  constant channel carries no information and scores 0;
* ``taylor``: ``|sum over positions of activation x gradient|`` averaged over samples (first-order
  estimate of the loss change when the channel is removed), through a tensor hook;
* ``l1_norm``: needs the producing layer's weights, which this module does not see: no statistic
  is gathered, and :func:`evefx.prune_step` ranks the channels by those weights.

Masks are set by :func:`evefx.prune_step` (which ranks coupled channels of several layers
together) through :meth:`ChannelPruner.set_mask`. Everything lives on the instance (buffers travel
with ``state_dict``); nothing here knows about specs, passes or tracing.

Example:
    >>> p = ChannelPruner(4, criterion="fire_rate", ratio=0.5).train()
    >>> _ = p(torch.tensor([[1.0, -1.0, 2.0, -3.0]]))
    >>> p.importance().tolist()
    [1.0, 0.0, 1.0, 0.0]
"""
from __future__ import annotations

import logging
from typing import Any, Literal

import torch
from torch import nn

from evefx.errors import OptionError, ShapeError
from evefx.modules.protocol import EveHooks, EveRange

__all__ = ["ChannelPruner", "CRITERIA"]

log = logging.getLogger(__name__)

Criterion = Literal["l1_norm", "fire_rate", "kl_div", "taylor"]
CRITERIA: tuple[str, ...] = ("l1_norm", "fire_rate", "kl_div", "taylor")
_CONSTANT_VAR = 1e-8  # relative variance under which a channel counts as constant (kl_div)


class ChannelPruner(EveHooks, nn.Module):
    """Multiply the channels (``dim``) of its input by a 0/1 mask; gather a per-channel statistic.

    Args:
        num_channels: channels of the input along ``dim``.
        criterion: ``l1_norm`` | ``fire_rate`` | ``kl_div`` | ``taylor`` (see the module docstring).
        ratio: fraction of channels to prune at the next :func:`evefx.prune_step` (a buffer).
        dim: the channel axis: 1 for conv outputs, -1 for linear outputs.
        max_ratio: when given, ``ratio`` is an eve parameter in ``[0, max_ratio]``.
        min_channels: never keep fewer channels than this.
        steps: prune to ``ratio`` in this many equal increments (one per :func:`evefx.prune_step`).
        scope: ``layer`` or ``global``; read by :func:`evefx.prune_step`, ignored here.
        granularity: ``channel`` or ``head``: where the channels are split into attention heads, prune
            whole heads or ``head_dim`` entries; read by the channel analysis, ignored here.

    ``set_mode(pruned=False)`` makes the module the identity (statistics still accumulate).

    Example:
        >>> p = ChannelPruner(8, criterion="taylor", ratio=0.25, max_ratio=0.9)
        >>> p.set_eve("ratio", 0.5); p.get_eve("ratio")
        0.5
    """

    # buffers (nn.Module.__getattr__ would type them Tensor | Module)
    mask: torch.Tensor
    ratio: torch.Tensor
    steps_done: torch.Tensor
    stat_sum: torch.Tensor
    stat_sq: torch.Tensor
    stat_count: torch.Tensor

    def __init__(
        self,
        num_channels: int,
        criterion: Criterion = "l1_norm",
        ratio: float = 0.5,
        *,
        dim: int = 1,
        max_ratio: float | None = None,
        min_channels: int = 1,
        steps: int = 1,
        scope: Literal["layer", "global"] = "layer",
        granularity: Literal["channel", "head"] = "channel",
    ):
        super().__init__()
        if criterion not in CRITERIA:
            raise OptionError(f"ChannelPruner: unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
        if num_channels < 1:
            raise OptionError(f"ChannelPruner: num_channels must be positive (got {num_channels})")
        if not 0.0 <= ratio < 1.0:
            raise OptionError(f"ChannelPruner: ratio must be in [0, 1) (got {ratio})")
        if scope not in ("layer", "global"):
            raise OptionError(f"ChannelPruner: scope must be 'layer' or 'global' (got {scope!r})")
        if granularity not in ("channel", "head"):
            raise OptionError(f"ChannelPruner: granularity must be 'channel' or 'head' (got {granularity!r})")
        self.num_channels = int(num_channels)
        self.criterion = criterion
        self.dim = int(dim)
        self.max_ratio = max_ratio
        self.min_channels = int(min_channels)
        self.steps = max(1, int(steps))
        self.scope = scope
        self.granularity = granularity
        self.enabled = True
        self.register_buffer("mask", torch.ones(num_channels))
        self.register_buffer("ratio", torch.tensor(float(ratio)))
        self.register_buffer("steps_done", torch.tensor(0, dtype=torch.long))
        # per-channel running sums of the statistic, and how many samples/elements they cover
        self.register_buffer("stat_sum", torch.zeros(num_channels, dtype=torch.float64))
        self.register_buffer("stat_sq", torch.zeros(num_channels, dtype=torch.float64))
        self.register_buffer("stat_count", torch.zeros((), dtype=torch.float64))

    # ---- run time -------------------------------------------------------------------------------
    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``[rows, channels]`` (channel axis moved last)."""
        return x.detach().movedim(self.dim, -1).reshape(-1, self.num_channels)

    def _accumulate(self, x: torch.Tensor) -> None:
        if self.criterion == "fire_rate":
            flat = self._channels_last(x)
            self.stat_sum += (flat > 0).sum(0, dtype=torch.float64)
            self.stat_count += flat.shape[0]
        elif self.criterion == "kl_div":
            flat = self._channels_last(x).double()
            self.stat_sum += flat.sum(0)
            self.stat_sq += (flat * flat).sum(0)
            self.stat_count += flat.shape[0]
        elif self.criterion == "taylor" and x.requires_grad:
            act = x.detach()
            dim = self.dim % x.dim()

            def hook(grad: torch.Tensor) -> None:
                # first-order loss change per sample and channel: sum over positions of a * dL/da
                prod = (act * grad).movedim(dim, -1)
                per_sample = prod.reshape(prod.shape[0], -1, self.num_channels).sum(1) if prod.dim() > 1 else prod
                self.stat_sum += per_sample.abs().sum(0, dtype=torch.float64)
                self.stat_count += per_sample.shape[0]

            x.register_hook(hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != self.num_channels:
            raise ShapeError(
                f"ChannelPruner expects {self.num_channels} channels on dim {self.dim}, got shape {tuple(x.shape)}"
            )
        if self.training and (self.criterion != "taylor" or torch.is_grad_enabled()):
            self._accumulate(x)
        if not self.enabled:
            return x
        shape = [1] * x.dim()
        shape[self.dim] = self.num_channels
        return x * self.mask.to(x.dtype).view(shape)

    # ---- statistics and masks ----------------------------------------------------------------
    def importance(self) -> torch.Tensor | None:
        """Per-channel importance from the gathered statistic (higher = keep); ``None`` for
        ``l1_norm`` or before any training-mode forward."""
        if self.criterion == "l1_norm" or float(self.stat_count) == 0.0:
            return None
        n = self.stat_count
        mean = self.stat_sum / n
        if self.criterion in ("fire_rate", "taylor"):
            return mean.float()
        var = (self.stat_sq / n - mean * mean).clamp_min(0.0)
        layer_mean = mean.mean()
        layer_var = (self.stat_sq / n).mean() - layer_mean * layer_mean
        layer_var = layer_var.clamp_min(1e-12)
        constant = var <= _CONSTANT_VAR * layer_var
        safe_var = var.clamp_min(_CONSTANT_VAR * layer_var)
        kl = 0.5 * (torch.log(layer_var / safe_var) + (safe_var + (mean - layer_mean) ** 2) / layer_var - 1.0)
        return torch.where(constant, torch.zeros_like(kl), kl).float()

    def reset_statistics(self) -> None:
        """Forget the gathered statistic (the mask stays)."""
        self.stat_sum.zero_()
        self.stat_sq.zero_()
        self.stat_count.zero_()

    def target_ratio(self) -> float:
        """The ratio the next :func:`evefx.prune_step` aims at, given the schedule (``steps``)."""
        done = min(int(self.steps_done) + 1, self.steps)
        return float(self.ratio) * done / self.steps

    def set_mask(self, keep: torch.Tensor) -> None:
        """Set the mask from a boolean (or 0/1) keep-vector."""
        keep = torch.as_tensor(keep).reshape(-1)
        if keep.numel() != self.num_channels:
            raise ShapeError(f"ChannelPruner.set_mask: the mask needs {self.num_channels} entries (got {keep.numel()})")
        with torch.no_grad():
            self.mask.copy_(keep.to(self.mask.dtype) > 0.5)

    # ---- eve protocol -------------------------------------------------------------------------
    def eve_ranges(self) -> dict[str, EveRange]:
        if self.max_ratio is None:
            return {}
        return {"ratio": EveRange(0.0, float(self.max_ratio))}

    def observations(self) -> dict[str, float]:
        out = {"pruned": float((self.mask < 0.5).float().mean()), "ratio": float(self.ratio)}
        imp = self.importance()
        if imp is not None:
            out[self.criterion] = float(imp.mean())
        return out

    def set_mode(self, **flags: Any) -> None:
        if flags.get("pruned") is not None:
            self.enabled = bool(flags["pruned"])

    def extra_repr(self) -> str:
        kept = int((self.mask > 0.5).sum())
        return f"{self.num_channels}, criterion={self.criterion}, ratio={float(self.ratio):.3g}, kept={kept}, dim={self.dim}" + (
            f", granularity={self.granularity}" if self.granularity != "channel" else "")
