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
* :func:`adaround` (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training
  quantization"): per layer, learn for every weight whether it rounds up or down by minimising
  ``|| f(W~ x_q) - f(W x_fp) ||^2`` (``f`` the ReLU that follows the layer, if any) on the layer's
  inputs in the quantized model against the float model's outputs, with the rectified sigmoid and the annealed regulariser of the paper. The chosen codes
  are written back as weights that lie exactly on the weight quantizer's grid. A layer keeps nearest
  rounding when that is better on the same objective.

A layer with a folded BatchNorm has the BatchNorm baked into its weight and bias first
(:func:`bake_batchnorm`): the eval-mode function is unchanged; the model no longer trains BatchNorm.

Example:
    >>> pairs = equalize(gm)
    >>> evefx.calibrate(gm, batches)
    >>> results = adaround(gm, batches)
    >>> deltas = bias_correction(gm, batches)
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.errors import QuantizationError
from evefx.graph import LAYER_TYPES, calls_one_of, layer_nodes, module_of, output_block
from evefx.modules import QUANT_LAYER_TYPES, Quantizer
from evefx.ptq.calibrators import _call, _Modes, inputs_only

__all__ = [
    "bake_batchnorm",
    "equalization_pairs",
    "equalize",
    "EqualizedPair",
    "bias_correction",
    "adaround",
    "AdaRoundResult",
    "float_reference",
]

log = logging.getLogger(__name__)

# ops between two layers through which a positive per-channel scale passes unchanged
_HOMOGENEOUS_MODULES = (
    nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Flatten, Quantizer,
)
_HOMOGENEOUS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
    F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, torch.flatten,
}
_HOMOGENEOUS_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}


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


def _ensure_bias(layer: nn.Module) -> torch.Tensor:
    bake_batchnorm(layer)
    if layer.bias is None:
        out = layer.weight.shape[0]
        layer.bias = nn.Parameter(torch.zeros(out, dtype=layer.weight.dtype, device=layer.weight.device))
    return layer.bias


# ------------------------------------------------------------------------------- equalization
@dataclass(frozen=True)
class EqualizedPair:
    """Two consecutive layers equalized together; ``repeat`` input features of ``second`` per
    output channel of ``first`` (a flatten of ``C x H x W`` gives ``H W``); ``before``/``after``:
    the largest ratio between the two layers' per-channel ranges."""

    first: str
    second: str
    repeat: int = 1
    before: float = 1.0
    after: float = 1.0


def _passes_scale(gm: fx.GraphModule, node: fx.Node) -> bool:
    return calls_one_of(gm, node, _HOMOGENEOUS_MODULES, _HOMOGENEOUS_FUNCTIONS, _HOMOGENEOUS_METHODS)


