"""Spiking neurons: integrate-and-fire (IF), leaky IF (LIF) and LIF with a learned time constant (PLIF).

Dynamics of one neuron at step ``t`` (input ``x_t``, membrane ``v``, threshold ``th``, reset ``r``)::

    IF:        h_t = v_{t-1} + x_t
    LIF/PLIF:  h_t = v_{t-1} + k (x_t - (v_{t-1} - r))      with k = 1/tau  (leak toward r)
    spike:     s_t = H(h_t - th)                            (H(u) = 1 for u >= 0, surrogate gradient)
    output:    o_t = s_t                (binary)  or  s_t * (h_t - th)  (binary=False: analog spike)
    reset:     v_t = r where s_t else h_t    (hard reset, reset=r)
               v_t = h_t - th * s_t          (soft reset, reset=None; then r = 0 in the leak)

The membrane starts at ``r`` (0 for a soft reset). ``time_dependent=False`` detaches ``v`` between
steps, so gradients do not flow back through time.

Multi-step mode (the default) takes the time-folded batch ``[T*B, ...]`` (``T = timesteps``,
step-major: rows ``t*B .. t*B+B-1`` are step ``t``) and runs the whole recurrence inside one
autograd function whose backward is written by hand (BPTT): forward saves only the pre-spike
membrane ``h`` (spikes are recomputed as ``h >= th``); the backward folds the time recurrence
into one fused multiply-add per step and does everything else on all steps at once. It matches
the step-by-step loop (forward exactly, gradients to rounding). The state is reset at every
multi-step forward.

Single-step mode (``set_mode(step="single")``) takes ``[B, ...]``, keeps the membrane between
calls until :meth:`reset_state` and backpropagates through time with ordinary autograd.

Non-spiking mode (``set_mode(spiking=False)``) makes IF a ReLU and LIF/PLIF a LeakyReLU with
negative slope ``ann_slope`` (default 0.01, PyTorch's), so a model can be trained as an ANN first.

Example:
    >>> lif = LIFNeuron(timesteps=4, tau=2.0, channels=8, neuron_wise=True).eval()
    >>> out = lif(torch.rand(4 * 2, 8, 5, 5) * 3)   # 4 steps of a batch of 2
    >>> lif.observations()["firing_rate"]           # recorded in eval mode
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from evefx.errors import OptionError, ShapeError
from evefx.modules.protocol import EveHooks, EveRange
from evefx.modules.surrogate import SURROGATES, surrogate as surrogate_class

__all__ = ["SpikingNeuron", "IFNeuron", "LIFNeuron", "PLIFNeuron", "multi_step"]


@dataclass(frozen=True)
class _Dynamics:
    """The static part of a neuron's recurrence (what the fused function needs besides tensors)."""

    derivative: Callable[[torch.Tensor, float], torch.Tensor]
    alpha: float
    hard: bool
    binary: bool
    time_dependent: bool
    leaky: bool
    parts: Callable[[torch.Tensor, float], tuple[torch.Tensor, float]] | None = None
    """The surrogate's ``derivative_parts`` (derivative = scale * tensor), for the fast backward."""
    relative: bool = False
    """The surrogate is taken on ``u / th`` (its width scales with the threshold): ``g'(u/th) / th``."""


def _surrogate_grad(dyn: _Dynamics, u: torch.Tensor, th: Any) -> torch.Tensor:
    """``g'(u)``, or ``g'(u/th)/th`` for a threshold-relative surrogate (``th`` detached)."""
    if not dyn.relative:
        return dyn.derivative(u, dyn.alpha)
    th = th.detach() if isinstance(th, torch.Tensor) else th
    return dyn.derivative(u / th, dyn.alpha).div_(th)


def _as_scalar(p: torch.Tensor | None) -> torch.Tensor | float | None:
    """A float for a fixed one-element CPU value (cheaper broadcasting), else the tensor itself
    (on an accelerator reading the value would synchronise)."""
    if p is None or p.requires_grad or p.numel() != 1 or p.device.type != "cpu":
        return p
    return float(p)


