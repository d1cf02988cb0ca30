"""AdaRound (Nagel et al. 2020, "Up or down? Adaptive rounding for post-training quantization"):
per layer, learn for every weight whether it rounds up or down by minimising
``|| f(W~ x_q) - f(W x_fp) ||^2`` (``f`` the ReLU that follows the layer, if any) on the layer's
inputs in the quantized model against the float model's outputs, with the rectified sigmoid and the
annealed regulariser of the paper. The chosen codes are written back as weights that lie exactly on
the weight quantizer's grid. A layer keeps nearest rounding when that is better on the same objective.

Example:
    >>> results = adaround(gm, batches)
    >>> results["features.0"].kept
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.errors import QuantizationError
from evefx.graph import module_of, output_block
from evefx.ptq.batches import inputs_only, quantizers_off, run_batch
from evefx.ptq.corrections import bake_batchnorm, float_reference, quant_layer_names

__all__ = ["AdaRoundResult", "adaround"]

log = logging.getLogger(__name__)


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
        with quantizers_off(model, quantized=quantized):
            for batch in data:
                if seen >= samples:
                    break
                run_batch(model, batch)
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

    data = inputs_only(batches, gm)
    if not data:
        raise QuantizationError("adaround: no calibration batches were given")
    names = quant_layer_names(gm, layers)
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
