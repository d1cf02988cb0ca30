"""Post-training corrections of a quantized model: cross-layer equalization, empirical bias
correction and AdaRound. Each edits the transformed model in place (``evefx.transform`` copied the
user's model, which is never touched).

* :func:`equalize` (Nagel et al. 2019, "Data-free quantization through weight equalization and
  bias correction"): for consecutive layers ``L1 -> [ReLU/pool/flatten/...] -> L2`` where ``L1``'s
  output feeds only ``L2``, scale output channel ``i`` of ``L1`` by ``1/s_i`` and the matching input
  channel of ``L2`` by ``s_i`` with ``s_i = sqrt(r1_i / r2_i)`` (``r`` = the channel's largest
  absolute weight), which leaves the float function unchanged (ReLU is positively homogeneous)
  and gives both channels the range ``sqrt(r1_i r2_i)``. Run before calibration.
* :func:`bias_correction` (empirical): shift each quantized layer's bias by the mean difference,
  per output channel on the calibration data, between the float model's output of that layer and
  the quantized model's (layer by layer in graph order, so every correction sees the ones before).
* :func:`reestimate_bn` (Nagel et al. 2022, "Overcoming oscillations in quantization-aware
  training"; AIMET's BatchNorm re-estimation): after QAT, replace every BatchNorm's running
  statistics, which averaged batches of weights that kept flipping between codes, by the
  statistics of the final model on a few batches. A layer that folds its BatchNorm keeps its
  weight codes: its per-channel grid stretches with the fold factor.
* :func:`adaround` (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training
  quantization"): per layer, learn for every weight whether it rounds up or down by minimising
  ``|| f(W~ x_q) - f(W x_fp) ||^2`` (``f`` the ReLU that follows the layer, if any) on the layer's
  inputs in the quantized model against the float model's outputs, with the rectified sigmoid and the annealed regulariser of the paper. The chosen codes
  are written back as weights that lie exactly on the weight quantizer's grid. A layer keeps nearest
  rounding when that is better on the same objective.

A layer with a folded BatchNorm has the BatchNorm baked into its weight and bias first
(:func:`bake_batchnorm`): the eval-mode function is unchanged; the model no longer trains BatchNorm.

Here: what the three share (:func:`float_reference`, :func:`bake_batchnorm`) and bias correction;
:mod:`evefx.ptq.equalization` and :mod:`evefx.ptq.adaround` hold the other two.

Example:
    >>> pairs = equalize(gm)
    >>> evefx.calibrate(gm, batches)
    >>> results = adaround(gm, batches)
    >>> deltas = bias_correction(gm, batches)
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Iterable

import torch
from torch import fx, nn

from evefx.errors import QuantizationError
from evefx.graph import layer_nodes
from evefx.modules import QUANT_LAYER_TYPES, Quantizer
from evefx.layers import eval_mode
from evefx.ptq.batches import inputs_only, progress_over, quantizers_off, run_batch

__all__ = ["bake_batchnorm", "bias_correction", "float_reference", "quant_layer_names", "reestimate_bn"]

log = logging.getLogger(__name__)


def float_reference(gm: nn.Module) -> nn.Module:
    """A copy of ``gm`` with every quantizer off: the float model the corrections aim at."""
    memo: dict[int, Any] = {}
    for module in gm.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
    ref = copy.deepcopy(gm, memo).eval()
    for m in ref.modules():
        if isinstance(m, Quantizer):
            m.set_mode(quantized=False)
    return ref


@torch.no_grad()
def bake_batchnorm(layer: nn.Module) -> bool:
    """Replace a quantized layer's folded BatchNorm by its eval-mode fold (weight ``W f``, bias
    ``beta + (b - mean) f``); returns whether there was one. The eval output is unchanged.

    Example:
        >>> bake_batchnorm(gm.features[0]); gm.features[0].bn is None
        True
    """
    if not isinstance(layer, QUANT_LAYER_TYPES) or layer.bn is None:
        return False
    w, b = layer.folded_weight_bias()
    layer.weight = nn.Parameter(w.detach().clone())
    layer.bias = nn.Parameter(b.detach().clone())
    layer.bn = None
    return True


@torch.no_grad()
def reestimate_bn(model: nn.Module, batches: Iterable[Any], *, include_frozen: bool = False,
                  progress: bool = True) -> list[str]:
    """Re-estimate the running statistics of every BatchNorm of ``model`` (those that quantized
    layers fold included) as plain averages over ``batches`` (model inputs, or ``(x, y)`` pairs),
    with the rest of the model as in eval: quantizer grids, pruning masks and neurons' settings
    stay. Returns the re-estimated BatchNorms' names. Run it after training, before evaluating or
    exporting. A folded BatchNorm that trains on its frozen running statistics now
    (``bn_statistics`` running, or auto at low bits) keeps them, since the network learnt around
    them; ``include_frozen=True`` re-estimates those too (a configuration scored without training).

    Why: in QAT weights oscillate across rounding boundaries, so the running statistics, an average
    over the last batches' weights, do not describe the final weights (Nagel et al. 2022); the
    mismatch costs accuracy at eval and shows as validation swinging between epochs. For a layer
    folding its BatchNorm the eval weight is ``Q(W f)`` with ``f = gamma / sqrt(running_var)``:
    its per-channel weight grid is stretched by ``f_new / f_old`` so every weight keeps its code
    (a per-tensor grid cannot follow per-channel factors: its codes follow the new ``f``).

    Example:
        >>> evefx.train.fit(gm, train_loader, epochs=5)      # 4-bit weights: batch statistics (auto)
        >>> evefx.reestimate_bn(gm, itertools.islice(train_loader, 16))
    """
    norms = {name: m for name, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_var is not None}
    frozen = set() if include_frozen else {id(m.bn) for m in model.modules()
                                           if isinstance(m, QUANT_LAYER_TYPES) and m.bn is not None and m.bn_running_stats}
    norms = {name: bn for name, bn in norms.items() if id(bn) not in frozen}  # they keep normalising as trained
    data = inputs_only(batches, model)
    if not norms or not data:
        return []
    saved = {id(bn): (bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in norms.values()}
    folding = [m for m in model.modules() if isinstance(m, QUANT_LAYER_TYPES) and id(m.bn) in saved]
    before = {m: saved[id(m.bn)][2] for m in folding}  # each folded BatchNorm's variance as trained
    modes = {m: m.bn_statistics for m in folding}
    with eval_mode(model):
        for m in folding:  # the folded path normalises with (and updates) batch statistics only in training
            m.training = True
            m.bn_statistics = "batch"
            # the weights are quantized with the fold factor they were trained with, not with the
            # statistics being averaged (which start from 0 / 1): those are the codes measured
            object.__setattr__(m, "_held_fold_var", before[m])
        for bn in norms.values():
            bn.reset_running_stats()
            bn.momentum = None  # a plain average over the batches
            bn.train()
        try:
            for batch in progress_over(data, "re-estimating BatchNorm statistics", progress):
                run_batch(model, batch)
        except BaseException:
            for bn in norms.values():  # nothing half-estimated is left behind
                momentum, mean, var, count = saved[id(bn)]
                bn.running_mean.copy_(mean), bn.running_var.copy_(var), bn.num_batches_tracked.copy_(count)
            raise
        finally:
            for bn in norms.values():
                bn.momentum = saved[id(bn)][0]
            for m, mode in modes.items():
                m.bn_statistics = mode
                del m.__dict__["_held_fold_var"]
    for m in folding:
        q, folded = m.weight_quantizer, m.bn
        assert folded is not None and folded.running_var is not None, "folding holds layers with a BatchNorm"
        if not bool(q.initialized):
            continue
        if q.num_channels is None:
            log.info("%s: per_tensor weight grid, so its codes follow the re-estimated fold factor", q.name)
            continue
        q.stretch_grid(torch.sqrt((before[m] + folded.eps) / (folded.running_var + folded.eps)))
    log.info("re-estimated %d BatchNorms on %d batches", len(norms), len(data))
    return list(norms)


def ensure_bias(layer: nn.Module) -> torch.Tensor:
    """The layer's bias (zeros when it had none), its folded BatchNorm baked in first."""
    bake_batchnorm(layer)
    bias = layer.bias
    if bias is None:
        out = layer.weight.shape[0]
        bias = layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    assert isinstance(bias, torch.Tensor), f"{type(layer).__name__}.bias is not a tensor"
    return bias


