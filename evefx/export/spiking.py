"""Export stand-ins of the spiking modules: the recurrence unrolled over the timesteps.

A neuron's multi-step forward runs a fused autograd function that writes into preallocated
buffers, which a tracer cannot follow. :class:`UnrolledNeuron` instead drives the neuron's own
single-step path ``T`` times, so the ONNX graph holds ``T`` copies of the step (compare, select,
multiply-add) and the file keeps the module's call signature ``[B, ...] -> [B, ...]``. The
single-step path computes the same values as the fused one.

:class:`RandomPoisson` is the Poisson encoder in ONNX: ``RandomUniformLike`` draws fresh noise at
every run, so the file's spike trains are random (not torch's stream, whatever the seed); a
deterministic deployment uses the direct encoder.

Example:
    >>> UnrolledNeuron(LIFNeuron(timesteps=4))(torch.rand(8, 3)).shape
    torch.Size([8, 3])
"""
from __future__ import annotations

import torch
from torch import nn

from evefx.errors import ExportError
from evefx.modules.encoding import PoissonEncoder
from evefx.modules.neurons import SpikingNeuron

__all__ = ["UnrolledNeuron", "RandomPoisson", "spiking_standin", "is_stochastic", "require_threshold"]


class UnrolledNeuron(nn.Module):
    """A spiking neuron run step by step over the ``T`` steps of a time-folded batch ``[T*B, ...]``.

    Example:
        >>> UnrolledNeuron(neuron)(x)   # equals neuron(x) in multi-step mode
    """

    def __init__(self, neuron: SpikingNeuron):
        super().__init__()
        self.neuron = neuron
        self.timesteps = int(neuron.timesteps)
        self.spiking = bool(neuron.spiking)
        self.neuron.set_mode(step="single")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking:
            return self.neuron(x)
        steps = x.reshape(self.timesteps, -1, *x.shape[1:])
        self.neuron.reset_state()
        out = torch.stack([self.neuron(steps[t]) for t in range(self.timesteps)])
        self.neuron.reset_state()
        return out.reshape(x.shape)


class RandomPoisson(nn.Module):
    """Poisson rate coding written with ``rand_like`` (ONNX ``RandomUniformLike``).

    Example:
        >>> RandomPoisson(8)(torch.rand(2, 4)).shape
        torch.Size([16, 4])
    """

    def __init__(self, timesteps: int, spiking: bool = True):
        super().__init__()
        self.timesteps = int(timesteps)
        self.spiking = spiking

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spiking:
            return x
        p = x.clamp(0.0, 1.0).unsqueeze(0).expand(self.timesteps, *x.shape)
        spikes = (torch.rand_like(p) < p).to(x.dtype)
        return spikes.reshape(-1, *x.shape[1:])


def require_threshold(neuron: SpikingNeuron, name: str) -> None:
    """Refuse a neuron whose data-dependent threshold (``threshold_std``) was never set: PyTorch
    sets it from the first batch it sees, an export from its example inputs.

    Example:
        >>> require_threshold(gm.get_submodule("features_0_neuron"), "features_0_neuron")
    """
    if neuron.spiking and neuron.threshold_pending:
        raise ExportError(
            f"{name}: the data-dependent threshold (threshold_std) was never set (no batch has passed "
            f"through the neuron), so the file and PyTorch would each take it from different data; "
            f"train the model, or run it once on real inputs, before exporting"
        )


def spiking_standin(module: nn.Module, name: str) -> nn.Module | None:
    """The export stand-in of a spiking module, or None when it exports as it is.

    Example:
        >>> type(spiking_standin(LIFNeuron(timesteps=4), "features.0.neuron")).__name__
        'UnrolledNeuron'
    """
    if isinstance(module, SpikingNeuron):
        if module.step_mode != "multi":
            raise ExportError(
                f"{name}: {type(module).__name__} is in single-step mode; export runs whole sequences, "
                f"so call set_mode(gm, step='multi') before exporting"
            )
        require_threshold(module, name)
        return UnrolledNeuron(module)
    if isinstance(module, PoissonEncoder):
        if module.step_mode != "multi":
            raise ExportError(f"{name}: the Poisson encoder is in single-step mode; call set_mode(gm, step='multi')")
        return RandomPoisson(module.timesteps, module.spiking)
    return None


def is_stochastic(model: nn.Module) -> bool:
    """True when the model draws random numbers in eval mode (a spiking Poisson encoder).

    Example:
        >>> is_stochastic(nn.Sequential(PoissonEncoder(4), nn.Flatten()))
        True
    """
    return any(isinstance(m, PoissonEncoder) and m.spiking for m in model.modules())
