"""``kind: quantize``: quantization-aware training of conv/linear layers."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from evefx.spec.base import Bounded, Section, StrictModel

__all__ = ["QuantizerConfig", "WeightQuantizerConfig", "ActivationQuantizerConfig", "ProgressiveBits",
           "QuantizeSection", "CalibrationConfig", "AdaRoundConfig", "TARGETS", "SATURATION_FREE_WEIGHT_CODES"]

TARGETS = ("portable", "x86-vnni", "arm")
"""CPU classes an int8 file can be built for (see ``QuantizeSection.target``)."""

SATURATION_FREE_WEIGHT_CODES = (-64, 63)
"""Signed weight codes of the ``portable`` target: ``2 * 255 * 64 <= 32767``, so the pair sums of
u8 x s8 products that x86 AVX2 kernels (``vpmaddubsw``) keep in int16 never saturate."""


class ProgressiveBits(StrictModel):
    """Progressive bit lowering: train at ``start_bits`` first and halve the bits in even stages
    down to the quantizer's ``bits``, reached after ``steps`` training steps (e.g. 8 -> 4 -> 2).

    Example (YAML):
        weight: {bits: 2, fn: lsq, progressive: {start_bits: 8, steps: 200}}
    """

    start_bits: Bounded(int, 2, 16) = 8
    """Bits of the first stage."""
    steps: Bounded(int, 1, 1_000_000_000) = 200
    """Training steps (forwards of the quantizer in training mode) until ``bits`` is reached."""


class QuantizerConfig(StrictModel):
    """One quantizer (of the weights or of the activations)."""

    bits: Bounded(int, 1, 16) = 8
    """Bit width, 1 to 16. With ``upgrade_bits`` it is the starting value of the eve parameter."""
    fn: Literal["round", "lsq", "llsq"] = "round"
    """round: uniform rounding with the straight-through estimator; lsq: learned step size
    (Esser et al. 2019); llsq: learned linear symmetric quantizer (Zhao et al. 2020)."""
    granularity: Literal["per_tensor", "per_channel"] = "per_tensor"
    """One scale for the tensor, or one per output channel (the seed's neuron_wise)."""
    symmetric: bool = True
    """Symmetric range (zero point 0) or asymmetric range with a zero point."""
    signed: bool = True
    """Signed levels [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1]."""
    tracker: Literal["average", "global"] = "average"
    """Range tracker: exponential moving average of min/max, or running (global) min/max."""
    momentum: Bounded(float, 0.0, 1.0, low_open=True) = 0.1
    """EMA momentum of the ``average`` tracker."""
    learnable_scale: bool = False
    """Make the scale a trained parameter for ``round`` too (always true for lsq/llsq)."""
    scale_domain: Literal["linear", "log", "range"] = "linear"
    """Only for learned scales: train the scale itself (``linear``, default) or its logarithm
    (``log``; TQT's log-domain thresholds, brevitas' ``LOG_FP``). Adam moves a parameter by about
    its learning rate whatever the gradient: at lr 1e-3 a linear per-channel weight step of 1e-3
    doubles or hits its floor in a few steps (mobilenet_v3_small, 60 steps: median 2.3x the range's
    step, 8% at the floor), a log one moves 0.1% per step (0.94x, none at the floor). On the
    networks measured it trained no better fine-tuned, and from random weights it cannot follow
    the network's growing ranges (DemoNet W4A4 lsq: -1.57 against -0.67; docs/quantization.md).
    ``range``: the logarithm of the step relative to the tracked range's step, which is refreshed
    every training forward: the step follows growing ranges (from random weights) and the learned
    ratio moves 0.1% per step (an option; docs/quantization.md has the figures)."""
    regularization: Literal["l1", "l2"] = "l2"
    """Only for ``llsq``: the norm of the quantization-error regulariser."""
    init_steps: Bounded(int, 0, 1_000_000_000) = 30
    """Only for learned scales (lsq, llsq, ``learnable_scale``): the first ``init_steps`` training
    steps quantize with the tracked range's grid (as ``round``) while the range settles, then the
    learned scale starts from that range (LSQ+'s least-squares search) instead of from the first
    batch. 0: from the first batch (the behaviour before this option). 30 steps is about one epoch
    of the 4,000-image MNIST split at batch 128; on its validation part W2A2 lsq went from 57 to
    86% from random weights and from 52 to 89% fine-tuned (docs/quantization.md)."""
    progressive: ProgressiveBits | None = None
    """Lower the bits progressively during training (e.g. 8 -> 4 -> 2); ``null``: ``bits`` throughout."""
    ewgs: Bounded(float, 0.0, 1.0) = 0.0
    """Element-wise gradient scaling (EWGS, Lee et al. 2021) of the straight-through gradient, 0 to 1:
    each element's gradient is multiplied by ``1 + ewgs * sign(g) * (x/s - round(x/s))``. 0: the
    plain estimator (default). Measured on validation (docs/quantization.md): 0.1 on weights and
    activations lifted a small ResNet fine-tuned at W4A4 from 91.3 +- 2.4 to 93.7 +- 0.9 and at
    W3A3 by about 1.4 points, and changed nothing beyond noise on DemoNet (W2A2 to W4A4)."""

    @model_validator(mode="after")
    def _progressive_starts_higher(self) -> QuantizerConfig:
        if self.progressive is not None and self.progressive.start_bits <= self.bits:
            raise ValueError(f"progressive.start_bits ({self.progressive.start_bits}) must exceed bits ({self.bits})")
        return self

    def bits_schedule(self) -> tuple[tuple[int, int], ...] | None:
        """``((step, bits), ...)``: ``start_bits`` halved stage by stage down to ``bits``, the stages
        spread evenly over ``progressive.steps`` training steps (None without ``progressive``).

        Example:
            >>> QuantizerConfig(bits=2, progressive={"start_bits": 8, "steps": 200}).bits_schedule()
            ((0, 8), (100, 4), (200, 2))
        """
        if self.progressive is None:
            return None
        stages = [self.progressive.start_bits]
        while stages[-1] > self.bits:
            stages.append(max(self.bits, stages[-1] // 2))
        n = len(stages) - 1
        return tuple((round(i * self.progressive.steps / n), b) for i, b in enumerate(stages))


class CalibrationConfig(StrictModel):
    """How ``evefx.calibrate`` chooses each quantizer's range from calibration data (post-training).

    Example (YAML):
        calibration: {method: entropy, batches: 16}
    """

    method: Literal["minmax", "percentile", "mse", "entropy"] = "minmax"
    """Activation ranges: minmax (observed extremes), percentile (the ``percentile`` of |x|, or of
    both tails when asymmetric, as onnxruntime does), mse (the clipping range of least expected
    squared quantization error on the histogram) or entropy (the threshold of least KL divergence
    between the histogram and its quantized version, as TensorRT and onnxruntime do)."""
    percentile: Bounded(float, 50.0, 100.0) = 99.99
    """Only for ``percentile``: the share of values (in percent) that the range keeps unclipped."""
    batches: Bounded(int, 1, 1_000_000) | None = None
    """Use at most this many calibration batches (default: all that are given)."""
    bins: Bounded(int, 16, 65536) = 2048
    """Histogram bins per tensor (per channel for per-channel quantizers)."""
    weight_method: Literal["minmax", "mse"] = "minmax"
    """Weight ranges: minmax, or mse (least squared rounding error, per tensor or per channel)."""


class AdaRoundConfig(StrictModel):
    """Learned rounding of the weights, layer by layer (AdaRound, Nagel et al. 2020).

    Example (YAML):
        adaround: {iterations: 1000}
    """

    iterations: Bounded(int, 1, 1_000_000) = 1000
    """Adam steps per layer."""
    lr: Bounded(float, 0.0, 1.0, low_open=True) = 1e-2
    """Adam learning rate of the rounding variables."""
    reg_weight: Bounded(float, 0.0, 1e6) = 0.01
    """Weight of the regulariser that drives each rounding choice to 0 or 1 (lambda in the paper)."""
    beta: tuple[float, float] = (20.0, 2.0)
    """Start and end of the annealed exponent of the regulariser."""
    warm_start: Bounded(float, 0.0, 1.0) = 0.2
    """Fraction of the iterations run without the regulariser."""
    samples: Bounded(int, 1, 1_000_000) = 256
    """Calibration samples (images) whose layer inputs are kept for the reconstruction objective."""
    batch_size: Bounded(int, 1, 1_000_000) = 32
    """Samples per Adam step."""

    @model_validator(mode="after")
    def _beta_anneals_down(self) -> AdaRoundConfig:
        start, end = self.beta
        if not 0 < end <= start:
            raise ValueError(f"beta must be [start, end] with start >= end > 0 (got {list(self.beta)})")
        return self


class WeightQuantizerConfig(QuantizerConfig):
    """The ``weight`` block: a quantizer whose unwritten options take the weights' defaults, so
    ``weight: {bits: 4}`` stays round, per channel, with the global tracker.

    Example:
        >>> WeightQuantizerConfig(bits=4).granularity
        'per_channel'
    """

    granularity: Literal["per_tensor", "per_channel"] = "per_channel"
    """One scale per output channel (default for weights), or one for the tensor."""
    tracker: Literal["average", "global"] = "global"
    """Range tracker: running (global) min/max (default for weights), or an EMA of min/max."""


class ActivationQuantizerConfig(QuantizerConfig):
    """The ``activation`` block: a quantizer whose unwritten options take the activations' defaults,
    so ``activation: {bits: 4}`` stays lsq, asymmetric and unsigned.

    Example:
        >>> ActivationQuantizerConfig(bits=4).symmetric
        False
    """

    fn: Literal["round", "lsq", "llsq"] = "lsq"
    """lsq (default for activations): a learned step, started after ``init_steps`` of range
    tracking; until it trains (eval only, PTQ) it uses the tracked range as round does. Chosen on
    the MNIST split's validation part (plain recipe, 3 seeds; docs/quantization.md): with round
    weights, W4A4 from random -0.3 against -2.2 with round activations, fine-tuned W4A4 -1.3
    against -1.9. Weights keep round: a learned weight step on a real network is about 1e-3,
    what Adam moves it by per step whatever the gradient (on torchvision's mobilenet_v3_small at
    8 bits, 60 steps of Adam 1e-3 left lsq weight steps a median 2.2x, up to 35x, the range's);
    write ``weight.fn: lsq`` for 2-4-bit weights, or fine-tune with SGD or a smaller learning rate."""
    symmetric: bool = False
    """Asymmetric range with a zero point (default for activations), or symmetric (zero point 0)."""
    signed: bool = False
    """Unsigned levels [0, 2^b-1] (default for activations) or signed [-2^(b-1), 2^(b-1)-1]."""


class QuantizeSection(Section):
    """Insert weight and/or activation quantizers at the selected conv/linear layers.

    Example (YAML):
        - kind: quantize
          select: {types: [Conv2d, Linear]}
          weight: {bits: 8, granularity: per_channel}
          activation: {bits: 8, signed: false, symmetric: false}
    """

    kind: Literal["quantize"]
    weight: WeightQuantizerConfig | None = WeightQuantizerConfig()
    """Weight quantizer; ``null`` leaves the weights in float. Options not written keep the
    weights' defaults (round, per channel, global tracker)."""
    activation: ActivationQuantizerConfig | None = ActivationQuantizerConfig()
    """Activation quantizer after the layer's output block; ``null`` leaves activations in float.
    Options not written keep the activations' defaults (lsq, asymmetric, unsigned)."""
    quantize_inputs: bool = True
    """Also quantize each selected layer's input when it is not already the output of an evefx
    activation quantizer (network inputs, residual sums, pooled features), so that onnxruntime
    runs every selected layer as an integer kernel; an input written by a per-channel activation
    quantizer is re-quantized per tensor (integer kernels take one input scale). The input
    quantizer takes the ``activation``
    settings, per tensor; a symmetric unsigned ``activation`` becomes signed unless the input
    comes straight from a ReLU (asymmetric grids cover negative inputs through the zero point).
    Its bits stay fixed under ``upgrade_bits``. Needs ``activation``."""
    target: Literal["portable", "x86-vnni", "arm"] = "portable"
    """The CPUs the exported int8 file must compute the same on. ``portable`` (default): every
    x86 (AVX2, AVX-512, VNNI) and ARM CPU; signed weights of more than 7 bits keep their codes in
    [-64, 63], because onnxruntime's u8s8 kernels on x86 without VNNI add pairs of products in
    int16 and saturate beyond it (onnxruntime's ``reduce_range`` does the same). Training and
    calibration use that grid, so nothing changes at export. ``x86-vnni`` / ``arm``: the full
    int8 range, for CPUs whose kernels accumulate in int32 (AVX-512 VNNI, AVX-VNNI, AMX; ARM
    NEON/SDOT); the file records its target and the export check reports what an AVX2 CPU would
    compute differently."""
    weight_storage: Literal["int8", "packed"] = "int8"
    """How ``evefx.export_onnx`` stores the weight codes. ``int8``: one byte per weight whatever
    the bit width (narrow codes in int8/uint8; any opset >= 13). ``packed``: weights of 4 bits or
    fewer as INT4/UINT4 initializers, two per byte (ONNX opset 21; export picks opset 21 unless
    told otherwise), Linear layers as onnxruntime's ``MatMulNBits``; 5-7 bit weights stay int8
    codes. Per layer through ``overrides`` (``{names: [fc], weight_storage: int8}``);
    ``export_onnx(weight_storage=...)`` overrides it for every layer (see docs/export.md)."""
    fold_bn: bool = True
    """Fold the BatchNorm that follows a conv into it during training (Jacob et al. 2018)."""
    train_int32_bias: bool = True
    """Train with each layer's bias as integer kernels keep it: rounded to the int32 grid of its
    input and weight scales (``s_x * s_w``), as eval and the exported file round it; the gradient
    passes straight through. At 2-3 bits that grid is coarse, and biases trained in float cost a
    small ResNet 11 points on average once rounded (docs/quantization.md). ``false``: training
    keeps float biases (the behaviour before; eval and export still round them)."""
    bn_statistics: Literal["auto", "batch", "running"] = "auto"
    """What a folded BatchNorm normalises with in training. ``batch``: the batch's statistics,
    updating the running ones (the float model's BatchNorm). ``running``: its running statistics,
    left unchanged, so training computes what eval and the exported file compute, up to float
    rounding (torch.ao's ``freeze_bn_stats`` from the first step). ``auto`` (default): for a
    BatchNorm that has already tracked statistics (a trained network being fine-tuned), ``running``
    while the layer's weights have 3 bits or fewer and ``batch`` above (read at every step, so a
    search's bit widths count); ``batch`` for a fresh one (training from random weights, whose
    running statistics are still 0 and 1). At 2-3 bits batch statistics move codes across rounding
    boundaries that eval puts elsewhere; at 4 and more frozen ones take BatchNorm's normalisation
    out of training and a deep network fine-tuned at lr 1e-3 can collapse. After training on batch
    statistics, ``evefx.reestimate_bn`` fits the running ones to the final weights
    (docs/quantization.md)."""
    upgrade_bits: bool = False
    """Expose the bit widths as eve parameters in [min_bits, max_bits] for the upgrader."""
    min_bits: Bounded(int, 1, 16) = 2
    """Lowest bit width the upgrader may choose."""
    max_bits: Bounded(int, 1, 16) = 8
    """Highest bit width the upgrader may choose."""
    calibration: CalibrationConfig = CalibrationConfig()
    """Post-training calibration of the ranges (``evefx.calibrate``); per-layer overrides apply."""
    bias_correction: bool = False
    """Post-training: shift each quantized layer's bias so that its mean output on the calibration
    data equals the float model's (empirical bias correction)."""
    equalize: bool = False
    """Post-training: cross-layer equalization of consecutive conv/linear pairs through ReLU
    (Nagel et al. 2019); a pair is equalized when both of its layers have it."""
    quantize_output: bool = False
    """Also put an activation quantizer on a layer whose output is the network's output (the
    logits). ``false`` (default), as NNCF, brevitas and onnxruntime's quantizer do: the last layer
    still runs as an integer kernel on quantized inputs and weights, and its int32 result is
    dequantized to float instead of being rounded to a grid that, at 2 bits, leaves 4 levels for
    10 logits and ties the argmax. ``true``: the behaviour before this option."""
    keep_first_last: Bounded(int, 1, 16) | None = None
    """A convention stated in the spec, not applied silently: the first selected layer (its
    weights and its input quantizer) and the last selected layer (its weights, its input and, with
    ``quantize_output``, its output) keep this many bits, whatever ``weight.bits`` and
    ``activation.bits`` say; the layers in between take the section's bits. Low-bit networks usually keep the image input and the
    classifier at 8 bits (Esser et al. 2019, Zhou et al. 2016). ``null``: every layer as written."""
    adaround: AdaRoundConfig | None = None
    """Post-training: learn whether each weight rounds up or down (AdaRound); ``null``: nearest rounding."""

    @model_validator(mode="after")
    def _bits_range(self) -> QuantizeSection:
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must not exceed max_bits ({self.max_bits})")
        if self.weight is None and self.activation is None:
            raise ValueError("weight and activation are both null: nothing to quantize (remove the section)")
        if self.upgrade_bits and any(c is not None and c.progressive is not None for c in (self.weight, self.activation)):
            raise ValueError("upgrade_bits and progressive both set the bits during training; use one")
        return self