def quant_layer_names(gm: nn.Module, layers: Iterable[str] | None) -> list[str]:
    """The quantized layers of ``gm`` in graph order, or those of them in ``layers`` (an unknown name is an error)."""
    names = [str(n.target) for n in layer_nodes(gm, QUANT_LAYER_TYPES)] if isinstance(gm, fx.GraphModule) else \
        [n for n, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)]
    if layers is None:
        return names
    wanted = list(layers)
    unknown = [w for w in wanted if w not in names]
    if unknown:
        raise QuantizationError(f"not quantized layers of the model: {', '.join(unknown)}; quantized: {', '.join(names)}")
    return [n for n in names if n in wanted]


def _channel_sum(y: torch.Tensor, linear: bool) -> tuple[torch.Tensor, int]:
    y = y.detach().double()
    if linear:
        flat = y.reshape(-1, y.shape[-1])
        return flat.sum(dim=0), flat.shape[0]
    flat = y.movedim(1, 0).reshape(y.shape[1], -1)
    return flat.sum(dim=1), flat.shape[1]


@torch.no_grad()
def _mean_outputs(model: nn.Module, names: list[str], data: list[Any], quantized: bool) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name in names:
        m = model.get_submodule(name)
        linear = isinstance(m, nn.Linear)

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, key: str = name, linear: bool = linear) -> None:
            s, n = _channel_sum(out, linear)
            sums[key] = sums[key] + s if key in sums else s
            counts[key] = counts.get(key, 0) + n

        hooks.append(m.register_forward_hook(hook))
    try:
        with quantizers_off(model, quantized=quantized):
            for batch in data:
                run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return {k: sums[k] / max(counts[k], 1) for k in sums}