def _sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.sum_to_size(like.shape) if g.shape != like.shape else g


def _leak_input(x: torch.Tensor, k: Any, r: Any, dyn: _Dynamics) -> torch.Tensor:
    """``k x + k r`` (LIF, hard reset), ``k x`` (soft reset) or ``x`` (IF): the part of ``h_t``
    that does not depend on the membrane."""
    if not dyn.leaky:
        return x
    out = x * k
    if dyn.hard:
        out = out + k * r
    return out


def _integrate(X: torch.Tensor, v: Any, a: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h = X + a v`` for the step-by-step path; the fused forward runs the same kernels in place
    (``add_(v, alpha=a)`` / ``addcmul_(a, v)``), which is why the two agree bit for bit."""
    kwargs = {} if out is None else {"out": out}
    if isinstance(a, torch.Tensor):
        return torch.addcmul(X, a, v, **kwargs)
    if a == 1.0:
        return torch.add(X, v, **kwargs)
    return torch.add(X, v, alpha=a, **kwargs)


class _MultiStep(torch.autograd.Function):
    """The recurrence over ``T`` steps with a hand-written BPTT backward.

    Inputs: ``x`` ``[T, B, ...]``; ``th`` and ``r`` broadcastable to one step (``r`` None for a
    soft reset; tensors or floats); ``k`` the leak (tensor, float, or None for IF).
    Returns ``(out, h)``; ``h`` (pre-spike membrane) is not differentiable.

    The elementwise work is memory-bound, so both directions work in place on as few
    ``[T, B, ...]`` buffers as possible and the per-step loop runs only what depends on the
    previous step (three kernels forward, one backward).
    """

    @staticmethod
    def forward(ctx, x, th, r, k, dyn: _Dynamics):  # type: ignore[override]
        T = x.shape[0]
        r0 = r if dyn.hard else 0.0
        a = (1.0 - k) if dyn.leaky else 1.0
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        if dyn.leaky:  # h starts as the membrane-independent part k x (+ k r), see _leak_input
            torch.mul(x, k, out=h)
            if dyn.hard and not (isinstance(r0, float) and r0 == 0.0):  # a full pass saved for reset 0
                h.add_(k * r0)
        # a membrane starting at 0 adds nothing at step 0: skip the fill and that step's add
        zero_start = isinstance(r0, float) and r0 == 0.0
        # binary spikes with a reset to 0 or a soft reset are written straight into the float
        # output (the reset is then one multiply-add); other cases keep a bool mask for where()
        float_spikes = dyn.binary and (zero_start or not dyn.hard)
        s = torch.empty(x.shape, dtype=x.dtype if float_spikes else torch.bool, device=x.device)
        # the membrane between steps lives in one reused buffer
        v = torch.empty_like(h[0])
        if isinstance(r0, torch.Tensor):
            v.copy_(r0.detach().expand_as(v))
        elif not zero_start:
            v.fill_(r0)
        r_fill = r0.detach() if isinstance(r0, torch.Tensor) else torch.tensor(r0, dtype=x.dtype, device=x.device)
        for t in range(T):
            ht, st = h[t], s[t]
            if t == 0 and zero_start:
                if not dyn.leaky:
                    ht.copy_(x[0])
            elif not dyn.leaky:
                torch.add(x[t], v, out=ht)
            elif isinstance(a, torch.Tensor):
                ht.addcmul_(a, v)
            else:
                ht.add_(v, alpha=a)
            torch.ge(ht, th, out=st)
            if float_spikes:  # v = h - h s (reset to 0) or h - th s (soft): exact for s in {0, 1}
                if dyn.hard:
                    torch.addcmul(ht, ht, st, value=-1.0, out=v)
                elif isinstance(th, torch.Tensor):
                    torch.addcmul(ht, st, th, value=-1.0, out=v)
                else:
                    torch.add(ht, st, alpha=-th, out=v)
            elif dyn.hard:
                torch.where(st, r_fill, ht, out=v)
            else:
                torch.sub(ht, th, out=v)
                torch.where(st, v, ht, out=v)
        if float_spikes:
            out = s
        else:
            out = s.to(x.dtype) if dyn.binary else torch.where(s, h - th, 0.0)
        tensors = [t_ if isinstance(t_, torch.Tensor) else None for t_ in (th, r, k)]
        ctx.save_for_backward(h, x if isinstance(k, torch.Tensor) and k.requires_grad else None, *tensors)
        ctx.scalars = tuple(None if isinstance(t_, torch.Tensor) else t_ for t_ in (th, r, k))
        ctx.dyn = dyn
        ctx.mark_non_differentiable(h)
        # h has no gradient: without this autograd would fill a [T, B, ...] zero tensor for it
        ctx.set_materialize_grads(False)
        return out, h

    @staticmethod
    def backward(ctx, grad_out, _grad_h):  # type: ignore[override]
        dyn: _Dynamics = ctx.dyn
        if grad_out is None:  # the spikes did not reach the loss
            return None, None, None, None, None
        h, x, th_t, r_t, k_t = ctx.saved_tensors
        th = th_t if th_t is not None else ctx.scalars[0]
        r = (r_t if r_t is not None else ctx.scalars[1]) if dyn.hard else 0.0
        k = (k_t if k_t is not None else ctx.scalars[2]) if dyn.leaky else 1.0
        a = 1.0 - k if dyn.leaky else 1.0
        need_x, need_th, need_r, need_k = ctx.needs_input_grad[:4]
        T = h.shape[0]
        if (dyn.parts is not None and dyn.binary and not (need_th or need_r or need_k)
                and not isinstance(k, torch.Tensor)):
            return _fast_input_grad(grad_out, h, th, r, k, a, dyn) if need_x else None, None, None, None, None

        u = h - th
        sg = _surrogate_grad(dyn, u, th)
        # the spikes are only needed where something reads them (full passes are the cost here)
        need_fired = not dyn.binary or need_th or need_r or need_k
        fired = h >= th if need_fired else None
        # D = do_t/dh_t; G starts as dL/dh_t through step t's own output
        D = sg if dyn.binary else u.mul_(sg).add_(fired)
        G = grad_out * D
        g_th = -G if need_th else None
        rh_sg = None  # (r - h) * sg, the hard reset's dependence on the spike
        recurrent = dyn.time_dependent and T > 1
        if recurrent:
            # Q = dv_t/dh_t / a, through the reset and its spike; then G_t += a Q_t G_{t+1}
            # fewest full passes: (1 - s) + (r - h) sg  ==  (1 - s) - (h - r) sg; a scalar leak
            # goes into the recurrence's addcmul instead of costing a pass over Q
            scalar_a = not isinstance(a, torch.Tensor)
            if dyn.hard:
                Q = (~fired if fired is not None else h < th).to(h.dtype)
                hr = h if isinstance(r, float) and r == 0.0 else h - r
                if need_th:
                    rh_sg = -(hr * sg)
                Q.addcmul_(hr, sg, value=-1.0)
            else:
                Q = torch.mul(sg, -th).add_(1.0)
            if not scalar_a:
                Q.mul_(a)
            value = a if scalar_a else 1.0
            for t in range(T - 2, -1, -1):
                G[t].addcmul_(Q[t], G[t + 1], value=value)
        gv = None  # dL/dv_t = a G_{t+1}
        if recurrent and (need_th or need_r):
            gv = torch.zeros_like(G)
            torch.mul(G[1:], a, out=gv[:-1])
        grad_x = grad_th = grad_r = grad_k = None
        if need_th:
            if gv is not None:
                g_th = g_th - gv * rh_sg if dyn.hard else g_th + gv * (th * sg - fired.to(h.dtype))
            grad_th = _sum_to(g_th, th_t)
        if need_r and dyn.hard and (gv is not None or dyn.leaky):
            # through the reset (v_t = r where it fired) and through the leak toward r
            g = gv * fired if gv is not None else None
            if dyn.leaky:
                g = G * k if g is None else g + G * k
            grad_r = _sum_to(g, r_t)
        if need_k:
            # dh_t/dk = x_t - v_{t-1} + r, with v_{t-1} rebuilt from h and the spikes
            v_prev = torch.empty_like(h)
            v_prev[0] = r if dyn.hard else 0.0
            if T > 1:
                v_prev[1:] = torch.where(fired[:-1], r, h[:-1]) if dyn.hard else h[:-1] - th * fired[:-1]
            g = G * (x - v_prev + r) if dyn.hard else G * (x - v_prev)
            grad_k = _sum_to(g, k_t)
        if need_x:
            grad_x = G.mul_(k) if dyn.leaky and not (isinstance(k, float) and k == 1.0) else G
        return grad_x, grad_th, grad_r, grad_k, None


def _fast_input_grad(grad_out: torch.Tensor, h: torch.Tensor, th: Any, r: Any, k: float, a: float,
                     dyn: _Dynamics) -> torch.Tensor:
    """dL/dx of a binary neuron with fixed parameters (the common training case) in the fewest
    full passes: with ``sg = scale * d``, the factors ``scale`` and ``k`` ride along in the
    multiply-adds, and since the recurrence is linear ``G`` is carried already multiplied by ``k``."""
    if not dyn.relative:
        d, scale = dyn.parts(h - th, dyn.alpha)  # type: ignore[misc]
    elif isinstance(th, torch.Tensor):  # g'(u/th)/th: the per-channel 1/th goes into d
        d, scale = dyn.parts((h - th).div_(th), dyn.alpha)  # type: ignore[misc]
        d = d.div_(th)
    else:
        d, scale = dyn.parts((h - th).div_(th), dyn.alpha)  # type: ignore[misc]
        scale = scale / th
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    G = torch.addcmul(zero, grad_out, d, value=scale * k)  # k dL/dh_t through step t's own output
    if dyn.time_dependent and h.shape[0] > 1:
        # Q_t = dv_t/dh_t / a: (1 - s) - (h - r) sg for a hard reset, 1 - th sg for a soft one
        if dyn.hard:
            Q = (h < th).to(h.dtype)
            Q.addcmul_(h if isinstance(r, float) and r == 0.0 else h - r, d, value=-scale)
        elif isinstance(th, torch.Tensor):
            Q = torch.mul(d, th).mul_(-scale).add_(1.0)
        else:
            Q = torch.mul(d, -scale * th).add_(1.0)
        for t in range(h.shape[0] - 2, -1, -1):
            G[t].addcmul_(Q[t], G[t + 1], value=a)
    return G


def multi_step(
    x: torch.Tensor,
    threshold: torch.Tensor | float,
    reset: torch.Tensor | float | None,
    k: torch.Tensor | float | None,
    *,
    surrogate: str = "atan",
    alpha: float = 2.0,
    binary: bool = True,
    time_dependent: bool = True,
    relative: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the neuron recurrence over ``x`` ``[T, B, ...]`` in one fused autograd function.

    ``threshold``/``reset`` broadcast to one step (``reset=None``: soft reset); ``k = 1/tau``
    (None: IF). ``relative``: the surrogate's width scales with the threshold (``g'(u/th)/th``).
    Returns ``(output, pre-spike membrane h)``, both ``[T, B, ...]``.

    Example:
        >>> out, h = multi_step(torch.ones(3, 1), 1.0, 0.0, 0.5)
        >>> out.flatten().tolist(), h.flatten().tolist()
        ([0.0, 0.0, 0.0], [0.5, 0.75, 0.875])
    """
    cls = surrogate_class(surrogate)
    dyn = _Dynamics(cls.derivative, float(alpha), reset is not None, binary, time_dependent, k is not None,
                    cls.derivative_parts, relative)
    return _MultiStep.apply(x, threshold, reset, k, dyn)


class SpikingNeuron(EveHooks, nn.Module):
    """Base of the neurons (see the module docstring for the dynamics).

    Args:
        timesteps: ``T``; multi-step inputs are ``[T*B, ...]``.
        threshold: firing threshold (initial value when learnable).
        reset: hard-reset value; ``None`` for a soft reset (subtract the threshold).
        channels: number of channels (the ``channel_axis`` of one step); needed with ``neuron_wise``.
        channel_axis: the feature axis of one step ``[B, ...]``: 1 after a conv (``[B, C, H, W]``),
            -1 after a Linear or in a channels-last block (``[B, N, C]``, ``[B, H, W, C]``).
        neuron_wise: one threshold/reset per channel instead of one for the layer.
        learnable_threshold / learnable_reset: train them by gradient (``nn.Parameter``).
        time_dependent: False detaches the membrane between steps.
        binary: False emits ``h - threshold`` where the neuron fires instead of 1.
        surrogate / alpha: the surrogate gradient (see :mod:`evefx.modules.surrogate`).
        relative_surrogate: take the surrogate on ``u / threshold``, so its width scales with the
            threshold: ``g'(u/th)/th`` (the same as before at threshold 1). A low threshold then gets
            a narrow, tall surrogate instead of one that is flat across the membrane's whole range.
        threshold_std: data-dependent threshold: at the first forward (training, or eval when never
            trained) the threshold is set to ``threshold_std`` standard deviations of the layer's
            input current on that batch (``x/tau`` for LIF/PLIF, ``x`` for IF), one value per
            layer; ``threshold`` is only the value until then. ``None``: ``threshold`` as given.
            The buffer ``threshold_ready`` records that it happened (saved with the state dict).
        upgrade: expose ``threshold`` (and LIF's ``tau``) as eve parameters for the upgrader.
        ann_slope: negative slope of the LeakyReLU that LIF/PLIF become in non-spiking mode.
        record_in_training: also gather observations in training mode (multi-step forwards
            always record in eval mode; the statistics cost a few reductions per forward).
    """

    leaky = False

    def __init__(
        self,
        timesteps: int = 8,
        threshold: float = 1.0,
        reset: float | None = 0.0,
        *,
        channels: int | None = None,
        channel_axis: int = 1,
        neuron_wise: bool = False,
        learnable_threshold: bool = False,
        learnable_reset: bool = False,
        time_dependent: bool = True,
        binary: bool = True,
        surrogate: str = "atan",
        alpha: float = 2.0,
        upgrade: bool = False,
        ann_slope: float = 0.01,
        threshold_range: tuple[float, float] = (0.1, 4.0),
        record_in_training: bool = False,
        relative_surrogate: bool = False,
        threshold_std: float | None = None,
    ):
        super().__init__()
        if timesteps < 1:
            raise OptionError(f"timesteps must be >= 1 (got {timesteps})")
        if neuron_wise and not channels:
            raise OptionError("neuron_wise=True needs channels=<number of channels> (the size of channel_axis)")
        if channel_axis == 0:
            raise OptionError("channel_axis cannot be 0: dim 0 is the (time-folded) batch")
        if surrogate not in SURROGATES:
            raise OptionError(f"unknown surrogate {surrogate!r}; valid names: {', '.join(SURROGATES)}")
        if threshold_std is not None and not threshold_std > 0:
            raise OptionError(f"threshold_std must be > 0 (got {threshold_std})")
        if learnable_reset and reset is None:
            raise OptionError("learnable_reset needs a hard reset value (reset=None means soft reset)")
        self.timesteps = int(timesteps)
        self.channels = channels
        self.channel_axis = int(channel_axis)
        self.neuron_wise = bool(neuron_wise)
        self.time_dependent = bool(time_dependent)
        self.binary = bool(binary)
        self.surrogate = surrogate
        self.alpha = float(alpha)
        self.upgrade = bool(upgrade)
        self.ann_slope = float(ann_slope)
        self.threshold_range = threshold_range
        self.record_in_training = bool(record_in_training)
        self.relative_surrogate = bool(relative_surrogate)
        self.threshold_std = None if threshold_std is None else float(threshold_std)
        shape = (channels,) if neuron_wise else ()
        self._register("threshold", torch.full(shape, float(threshold)), learnable_threshold)
        if self.threshold_std is not None:
            self.register_buffer("threshold_ready", torch.tensor(False))
        if reset is None:
            self.reset = None
        else:
            self._register("reset", torch.full(shape, float(reset)), learnable_reset)
        self.spiking = True
        self.step_mode = "multi"
        self._v: torch.Tensor | None = None
        self._stats: dict[str, Any] | None = None
        self._stats_stale = True

    def _register(self, name: str, value: torch.Tensor, learnable: bool) -> None:
        if learnable:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    # -- the leak (overridden by LIF/PLIF) ------------------------------------------------------
    def leak(self) -> torch.Tensor | float | None:
        """``k = 1/tau`` (a float, or a tensor when learned); None for IF."""
        return None

    # -- eve protocol --------------------------------------------------------------------------------
    def eve_ranges(self) -> dict[str, EveRange]:
        return {"threshold": EveRange(*self.threshold_range)} if self.upgrade else {}

    def set_mode(self, **flags: Any) -> None:
        if flags.get("spiking") is not None:
            self.spiking = bool(flags["spiking"])
        if flags.get("step") is not None:
            if flags["step"] not in ("single", "multi"):
                raise OptionError(f"set_mode(step={flags['step']!r}): step must be 'single' or 'multi'")
            self.step_mode = flags["step"]
            self._v = None

    def reset_state(self) -> None:
        """Forget the membrane (single-step mode). Statistics stay readable until the next forward."""
        self._v = None
        self._stats_stale = True

    def observations(self) -> dict[str, float]:
        """``firing_rate`` (spikes per neuron per step), ``membrane`` (mean pre-spike potential) and
        ``silent_channels`` (fraction of channels that never fired), over the last multi-step
        forward in eval mode (any mode with ``record_in_training``) or the single steps since the
        last reset."""
        if self._stats is None:
            return {}
        rates = self.channel_firing_rates()
        return {
            "firing_rate": float(self._stats["spikes"].sum() / max(self._stats["count"] * rates.numel(), 1)),
            "membrane": float(self._stats["v_sum"] / max(self._stats["v_n"], 1)),
            "silent_channels": float((rates == 0).double().mean()),
        }

    def channel_firing_rates(self) -> torch.Tensor:
        """Firing rate of every channel (``channel_axis`` of a step), as a float64 tensor ``[C]``.

        Example:
            >>> neuron.channel_firing_rates()[:3]
            tensor([0.1250, 0.0000, 0.5000], dtype=torch.float64)
        """
        if self._stats is None:
            return torch.zeros(0, dtype=torch.float64)
        return self._stats["spikes"] / max(self._stats["count"], 1)

    @torch.no_grad()
    def _record(self, out: torch.Tensor, h: torch.Tensor, restart: bool) -> None:
        """Accumulate spike counts per channel (``channel_axis`` of a step in ``[T, B, ...]``)."""
        fired = out if self.binary else (out != 0).to(out.dtype)
        if fired.dim() > 2:
            cdim = self.channel_axis % (fired.dim() - 1) + 1
            dims = [d for d in range(fired.dim()) if d != cdim]
            spikes = fired.sum(dim=dims).double()
            count = fired.numel() // fired.shape[cdim]
        else:
            spikes = fired.sum().double().reshape(1)
            count = fired.numel()
        if restart or self._stats is None or self._stats["spikes"].shape != spikes.shape:
            self._stats = {"spikes": spikes, "count": count, "v_sum": float(h.sum()), "v_n": h.numel()}
        else:
            self._stats["spikes"] = self._stats["spikes"] + spikes
            self._stats["count"] += count
            self._stats["v_sum"] += float(h.sum())
            self._stats["v_n"] += h.numel()

    # -- forward --------------------------------------------------------------------------------------
    def _shaped(self, p: torch.Tensor | None, step_ndim: int) -> torch.Tensor | None:
        """A per-channel ``[C]`` tensor viewed to broadcast over one step along ``channel_axis``."""
        if p is None or p.dim() == 0:
            return p
        return p.view(p.shape[0], *([1] * (step_ndim - 1 - self.channel_axis % step_ndim)))

    def _dynamics(self) -> _Dynamics:
        cls = surrogate_class(self.surrogate)
        return _Dynamics(cls.derivative, self.alpha, self.reset is not None, self.binary, self.time_dependent,
                         self.leaky, cls.derivative_parts, self.relative_surrogate)

    @torch.no_grad()
    def _init_threshold(self, x: torch.Tensor) -> None:
        """Data-dependent threshold: ``threshold_std`` standard deviations of this batch's input
        current. Why: a fixed threshold of 1 sits several deviations above the current of a layer
        without BatchNorm (or of any layer once LIF divides by tau), so the neurons barely fire at
        the start and the first epochs learn little (docs/spiking.md)."""
        k = self.leak()
        k = float(k.detach()) if isinstance(k, torch.Tensor) else (1.0 if k is None else k)
        std = float(x.detach().float().std()) * k if x.numel() > 1 else 0.0
        self.threshold.fill_(self.threshold_std * std if std > 0 else float(self.threshold.mean()))
        self.threshold_ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking:
            return F.leaky_relu(x, self.ann_slope) if self.leaky else F.relu(x)
        if self.threshold_std is not None and not bool(self.threshold_ready):
            self._init_threshold(x)
        axis = self.channel_axis
        if self.neuron_wise and (x.dim() < 2 or not -x.dim() <= axis < x.dim() or x.shape[axis] != self.channels):
            got = x.shape[axis] if x.dim() > 1 and -x.dim() <= axis < x.dim() else 1
            raise ShapeError(
                f"{type(self).__name__} has {self.channels} per-channel thresholds but its input has shape "
                f"{tuple(x.shape)} (channels are dim {self.channel_axis}); build it with channels={got} or "
                f"the channel_axis of the layer it follows (1 after a conv, -1 after a Linear)"
            )
        if self.step_mode == "single":
            return self._single_step(x)
        T = self.timesteps
        if x.shape[0] % T:
            raise ShapeError(
                f"{type(self).__name__} runs {T} timesteps, so its input's first dim must be T*batch; got "
                f"{tuple(x.shape)}. Feed the time-folded batch (an encoder does that) or use set_mode(step='single')."
            )
        xs = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        th = _as_scalar(self._shaped(self.threshold, x.dim()))
        r = _as_scalar(self._shaped(self.reset, x.dim()))
        k = self.leak()
        out, h = _MultiStep.apply(xs, th, r, k, self._dynamics())
        if self.record_in_training or not self.training:
            self._record(out, h, restart=True)
        return out.reshape(x.shape)

    def _single_step(self, x: torch.Tensor) -> torch.Tensor:
        """One step with ordinary autograd: the reference the fused path is tested against."""
        dyn = self._dynamics()
        th = self._shaped(self.threshold, x.dim())
        r = self._shaped(self.reset, x.dim()) if dyn.hard else 0.0
        k = self.leak()
        a = (1.0 - k) if dyn.leaky else 1.0
        v = self._v
        if v is None:
            v = r.detach() if isinstance(r, torch.Tensor) else torch.zeros((), dtype=x.dtype, device=x.device) + r
        h = _integrate(_leak_input(x, k, r, dyn), v, a)
        u = h - th
        spike = surrogate_class(self.surrogate).apply(u / th.detach() if dyn.relative else u, self.alpha)
        out = spike if dyn.binary else spike * u
        v = h * (1.0 - spike) + r * spike if dyn.hard else h - th * spike
        self._v = v if dyn.time_dependent else v.detach()
        restart = self._stats_stale
        self._stats_stale = False
        self._record(out.detach().unsqueeze(0), h.detach(), restart=restart)
        return out

    def extra_repr(self) -> str:
        reset = "soft" if self.reset is None else f"hard to {self.get_eve('reset'):g}"
        return (f"timesteps={self.timesteps}, threshold={self.get_eve('threshold'):g}, reset={reset}, "
                f"surrogate={self.surrogate}(alpha={self.alpha:g}), neuron_wise={self.neuron_wise}, "
                + (f"channel_axis={self.channel_axis}, " if self.channel_axis != 1 else "") +
                f"mode={'spiking' if self.spiking else 'ann'}/{self.step_mode}")


class IFNeuron(SpikingNeuron):
    """Integrate-and-fire neuron: ``h_t = v_{t-1} + x_t``; ReLU in non-spiking mode.

    Example:
        >>> IFNeuron(timesteps=2)(torch.tensor([[0.6], [0.6]])).flatten().tolist()
        [0.0, 1.0]
    """


class LIFNeuron(SpikingNeuron):
    """Leaky integrate-and-fire: ``h_t = v + (x_t - (v - reset)) / tau``; LeakyReLU in non-spiking mode.

    ``tau`` is a buffer (saved with the state dict); with ``upgrade=True`` it is an eve parameter
    in ``tau_range``.

    Example:
        >>> LIFNeuron(timesteps=3, tau=2.0)(torch.ones(3, 1)).flatten().tolist()
        [0.0, 0.0, 0.0]
    """

    leaky = True

    def __init__(self, timesteps: int = 8, threshold: float = 1.0, reset: float | None = 0.0, *, tau: float = 2.0,
                 tau_range: tuple[float, float] = (1.0, 16.0), **kwargs: Any):
        super().__init__(timesteps, threshold, reset, **kwargs)
        if tau < 1.0:
            raise OptionError(f"tau must be >= 1 (got {tau}); tau = 1 means no memory")
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.tau_range = tau_range

    def leak(self) -> float:
        return 1.0 / float(self.tau)

    def eve_ranges(self) -> dict[str, EveRange]:
        ranges = super().eve_ranges()
        if self.upgrade:
            ranges["tau"] = EveRange(*self.tau_range)
        return ranges

    def extra_repr(self) -> str:
        return f"tau={float(self.tau):g}, " + super().extra_repr()


class PLIFNeuron(SpikingNeuron):
    """LIF whose time constant is learned: ``1/tau = sigmoid(w)``, ``w`` a parameter initialised
    from ``tau`` (Fang et al. 2021). LeakyReLU in non-spiking mode.

    Example:
        >>> n = PLIFNeuron(timesteps=4, tau=2.0); round(float(n.tau), 4)
        2.0
    """

    leaky = True

    def __init__(self, timesteps: int = 8, threshold: float = 1.0, reset: float | None = 0.0, *, tau: float = 2.0,
                 **kwargs: Any):
        super().__init__(timesteps, threshold, reset, **kwargs)
        if tau <= 1.0:
            raise OptionError(f"PLIF needs tau > 1 (got {tau}): 1/tau = sigmoid(w) lies in (0, 1)")
        self.w = nn.Parameter(torch.tensor(-math.log(float(tau) - 1.0)))

    @property
    def tau(self) -> torch.Tensor:
        return 1.0 / torch.sigmoid(self.w.detach())

    def leak(self) -> torch.Tensor:
        return torch.sigmoid(self.w)

    def extra_repr(self) -> str:
        return f"tau={float(self.tau):.3g} (learned), " + super().extra_repr()
