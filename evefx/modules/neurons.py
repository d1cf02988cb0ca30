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
autograd function whose backward is written by hand (BPTT, :mod:`evefx.modules.neuron_recurrence`).
It matches the step-by-step loop (forward exactly, gradients to rounding). The state is reset at
every multi-step forward.

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

import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evefx.errors import OptionError, ShapeError
from evefx.modules.neuron_recurrence import Dynamics, MultiStep, as_scalar, integrate, leak_input, multi_step
from evefx.modules.protocol import EveHooks, EveRange
from evefx.modules.surrogate import SURROGATES, surrogate as surrogate_class

__all__ = ["SpikingNeuron", "IFNeuron", "LIFNeuron", "PLIFNeuron", "multi_step"]

_THRESHOLD_MARGIN = 1e-3
"""How far above its reset value a learned threshold is kept (see ``_keep_threshold_above_reset``)."""


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
        input_gain: the neuron integrates ``input_gain * x``. The spike pass sets it to
            ``1/weight_scale_no_bn`` after a selected layer without BatchNorm, whose weights it multiplies by that,
            so the layer and neuron compute the same as before while Adam's steps on the weights are
            longer relative to their size (docs/spiking.md). A buffer, saved with the state dict; a
            state dict from before it loads with gain 1, as it was trained.
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
    threshold: torch.Tensor  # a buffer, or a Parameter when learnable
    reset: torch.Tensor | None  # None: soft reset

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
        input_gain: float = 1.0,
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
        if not input_gain > 0:
            raise OptionError(f"input_gain must be > 0 (got {input_gain})")
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
        self.register_buffer("input_gain", torch.tensor(float(input_gain)))
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

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # a state saved before ``input_gain`` existed was trained without one: its weights are unscaled
        state_dict.setdefault(prefix + "input_gain", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args)

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

    def _dynamics(self) -> Dynamics:
        return Dynamics.of(self.surrogate, self.alpha, hard=self.reset is not None, binary=self.binary,
                           time_dependent=self.time_dependent, leaky=self.leaky, relative=self.relative_surrogate)

    @property
    def threshold_pending(self) -> bool:
        """True while a data-dependent threshold (``threshold_std``) waits for its first batch.

        Example:
            >>> LIFNeuron(timesteps=4, threshold_std=1.0).threshold_pending
            True
        """
        return self.threshold_std is not None and not bool(self.threshold_ready)

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

    @torch.no_grad()
    def _keep_threshold_above_reset(self) -> None:
        """A learned threshold is kept ``_THRESHOLD_MARGIN`` above the reset value (0 for a soft
        reset) before every forward. Why: Adam moves it by about its learning rate per step whatever
        the gradient, and a data-dependent threshold can be 0.1 or less, so within a hundred steps it
        crossed the reset, after which the neuron fired at every step and training collapsed to
        chance (docs/spiking.md)."""
        reset = self.reset.detach() if isinstance(self.reset, torch.Tensor) else torch.zeros(())
        floor = (reset.to(self.threshold.dtype) + _THRESHOLD_MARGIN).expand_as(self.threshold)
        if bool((self.threshold < floor).any()):  # in place only then: a single-step graph may hold it
            torch.maximum(self.threshold, floor, out=self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.input_gain
        if not self.spiking:
            return F.leaky_relu(x, self.ann_slope) if self.leaky else F.relu(x)
        if self.threshold_pending:
            self._init_threshold(x)
        if isinstance(self.threshold, nn.Parameter):
            self._keep_threshold_above_reset()
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
        th = as_scalar(self._shaped(self.threshold, x.dim()))
        r = as_scalar(self._shaped(self.reset, x.dim()))
        k = self.leak()
        # under autocast the input arrives in bf16/fp16 while threshold and leak stay float32: the
        # membrane is integrated in float32 (the fused recurrence writes into one dtype, and a bf16
        # membrane summed over the steps would move spikes); a model cast to half stays in half
        floor = torch.float32 if torch.is_autocast_enabled(xs.device.type) else xs.dtype
        wide = functools.reduce(torch.promote_types, [t.dtype for t in (th, r, k) if isinstance(t, torch.Tensor)
                                                      and t.is_floating_point()], torch.promote_types(xs.dtype, floor))
        out, h = MultiStep.apply(xs.to(wide), th, r, k, self._dynamics())
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
        h = integrate(leak_input(x, k, r, dyn), v, a)
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
                + (f"input_gain={float(self.input_gain):.4g}, " if float(self.input_gain) != 1.0 else "") +
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