@torch.no_grad()
def bias_correction(gm: nn.Module, batches: Iterable[Any], *, layers: Iterable[str] | None = None,
                    reference: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Empirical bias correction, in place: for every quantized layer (or those in ``layers``) in
    graph order, add to its bias the per-channel mean of ``float output - quantized output`` on
    ``batches``; afterwards that mean is 0 on the same data. ``reference`` is the float model
    (default: a copy of ``gm`` with quantizers off, taken now). Calibrate the quantizers first.
    Returns the added vectors by layer.

    Example:
        >>> deltas = bias_correction(gm, batches)
        >>> float(deltas["features.0"].abs().max())
    """
    data = inputs_only(batches, gm)
    if not data:
        raise QuantizationError("bias_correction: no calibration batches were given")
    names = quant_layer_names(gm, layers)
    ref = reference if reference is not None else float_reference(gm)
    target = _mean_outputs(ref, names, data, quantized=False)
    deltas: dict[str, torch.Tensor] = {}
    for name in names:
        layer = gm.get_submodule(name)
        if not layer.weight_quantizer.enabled:
            continue
        # measured with the float bias: the correction is exact, and the int32 grid the deployed
        # bias sits on (eval mode, see set_input_quantizer) rounds it by at most half a step once
        linked = layer.__dict__.get("_input_quantizer")
        layer.set_input_quantizer(None)
        try:
            got = _mean_outputs(gm, [name], data, quantized=True)[name]
        finally:
            layer.set_input_quantizer(linked)
        delta = (target[name] - got).to(layer.weight.dtype)
        bias = ensure_bias(layer)
        bias.add_(delta)
        deltas[name] = delta
        log.info("bias correction of %s: |delta| max %.3g", name, float(delta.abs().max()))
    return deltas
