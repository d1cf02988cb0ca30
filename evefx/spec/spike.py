"""``kind: spike``: turn a network into a spiking neural network trained with surrogate gradients."""
from __future__ import annotations

from typing import Literal

from evefx.spec.base import Bounded, Section, StrictModel

__all__ = ["SurrogateConfig", "NeuronConfig", "SpikeSection", "SURROGATES"]

SURROGATES = (
    "sigmoid",
    "piecewise_quadratic",
    "soft_sign",
    "atan",
    "nonzero_sign_log_abs",
    "erf",
    "piecewise_leaky_relu",
    "fast_sigmoid",
    "triangle",
)


class SurrogateConfig(StrictModel):
    """Heaviside forward, smooth derivative backward."""

    name: Literal[SURROGATES] = "atan"
    """Which surrogate derivative (see ``evefx.modules.surrogate``)."""
    alpha: Bounded(float, 0.0, 1000.0, low_open=True) = 2.0
    """Sharpness of the surrogate: larger is closer to the true step."""
    relative: bool = True
    """The surrogate's width scales with the threshold: its derivative is taken on
    ``u / threshold`` (``g'(u/th) / th``), so ``alpha`` is the sharpness in units of the threshold.
    At threshold 1 this is the plain ``g'(u)``; with a data-dependent threshold (often 0.1-0.5)
    a fixed-width surrogate would be flat across the membrane's whole range. ``false``: ``g'(u)``."""


class NeuronConfig(StrictModel):
    """The spiking neuron that replaces the activation."""

    type: Literal["if", "lif", "plif"] = "lif"
    """if: integrate and fire; lif: leaky (time constant ``tau``); plif: leaky with a learned tau."""
    threshold: Bounded(float, 0.0, 1e6, low_open=True) | None = None
    """Membrane potential at which the neuron fires (its initial value when learnable).
    ``null`` (default): data-dependent, set at the first training batch to ``threshold_std``
    standard deviations of the layer's input current (see ``threshold_std``)."""
    threshold_std: Bounded(float, 0.0, 1e6, low_open=True) = 1.0
    """Only with ``threshold: null``: the threshold in standard deviations of the layer's input
    current on the first training batch (``x / tau`` for lif/plif, ``x`` for if), one per layer."""
    reset: float | None = 0.0
    """Hard reset to this value after a spike; ``null`` for a soft reset (subtract the threshold)."""
    tau: Bounded(float, 1.0, 1e6) = 2.0
    """Membrane time constant of lif/plif (its initial value for plif)."""
    learnable_threshold: bool = False
    learnable_reset: bool = False
    neuron_wise: bool = True
    """One threshold/reset per channel instead of one per layer."""
    time_dependent: bool = True
    """False: the membrane is detached from the graph between steps (no BPTT through v)."""
    binary: bool = True
    """False: emit ``v - threshold`` where the neuron fires (an analog spike) instead of 1."""
    surrogate: SurrogateConfig = SurrogateConfig()


class SpikeSection(Section):
    """Insert spiking neurons after the selected layers; encode inputs, decode outputs over time.

    Example (YAML):
        - kind: spike
          timesteps: 8
          neuron: {type: lif, surrogate: {name: atan, alpha: 2.0}}
    """

    kind: Literal["spike"]
    exclude_last: bool = True
    """The classifier layer stays analog: it reads the spikes out."""
    timesteps: Bounded(int, 1, 4096) = 8
    """Number of simulation steps T."""
    encoder: Literal["poisson", "direct"] = "poisson"
    """poisson: Bernoulli spikes with probability = input (inputs in [0, 1]); direct: the input repeated.
    Integer and boolean inputs (token ids, masks) are repeated either way."""
    decoder: Literal["mean"] = "mean"
    """How the output sequence becomes one output: mean over the timesteps."""
    neuron: NeuronConfig = NeuronConfig()
    neurons_at: Literal["layers", "activations"] = "layers"
    """Where neurons go. ``layers`` (default): after every selected layer, replacing the activation
    that ends its output block (``layer -> [bn] -> act``) or inserted after ``layer -> [bn]`` where
    there is none. ``activations``: only where there is an activation to replace; a selected layer
    without one keeps its analog output. Why: the layers without an activation are mostly the last
    projections of residual branches (attention's output and q/k/v projections, an MLP's second
    Linear, an MBConv's 1x1 projection, a ResNet block's second conv), and spikes there make a
    deep residual stream of spikes whose LayerNorms multiply the gradient at every block; on
    torchvision's MaxViT (35 such blocks) the first backward overflows with ``layers`` and stays
    finite with ``activations`` (docs/transformers.md)."""
    weight_scale: Bounded(float, 0.0, 1e3, low_open=True) = 0.333
    """The weight and bias of each selected layer followed by BatchNorm are multiplied by this when
    the pass runs, and the BatchNorm's running statistics and ``eps`` to match: the network
    computes exactly the same function, spiking or not. Why: Adam moves every weight by about its
    learning rate whatever the gradient, so smaller weights change faster relative to their size;
    with surrogate gradients the spiking network otherwise learns more slowly per step than the
    float one (docs/spiking.md). ``1``: weights as they are (the behaviour before this option).
    Layers without a BatchNorm after them take ``weight_scale_no_bn``."""
    weight_scale_no_bn: Bounded(float, 0.0, 1e3, low_open=True) | None = 0.577
    """The same for the layers without a BatchNorm after them: each selected one and the layer
    whose output is the network's output (the analog readout ``exclude_last`` keeps). Their weight
    and bias are multiplied by it and the neuron reading them (its ``input_gain``) or the decoder
    (its ``gain``) multiplies by the inverse, so the function is the same. Adam's steps on them
    become 1.73x longer relative to their size, SGD's 3x. Why not 0.333: under SGD at lr 0.05 that
    made their steps 9x longer and IF neurons lost 6 points (docs/spiking.md). null: the same as
    ``weight_scale``; ``1``: as they are (the behaviour before 2026-11-30)."""
    upgrade_threshold: bool = False
    """Expose each layer's threshold as an eve parameter for the upgrader."""
