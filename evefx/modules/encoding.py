"""Encoders turn one input ``[B, ...]`` into ``T`` steps, time-folded as ``[T*B, ...]``; the decoder
turns ``[T*B, ...]`` back into ``[B, ...]``. Together they keep a spiking network's call signature.

Time is step-major: rows ``t*B .. t*B+B-1`` hold step ``t`` (what the neurons expect).

In single-step mode (``set_mode(step="single")``) an encoder produces one step ``[B, ...]`` per
call and the decoder passes each step through, so a user can drive the steps and average.
In non-spiking mode (``set_mode(spiking=False)``) all three are the identity: the network runs
once on the analog input, as the ANN it came from.

Example:
    >>> enc, dec = PoissonEncoder(8, seed=0), MeanDecoder(8)
    >>> enc(torch.rand(2, 1, 28, 28)).shape, dec(torch.rand(16, 10)).shape
    (torch.Size([16, 1, 28, 28]), torch.Size([2, 10]))
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from evefx.errors import OptionError, ShapeError
from evefx.modules.protocol import EveHooks

__all__ = ["PoissonEncoder", "DirectEncoder", "MeanDecoder"]


class _TimeModule(EveHooks, nn.Module):
    def __init__(self, timesteps: int):
        super().__init__()
        if timesteps < 1:
            raise OptionError(f"timesteps must be >= 1 (got {timesteps})")
        self.timesteps = int(timesteps)
        self.spiking = True
        self.step_mode = "multi"

    def set_mode(self, **flags: Any) -> None:
        if flags.get("spiking") is not None:
            self.spiking = bool(flags["spiking"])
        if flags.get("step") is not None:
            self.step_mode = flags["step"]

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}"


class DirectEncoder(_TimeModule):
    """The analog input repeated at every step (the first layer sees the same image T times).

    Example:
        >>> DirectEncoder(3)(torch.ones(2, 4)).shape
        torch.Size([6, 4])
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking or self.step_mode == "single":
            return x
        return x.unsqueeze(0).expand(self.timesteps, *x.shape).reshape(self.timesteps * x.shape[0], *x.shape[1:])


class PoissonEncoder(_TimeModule):
    """Rate coding: at every step each input element spikes with probability ``clamp(x, 0, 1)``.

    Randomness: with ``seed`` given, the encoder owns a ``torch.Generator`` seeded with it (created
    on the input's device at first use, copied by ``deepcopy``, reseeded by :meth:`reseed`), so its
    spike trains are reproducible and independent of the global RNG. With ``generator`` the
    caller's generator is used. With neither, it draws from torch's global RNG
    (``torch.manual_seed`` makes it reproducible). No gradient flows to the input.

    Example:
        >>> enc = PoissonEncoder(4, seed=0)
        >>> enc(torch.tensor([[0.0, 1.0]])).flatten().tolist()
        [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    """

    def __init__(self, timesteps: int, seed: int | None = None, generator: torch.Generator | None = None):
        super().__init__(timesteps)
        self.seed = seed
        self.generator = generator

    def reseed(self, seed: int | None = None) -> None:
        """Restart the spike trains from ``seed`` (default: the constructor's seed)."""
        self.seed = self.seed if seed is None else seed
        self.generator = None

    def _gen(self, device: torch.device) -> torch.Generator | None:
        if self.generator is None and self.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking:
            return x
        T = 1 if self.step_mode == "single" else self.timesteps
        p = x.detach().clamp(0.0, 1.0)
        noise = torch.rand((T, *x.shape), dtype=p.dtype, device=p.device, generator=self._gen(p.device))
        out = (noise < p).to(p.dtype)
        return out.reshape(T * x.shape[0], *x.shape[1:])

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, seed={self.seed}"


class MeanDecoder(_TimeModule):
    """``[T*B, ...] -> [B, ...]``: the mean over the ``T`` steps (a rate or mean membrane readout),
    times ``gain`` (in every mode). The spike pass sets ``gain`` to ``1/weight_scale_no_bn`` when
    the output comes straight from a layer whose weights it multiplied by that, so the
    network's output is unchanged; a state dict from before ``gain`` existed loads with gain 1.

    Example:
        >>> MeanDecoder(2)(torch.tensor([[1.0], [3.0]])).tolist()
        [[2.0]]
    """

    def __init__(self, timesteps: int, gain: float = 1.0):
        super().__init__(timesteps)
        if not gain > 0:
            raise OptionError(f"gain must be > 0 (got {gain})")
        self.register_buffer("gain", torch.tensor(float(gain)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        state_dict.setdefault(prefix + "gain", torch.tensor(1.0))  # saved before the gain: trained without one
        super()._load_from_state_dict(state_dict, prefix, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking or self.step_mode == "single":
            return x * self.gain if x.is_floating_point() else x
        T = self.timesteps
        if x.shape[0] % T:
            raise ShapeError(f"MeanDecoder averages {T} timesteps, so the first dim must be T*batch; got {tuple(x.shape)}")
        return x.reshape(T, x.shape[0] // T, *x.shape[1:]).mean(0) * self.gain

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", gain={float(self.gain):.4g}" if float(self.gain) != 1.0 else "")