def _in_features(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def _out_features(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def equalization_pairs(gm: fx.GraphModule) -> list[EqualizedPair]:
    """Consecutive conv/linear pairs ``L1 -> ... -> L2`` that cross-layer equalization can scale:
    every node between them is positively homogeneous per channel (ReLU, LeakyReLU, pooling,
    dropout, flatten, an evefx quantizer) and has one user, and ``L2`` reads ``L1``'s channels
    (``in(L2) = out(L1) * repeat``).

    Example:
        >>> [(p.first, p.second) for p in equalization_pairs(gm)]
        [('features.0', 'features.3'), ...]
    """
    pairs = []
    for node in layer_nodes(gm, LAYER_TYPES):
        first = module_of(gm, node)
        cur = node
        while True:
            users = list(cur.users)
            if len(users) != 1:
                break
            user = users[0]
            if not user.args or user.args[0] is not cur:
                break
            if user.op == "call_module" and isinstance(module_of(gm, user), LAYER_TYPES):
                second = module_of(gm, user)
                c_out, c_in = _out_features(first), _in_features(second)
                groups = getattr(second, "groups", 1)
                if c_in % c_out == 0 and (c_in == c_out or (isinstance(second, nn.Linear) and groups == 1)):
                    if str(node.target) != str(user.target):
                        pairs.append(EqualizedPair(str(node.target), str(user.target), c_in // c_out))
                break
            if not _passes_scale(gm, user):
                break
            cur = user
    return pairs


def _out_ranges(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().abs().reshape(m.weight.shape[0], -1).amax(dim=1)


def _grouped(m: nn.Module) -> tuple[torch.Tensor, int]:
    """The weight as ``[groups, out/groups, in/groups, K]`` (linear: one group, K = 1)."""
    w = m.weight.detach()
    g = getattr(m, "groups", 1)
    return w.reshape(g, w.shape[0] // g, w.shape[1], -1), g


def _in_ranges(m: nn.Module, repeat: int) -> torch.Tensor:
    w, g = _grouped(m)
    r = w.abs().amax(dim=(1, 3)).reshape(-1)  # per input feature
    return r.reshape(-1, repeat).amax(dim=1) if repeat > 1 else r


@torch.no_grad()
def _scale_pair(first: nn.Module, second: nn.Module, repeat: int) -> float:
    """One equalization step of a pair; returns max |log s|."""
    r1, r2 = _out_ranges(first), _in_ranges(second, repeat)
    ok = (r1 > 0) & (r2 > 0)
    s = torch.where(ok, torch.sqrt(r1 / torch.where(ok, r2, torch.ones_like(r2))), torch.ones_like(r1))
    shape = [-1] + [1] * (first.weight.dim() - 1)
    first.weight.div_(s.reshape(shape).to(first.weight.dtype))
    if first.bias is not None:
        first.bias.div_(s.to(first.bias.dtype))
    s_in = s.repeat_interleave(repeat) if repeat > 1 else s
    g = getattr(second, "groups", 1)
    w = second.weight
    view = w.reshape(g, w.shape[0] // g, w.shape[1], -1)
    view.mul_(s_in.reshape(g, 1, w.shape[1], 1).to(w.dtype))
    return float(s.log().abs().max())


def _ratio(first: nn.Module, second: nn.Module, repeat: int) -> float:
    r1, r2 = _out_ranges(first), _in_ranges(second, repeat)
    ok = (r1 > 0) & (r2 > 0)
    if not bool(ok.any()):
        return 1.0
    q = r1[ok] / r2[ok]
    return float(torch.maximum(q, 1 / q).max())


@torch.no_grad()
def equalize(gm: fx.GraphModule, *, layers: Iterable[str] | None = None, iterations: int = 20,
             tol: float = 1e-5) -> list[EqualizedPair]:
    """Cross-layer equalization of every pair from :func:`equalization_pairs` (both layers in
    ``layers`` when given), in place; chains are swept up to ``iterations`` times until no scale
    moves by more than ``tol`` (in log). Preserves the float function; run it before calibration.

    Example:
        >>> pairs = equalize(gm)
        >>> pairs[0].before, pairs[0].after   # largest range ratio between the paired channels
        (41.2, 1.0)
    """
    wanted = None if layers is None else set(layers)
    pairs = [p for p in equalization_pairs(gm) if wanted is None or (p.first in wanted and p.second in wanted)]
    if not pairs:
        return []
    mods = {p.first: gm.get_submodule(p.first) for p in pairs} | {p.second: gm.get_submodule(p.second) for p in pairs}
    for m in mods.values():
        bake_batchnorm(m)
    before = [_ratio(mods[p.first], mods[p.second], p.repeat) for p in pairs]
    for _ in range(iterations):
        moved = max(_scale_pair(mods[p.first], mods[p.second], p.repeat) for p in pairs)
        if moved < tol:
            break
    out = [EqualizedPair(p.first, p.second, p.repeat, b, _ratio(mods[p.first], mods[p.second], p.repeat))
           for p, b in zip(pairs, before)]
    for p in out:
        log.info("equalized %s -> %s: range ratio %.3g -> %.3g", p.first, p.second, p.before, p.after)
    return out


# ------------------------------------------------------------------------------ bias correction
def _quant_layer_names(gm: nn.Module, layers: Iterable[str] | None) -> list[str]:
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
        with _Modes(model, quantized=quantized):
            for batch in data:
                _call(model, batch)
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
    data = inputs_only(batches)
    if not data:
        raise QuantizationError("bias_correction: no calibration batches were given")
    names = _quant_layer_names(gm, layers)
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
        bias = _ensure_bias(layer)
        bias.add_(delta)
        deltas[name] = delta
        log.info("bias correction of %s: |delta| max %.3g", name, float(delta.abs().max()))
    return deltas


# ------------------------------------------------------------------------------------ AdaRound
@dataclass(frozen=True)
class AdaRoundResult:
    """One layer's AdaRound: the reconstruction error (mean squared, on the kept samples) with
    nearest rounding, with the learned rounding, and of the rounding written back (the better of
    the two: ``kept`` says whether that is the learned one); the share of weights rounded
    differently from nearest, and the seconds it took."""

    layer: str
    loss_nearest: float
    loss_learned: float
    loss_final: float
    kept: bool
    flipped: float
    seconds: float


_ZETA, _GAMMA = 1.1, -0.1


def _rect_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)


@torch.no_grad()
def _collect(model: nn.Module, name: str, data: list[Any], samples: int, quantized: bool, want: str) -> torch.Tensor:
    """The layer's inputs (``want="input"``) or outputs over the first ``samples`` samples."""
    got: list[torch.Tensor] = []
    m = model.get_submodule(name)

    def hook(_m: nn.Module, inp: Any, out: torch.Tensor) -> None:
        got.append((inp[0] if want == "input" else out).detach().clone())

    h = m.register_forward_hook(hook)
    seen = 0
    try:
        with _Modes(model, quantized=quantized):
            for batch in data:
                if seen >= samples:
                    break
                _call(model, batch)
                seen += int(got[-1].shape[0]) if got else 0
    finally:
        h.remove()
    return torch.cat(got)[:samples]


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, w, b)
    return layer._conv_forward(x, w, b)


def adaround(
    gm: nn.Module,
    batches: Iterable[Any],
    *,
    layers: Iterable[str] | None = None,
    config: Any = None,
    configs: dict[str, Any] | None = None,
    reference: nn.Module | None = None,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, AdaRoundResult]:
    """AdaRound every quantized layer (or those in ``layers``), in graph order, in place.

    ``config`` is an :class:`~evefx.spec.AdaRoundConfig` (or ``configs`` one per layer); the
    weight quantizers must be calibrated (their scale is kept). Each layer's inputs come from the
    quantized model (earlier layers already rounded), its targets from ``reference`` (default: a
    float copy of ``gm`` taken now). Deterministic for a given ``seed``.

    Example:
        >>> results = adaround(gm, batches, config=AdaRoundConfig(iterations=500))
        >>> results["features.0"].loss_final <= results["features.0"].loss_nearest
        True
    """
    from evefx.spec import AdaRoundConfig

    data = inputs_only(batches)
    if not data:
        raise QuantizationError("adaround: no calibration batches were given")
    names = _quant_layer_names(gm, layers)
    ref = reference if reference is not None else float_reference(gm)
    out: dict[str, AdaRoundResult] = {}
    bar = None
    if progress:
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(stderr=True), transient=True)
        bar.start()
    try:
        for name in names:
            cfg = (configs or {}).get(name) or config or AdaRoundConfig()
            layer = gm.get_submodule(name)
            wq = layer.weight_quantizer
            if not wq.enabled:
                continue
            if not bool(wq.initialized):
                raise QuantizationError(f"adaround: {name}'s weight quantizer is not calibrated; run evefx.calibrate first")
            task = bar.add_task(f"AdaRound {name}", total=cfg.iterations) if bar is not None else None
            out[name] = _adaround_layer(gm, ref, name, data, cfg, seed,
                                        (lambda n, t=task: bar.update(t, completed=n)) if bar is not None else None)
            if bar is not None:
                bar.remove_task(task)
            r = out[name]
            log.info("AdaRound %s: loss %.4g (nearest %.4g), %.1f%% flipped, %s, %.1f s", name, r.loss_learned,
                     r.loss_nearest, 100 * r.flipped, "kept" if r.kept else "nearest kept", r.seconds)
    finally:
        if bar is not None:
            bar.stop()
    return out


class _Adam:
    """Adam (Kingma & Ba 2015) on one tensor; torch.optim's first use imports torch._dynamo (seconds)."""

    def __init__(self, p: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.p, self.lr, self.betas, self.eps, self.t = p, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(p), torch.zeros_like(p)

    @torch.no_grad()
    def step(self) -> None:
        g = self.p.grad
        if g is None:
            return
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1 ** self.t)
        v_hat = self.v / (1 - b2 ** self.t)
        self.p.sub_(self.lr * m_hat / (v_hat.sqrt() + self.eps))


def _following_relu(gm: nn.Module, name: str) -> bool:
    """Whether layer ``name``'s output goes straight into a ReLU (its BatchNorm folded)."""
    if not isinstance(gm, fx.GraphModule):
        return False
    node = next((n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name), None)
    if node is None:
        return False
    block = output_block(gm, node)
    act = block.act
    if block.bn is not None or act is None:
        return False
    if act.op == "call_module":
        return type(module_of(gm, act)) is nn.ReLU
    return (act.op == "call_function" and act.target in (F.relu, torch.relu)) or (act.op == "call_method" and act.target in ("relu", "relu_"))


def _adaround_layer(gm: nn.Module, ref: nn.Module, name: str, data: list[Any], cfg: Any, seed: int,
                    tick: Any) -> AdaRoundResult:
    start = time.perf_counter()
    layer = gm.get_submodule(name)
    bake_batchnorm(layer)
    x = _collect(gm, name, data, cfg.samples, quantized=True, want="input")
    y = _collect(ref, name, data, cfg.samples, quantized=False, want="output")
    n = min(x.shape[0], y.shape[0])
    x, y = x[:n], y[:n]
    # the paper's objective runs through the activation that follows: || f(W x) - f(W~ x) ||^2
    act = torch.relu if _following_relu(gm, name) else (lambda t: t)
    y = act(y)
    wq = layer.weight_quantizer
    scale, zero, qmin, qmax, axis = wq.qparams()
    w = layer.weight.detach().float()
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis % w.dim()] = -1
    s = scale.reshape(shape)
    z = zero.float().reshape(shape)
    bias = None if layer.bias is None else layer.bias.detach()
    floor = torch.floor(w / s)
    rest = (w / s - floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1)).requires_grad_(True)

    def weight_of(h: torch.Tensor) -> torch.Tensor:
        return ((floor + h + z).clamp(qmin, qmax) - z) * s

    @torch.no_grad()
    def loss_of(wt: torch.Tensor) -> float:
        total, count = 0.0, 0
        for i in range(0, n, 256):
            d = act(_apply(layer, x[i:i + 256], wt, bias)) - y[i:i + 256]
            total += float(d.double().square().sum())
            count += d.numel()
        return total / max(count, 1)

    nearest = ((torch.round(w / s) + z).clamp(qmin, qmax) - z) * s
    loss_nearest = loss_of(nearest)
    adam = _Adam(v, cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    warm = int(cfg.warm_start * cfg.iterations)
    b_start, b_end = cfg.beta
    for it in range(cfg.iterations):
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        h = _rect_sigmoid(v)
        rec = (act(_apply(layer, x[idx], weight_of(h), bias)) - y[idx]).square().mean()
        loss = rec
        if it >= warm:
            frac = (it - warm) / max(cfg.iterations - warm, 1)
            beta = b_end + 0.5 * (b_start - b_end) * (1 + math.cos(frac * math.pi))
            loss = rec + cfg.reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        v.grad = None
        loss.backward()
        adam.step()
        if tick is not None and (it % 25 == 0 or it == cfg.iterations - 1):
            tick(it + 1)
    with torch.no_grad():
        hard = (_rect_sigmoid(v) >= 0.5).float()
        learned = weight_of(hard)
        loss_learned = loss_of(learned)
        kept = loss_learned <= loss_nearest
        chosen = learned if kept else nearest
        flipped = float((learned != nearest).float().mean())
        layer.weight.copy_(chosen.to(layer.weight.dtype))
    return AdaRoundResult(name, loss_nearest, loss_learned, min(loss_learned, loss_nearest), kept,
                          flipped if kept else 0.0, time.perf_counter() - start)
