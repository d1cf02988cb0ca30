"""Quantized conv/linear layers: weights through a :class:`~evefx.modules.quantizer.Quantizer`, with
the BatchNorm that followed the layer folded in as integer kernels deploy it.

Example:
    >>> fc = nn.Linear(8, 4)
    >>> q = QuantLinear.from_float(fc, Quantizer(8, "round", "per_channel", num_channels=4))
    >>> q(torch.randn(2, 8)).shape
    torch.Size([2, 4])
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evefx.errors import QuantizationError
from evefx.modules.quantizer import Quantizer

__all__ = ["QuantConv1d", "QuantConv2d", "QuantConv3d", "QuantLinear", "QUANT_LAYER_TYPES", "RUNNING_STATS_MAX_BITS"]

# bn_statistics auto: frozen running statistics at this many weight bits or fewer, batch statistics above
# (validation, docs/quantization.md: at 4 and 8 bits batch statistics, re-estimated after training, were best
# on DemoNet, a small ResNet and resnet18, where frozen ones collapsed; at 2-3 bits the frozen ones were)
RUNNING_STATS_MAX_BITS = 3


class _QuantLayerMixin(nn.Module):
    """Weight quantization plus simulated BatchNorm folding, shared by the conv and linear layers.

    Folding (the form of Krishnamoorthi 2018, sec. 3.2, and torch.ao's ConvBn modules): with
    ``f = gamma / sqrt(running_var + eps)`` the deployable weight is ``W_f = W * f`` and bias
    ``b_f = beta + (b - running_mean) * f``.

    * train: ``y = BN_batch(conv(x, Q(W_f) / f) + b)``, which equals ``BN_batch(conv(x, Q(W_f)) / f + b)``
      because conv is linear per output channel. The weights are quantized exactly as they
      deploy, the division by ``f`` undoes the fold so that BatchNorm sees the float model's
      pre-activation, and BN's batch statistics (and running-statistics updates) are the float
      model's. With quantization off this equals ``BN(conv(x))`` up to float rounding.
    * eval: ``y = conv(x, Q(W_f), b_f)``: a single conv, exactly the exported graph. With the
      quantizer of its input known (:meth:`set_input_quantizer`), ``b_f`` is rounded to the grid
      ``s_x * s_w`` on which integer kernels store it as int32, as the exported file does.
    * ``train_int32_bias`` (default True): training adds that rounding too, as a constant shift
      (the rounded minus the float ``b_f``; the bias's gradient is the float one, straight-through).
      At low bits the grid is coarse (3-bit input x 2-bit weights: ``s_x * s_w`` about 0.1), and a
      network trained on float biases can lose tens of points in eval and once deployed.
    * ``bn_statistics`` (set by the quantize pass's option of that name): ``batch`` (the float
      model's BatchNorm), ``running`` (training normalises with BatchNorm's running statistics and
      leaves them as they are, so the training forward is the eval one up to float rounding:
      torch.ao's ``freeze_bn_stats``), or ``auto``: ``running`` while the weights have
      ``RUNNING_STATS_MAX_BITS`` bits or fewer, ``batch`` above, read at every forward since a
      search changes bit widths. At 2-3 bits a batch's statistics move codes across rounding
      boundaries that eval puts elsewhere; at 4 and more, frozen statistics take BatchNorm's
      normalisation out of training, which deep networks need (docs/quantization.md).
    """

    train_int32_bias: bool = True
    bn_statistics: str = "batch"

    @property
    def bn_running_stats(self) -> bool:
        """Whether training normalises with the frozen running statistics now (``bn_statistics``)."""
        if self.bn_statistics == "auto":
            return int(self.weight_quantizer.bits) <= RUNNING_STATS_MAX_BITS
        return self.bn_statistics == "running"

    @bn_running_stats.setter
    def bn_running_stats(self, value: bool) -> None:
        self.bn_statistics = "running" if value else "batch"

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a layer pickled before bn_statistics existed kept a plain bn_running_stats flag
        old = state.pop("bn_running_stats", None)
        if old is not None and "bn_statistics" not in state:
            state["bn_statistics"] = "running" if old else "batch"
        super().__setstate__(state)

    weight: torch.Tensor
    bias: torch.Tensor | None
    weight_quantizer: Quantizer
    bn: nn.modules.batchnorm._BatchNorm | None

    def _adopt(self, module: nn.modules.conv._ConvNd | nn.Linear, weight_quantizer: Quantizer, bn: nn.Module | None) -> Any:
        """Take over ``module``'s parameters (shared, not copied) and mode; attach the quantizer and BN."""
        assert bn is None or isinstance(bn, nn.modules.batchnorm._BatchNorm), "from_float's _check_bn takes only a BatchNorm"
        self.weight = module.weight
        self.bias = module.bias
        self.train(module.training)
        self.weight_quantizer = weight_quantizer
        self.bn = bn
        return self

    def set_input_quantizer(self, quantizer: Quantizer | None) -> None:
        """Name the quantizer whose codes this layer reads (per tensor). In eval mode the bias is then
        rounded to ``s_x * s_w``, the int32 grid integer kernels (and the exported file) keep it on:
        left in float, it is what most separates PyTorch from onnxruntime in a deep network (each
        output channel shifted by up to half a unit, every rounding after it moved with it).

        Example:
            >>> qconv.set_input_quantizer(input_quantizer)
        """
        # a plain reference, not a submodule: the quantizer is registered where it runs
        object.__setattr__(self, "_input_quantizer", quantizer)

    def _deployed_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        q = self.__dict__.get("_input_quantizer")
        wq = self.weight_quantizer
        if bias is None or q is None or not (q.enabled and wq.enabled) or q.num_channels is not None \
                or not (bool(q.initialized) and bool(wq.initialized)):
            return bias
        step = (q.scale.detach().reshape(()) * wq.scale.detach()).to(bias.dtype)
        return torch.round(bias / step) * step

    @torch.no_grad()
    def _bias_shift(self, bias: torch.Tensor) -> torch.Tensor | None:
        """What rounding ``bias`` to the int32 grid adds to it, None when it is not rounded."""
        deployed = self._deployed_bias(bias)
        return None if deployed is bias else deployed - bias

    def _fold_factor(self) -> torch.Tensor:
        bn = self.bn
        assert bn is not None and bn.running_var is not None
        # evefx.reestimate_bn holds the variance the codes were trained with while BatchNorm measures new statistics
        held = self.__dict__.get("_held_fold_var")
        inv_std = torch.rsqrt((bn.running_var if held is None else held) + bn.eps)
        return bn.weight * inv_std if bn.affine else inv_std

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Eval-mode folded float ``(weight, bias)`` before weight quantization (the layer's own
        weight and bias when no BatchNorm is folded).

        Example:
            >>> w, b = qconv.folded_weight_bias()
        """
        if self.bn is None:
            return self.weight, self.bias
        f = self._fold_factor()
        return self.weight * f.reshape([-1] + [1] * (self.weight.dim() - 1)), self._folded_bias(f)

    def _folded_bias(self, f: torch.Tensor) -> torch.Tensor:
        assert self.bn is not None and self.bn.running_mean is not None
        bias = self.bias if self.bias is not None else torch.zeros_like(f)
        beta = self.bn.bias if self.bn.affine else torch.zeros_like(f)
        return beta + (bias - self.bn.running_mean) * f

    def _forward_quant(self, x: torch.Tensor, apply: Any) -> torch.Tensor:
        if not self.training:
            w, b = self.folded_weight_bias()
            return apply(x, self.weight_quantizer(w), self._deployed_bias(b))
        if self.bn is None:
            w_q = self.weight_quantizer(self.weight)  # first: the bias grid uses the scale it settles
            bias = self.bias
            shift = self._bias_shift(bias.detach()) if self.train_int32_bias and bias is not None else None
            return apply(x, w_q, bias if shift is None else bias + shift)
        f = self._fold_factor().reshape([-1] + [1] * (self.weight.dim() - 1))
        # conv(x, Q(W f)) / f == conv(x, Q(W f) / f), and Q(W f) / f is W quantized with scale s / f:
        # one pass over the weights, none over the activations
        y = self._normalize(apply(x, self.weight_quantizer.quantize_folded(self.weight, f), self.bias))
        if not self.train_int32_bias:
            return y
        # BN_batch has no explicit bias: add the deployed b_f's rounding after it, per output channel.
        # The fold factor is taken again, not reused from above: on batch statistics self.bn has just
        # updated its running ones, and eval folds with the updated ones
        with torch.no_grad():
            shift = self._bias_shift(self._folded_bias(self._fold_factor()))
        return y if shift is None else y + shift.reshape([1, -1] + [1] * (y.dim() - 2))

    def _normalize(self, y: torch.Tensor) -> torch.Tensor:
        """The folded BatchNorm in training: on the batch's statistics, or frozen on the running ones."""
        bn = self.bn
        assert bn is not None
        if not self.bn_running_stats:
            return bn(y)
        return F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)

    @staticmethod
    def _check_bn(layer: nn.Module, bn: nn.Module | None, out_features: int, name: str) -> None:
        if bn is None:
            return
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise QuantizationError(f"{name}: can only fold a BatchNorm (got {type(bn).__name__})")
        if bn.num_features != out_features:
            raise QuantizationError(
                f"{name}: BatchNorm has {bn.num_features} features but the layer has {out_features} outputs"
            )
        if not bn.track_running_stats or bn.running_var is None:
            raise QuantizationError(
                f"{name}: cannot fold a BatchNorm without running statistics (track_running_stats=False); "
                f"set fold_bn: false for this layer"
            )

    def extra_repr(self) -> str:  # noqa: D401 - appended to the float layer's repr
        return super().extra_repr() + (", bn_folded=True" if self.bn is not None else "")


def _make_quant_conv(base: type[nn.modules.conv._ConvNd]) -> type[_QuantLayerMixin]:
    class QuantConv(_QuantLayerMixin, base):  # type: ignore[valid-type, misc]
        __doc__ = f"""``{base.__name__}`` whose weights pass through ``weight_quantizer`` (per channel on axis 0),
        optionally folding the BatchNorm that followed it (see :class:`_QuantLayerMixin` for the
        folding formulas).

        Example:
            >>> q = Quant{base.__name__}.from_float(conv, Quantizer(8, "round", "per_channel", num_channels=conv.out_channels), bn)
            >>> w, b = q.folded_weight_bias()
        """

        @classmethod
        def from_float(cls, module: nn.Module, weight_quantizer: Quantizer, bn: nn.Module | None = None):
            """Wrap ``module`` (its parameters are shared, not copied) and optionally fold ``bn``."""
            if not isinstance(module, base):
                raise QuantizationError(f"{weight_quantizer.name}: Quant{base.__name__}.from_float needs a {base.__name__} (got {type(module).__name__})")
            cls._check_bn(module, bn, module.out_channels, weight_quantizer.name)
            # build on the meta device so no time goes into initialising weights we replace anyway
            new = cls(
                module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, groups=module.groups,
                bias=module.bias is not None, padding_mode=module.padding_mode, device="meta",
            )
            return new._adopt(module, weight_quantizer, bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._forward_quant(x, self._conv_forward)

    QuantConv.__name__ = QuantConv.__qualname__ = f"Quant{base.__name__}"
    QuantConv.__module__ = __name__
    return QuantConv


QuantConv1d = _make_quant_conv(nn.Conv1d)
QuantConv2d = _make_quant_conv(nn.Conv2d)
QuantConv3d = _make_quant_conv(nn.Conv3d)


# torch infers Linear.bias as Parameter (it is None for bias=False), the mixin says Tensor | None
class QuantLinear(_QuantLayerMixin, nn.Linear):  # type: ignore[misc]
    """``nn.Linear`` whose weights pass through ``weight_quantizer`` (per channel on axis 0), optionally
    folding a following ``BatchNorm1d`` (inputs ``[N, features]``; formulas in :class:`_QuantLayerMixin`).

    Example:
        >>> q = QuantLinear.from_float(fc, Quantizer(8, "round", "per_channel", num_channels=fc.out_features))
    """

    @classmethod
    def from_float(cls, module: nn.Linear, weight_quantizer: Quantizer, bn: nn.Module | None = None) -> "QuantLinear":
        """Wrap ``module`` (its parameters are shared, not copied) and optionally fold ``bn``."""
        if not isinstance(module, nn.Linear):
            raise QuantizationError(f"{weight_quantizer.name}: QuantLinear.from_float needs a Linear (got {type(module).__name__})")
        cls._check_bn(module, bn, module.out_features, weight_quantizer.name)
        new = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        return new._adopt(module, weight_quantizer, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bn is not None and x.dim() != 2:
            raise QuantizationError(
                f"{self.weight_quantizer.name}: a Linear with a folded BatchNorm1d takes [N, features] inputs "
                f"(got shape {list(x.shape)})"
            )
        return self._forward_quant(x, F.linear)


QUANT_LAYER_TYPES: tuple[type[_QuantLayerMixin], ...] = (QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear)
"""The layer classes the quantize pass puts in place of conv/linear layers."""
