"""The neuron recurrence over ``T`` steps as one autograd function with a hand-written BPTT backward.

:class:`~evefx.modules.neurons.SpikingNeuron` runs its multi-step forward through :func:`multi_step`'s
function (dynamics in :mod:`evefx.modules.neurons`). The forward saves only the pre-spike membrane
``h`` (spikes are recomputed as ``h >= th``); the backward folds the time recurrence into one fused
multiply-add per step and does everything else on all steps at once. It matches the step-by-step
loop of single-step mode (forward exactly, gradients to rounding).

Example:
    >>> out, h = multi_step(torch.ones(3, 1), 1.0, 0.0, 0.5)
    >>> out.flatten().tolist()
    [0.0, 0.0, 0.0]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from evefx.modules.surrogate import surrogate as surrogate_class

__all__ = ["multi_step", "Dynamics", "MultiStep", "leak_input", "integrate", "as_scalar"]



@dataclass(frozen=True)
class Dynamics:
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

    @classmethod
    def of(cls, surrogate: str, alpha: float, *, hard: bool, binary: bool, time_dependent: bool, leaky: bool,
           relative: bool) -> Dynamics:
        """The dynamics with surrogate ``surrogate`` (a name of :data:`~evefx.modules.surrogate.SURROGATES`).

        Example:
            >>> Dynamics.of("atan", 2.0, hard=True, binary=True, time_dependent=True, leaky=True, relative=False).hard
            True
        """
        fn = surrogate_class(surrogate)
        return cls(fn.derivative, float(alpha), hard, binary, time_dependent, leaky, fn.derivative_parts, relative)


def _surrogate_grad(dyn: Dynamics, u: torch.Tensor, th: Any) -> torch.Tensor:
    """``g'(u)``, or ``g'(u/th)/th`` for a threshold-relative surrogate (``th`` detached)."""
    if not dyn.relative:
        return dyn.derivative(u, dyn.alpha)
    th = th.detach() if isinstance(th, torch.Tensor) else th
    return dyn.derivative(u / th, dyn.alpha).div_(th)


def as_scalar(p: torch.Tensor | None) -> torch.Tensor | float | None:
    """A float for a fixed one-element CPU value (cheaper broadcasting), else the tensor itself
    (on an accelerator reading the value would synchronise)."""
    if p is None or p.requires_grad or p.numel() != 1 or p.device.type != "cpu":
        return p
    return float(p)


def _sum_to(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return g.sum_to_size(like.shape) if g.shape != like.shape else g


def leak_input(x: torch.Tensor, k: Any, r: Any, dyn: Dynamics) -> torch.Tensor:
    """``k x + k r`` (LIF, hard reset), ``k x`` (soft reset) or ``x`` (IF): the part of ``h_t``
    that does not depend on the membrane."""
    if not dyn.leaky:
        return x
    out = x * k
    if dyn.hard:
        out = out + k * r
    return out


def integrate(X: torch.Tensor, v: Any, a: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """``h = X + a v`` for the step-by-step path; the fused forward runs the same kernels in place
    (``add_(v, alpha=a)`` / ``addcmul_(a, v)``), which is why the two agree bit for bit."""
    kwargs: dict[str, Any] = {} if out is None else {"out": out}
    if isinstance(a, torch.Tensor):
        return torch.addcmul(X, a, v, **kwargs)
    if a == 1.0:
        return torch.add(X, v, **kwargs)
    return torch.add(X, v, alpha=a, **kwargs)


class MultiStep(torch.autograd.Function):
    """The recurrence over ``T`` steps with a hand-written BPTT backward.

    Inputs: ``x`` ``[T, B, ...]``; ``th`` and ``r`` broadcastable to one step (``r`` None for a
    soft reset; tensors or floats); ``k`` the leak (tensor, float, or None for IF).
    Returns ``(out, h)``; ``h`` (pre-spike membrane) is not differentiable.

    The elementwise work is memory-bound, so both directions work in place on as few
    ``[T, B, ...]`` buffers as possible and the per-step loop runs only what depends on the
    previous step (three kernels forward, one backward).
    """

    @staticmethod
    def forward(ctx, x, th, r, k, dyn: Dynamics):
        T = x.shape[0]
        r0 = r if dyn.hard else 0.0
        a = (1.0 - k) if dyn.leaky else 1.0
        h = torch.empty_like(x, memory_format=torch.contiguous_format)
        if dyn.leaky:  # h starts as the membrane-independent part k x (+ k r), see leak_input
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
    def backward(ctx: Any, grad_out: torch.Tensor | None, _grad_h: Any):
        dyn: Dynamics = ctx.dyn
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
            assert fired is not None  # need_fired covers need_k
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
                     dyn: Dynamics) -> torch.Tensor:
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
    dyn = Dynamics.of(surrogate, alpha, hard=reset is not None, binary=binary, time_dependent=time_dependent,
                      leaky=k is not None, relative=relative)
    return MultiStep.apply(x, threshold, reset, k, dyn)

