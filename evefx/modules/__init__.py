"""The runtime ``nn.Module``s that evefx's passes insert, usable by hand.

They know nothing of specs, passes or tracing; a saved model needs only them to load. Every one
takes part in the eve protocol (:class:`EveHooks`): ``set_mode``, ``observations`` and the eve
parameters the upgrader searches.

=======================  ====================================================================
file                     what it holds
=======================  ====================================================================
``protocol``             :class:`EveHooks`, :class:`EveRange`
``quantizer_options``    :class:`QuantizerOptions`: a quantizer's options, checked once
``quant_functions``      integer ranges, scales from a range, STE/LSQ quantize-dequantize
``quantizer``            :class:`Quantizer`: the fake quantizer
``quant_layers``         :class:`QuantConv2d` (1d/3d), :class:`QuantLinear`: weights quantized, BatchNorm folded
``surrogate``            surrogate spike gradients
``neuron_recurrence``    the fused multi-step neuron recurrence (hand-written BPTT)
``neurons``              :class:`IFNeuron`, :class:`LIFNeuron`, :class:`PLIFNeuron`
``encoding``             :class:`PoissonEncoder`, :class:`DirectEncoder`, :class:`MeanDecoder`
``prune``                :class:`ChannelPruner`
``attention``            :class:`DecomposedMultiheadAttention` and traceable transformer layers
=======================  ====================================================================

Example:
    >>> from evefx.modules import LIFNeuron, Quantizer, QuantizerOptions
    >>> q = Quantizer(QuantizerOptions(bits=4, fn="lsq", name="fc"))
"""
from __future__ import annotations

from evefx.modules.attention import (
    DecomposedMultiheadAttention,
    TraceableTransformerEncoder,
    TraceableTransformerEncoderLayer,
)
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder
from evefx.modules.neurons import IFNeuron, LIFNeuron, PLIFNeuron, SpikingNeuron, multi_step
from evefx.modules.protocol import EveHooks, EveRange
from evefx.modules.prune import CRITERIA, ChannelPruner
from evefx.modules.quant_functions import affine_from_range, levels, lsq_quantize, ste_quantize
from evefx.modules.quant_layers import QUANT_LAYER_TYPES, QuantConv1d, QuantConv2d, QuantConv3d, QuantLinear
from evefx.modules.quantizer import Quantizer
from evefx.modules.quantizer_options import QuantizerOptions
from evefx.modules.surrogate import SURROGATES, spike_fn, surrogate

__all__ = [
    "EveHooks",
    "EveRange",
    "Quantizer",
    "QuantizerOptions",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConv3d",
    "QuantLinear",
    "QUANT_LAYER_TYPES",
    "levels",
    "affine_from_range",
    "ste_quantize",
    "lsq_quantize",
    "SpikingNeuron",
    "IFNeuron",
    "LIFNeuron",
    "PLIFNeuron",
    "multi_step",
    "SURROGATES",
    "surrogate",
    "spike_fn",
    "PoissonEncoder",
    "DirectEncoder",
    "MeanDecoder",
    "ChannelPruner",
    "CRITERIA",
    "DecomposedMultiheadAttention",
    "TraceableTransformerEncoderLayer",
    "TraceableTransformerEncoder",
]
