"""The ``spike`` pass: turn the selected layers' activations into spiking neurons.

For every planned layer (``exclude_last`` leaves the classifier analog), in graph order:

* the activation that ends its output block (``layer -> [bn] -> act``) is **replaced** by a
  neuron (its node is erased: the neuron is the non-linearity); without an activation the neuron
  is **inserted** after ``layer -> [bn]`` (with ``neurons_at: activations`` the layer is left
  analog instead);
* every tensor input of the graph gets an encoder (``poisson`` or ``direct``) that makes ``T``
  time-folded steps ``[T*B, ...]`` (integer and boolean inputs, token ids and masks, are always
  repeated: ``direct``), and every output a :class:`~evefx.modules.encoding.MeanDecoder`,
  so the model is still called with ``[B, ...]`` and returns ``[B, ...]``.

Layers between encoder and decoder run once on the time-folded batch. With ``encoder: direct``
every step sees the same input, so the deterministic stateless layers fed only by the inputs
(``conv -> bn`` before the first neurons) are hoisted out of time: they run once on ``[B, ...]`` and
the ``DirectEncoder`` repeats their output (same forward; BatchNorm's running variance differs
only by its ``n/(n-1)`` correction). Nodes are marked with
roles ``neuron``, ``encoder`` and ``decoder``; a layer already given a neuron is skipped and the
encoder/decoder are added once, so running the pass twice changes nothing.

Example:
    >>> gm = evefx.transform(DemoNet(), {"passes": [{"kind": "spike", "timesteps": 4}]})
    >>> [c.action for c in gm.report.changes][:2]
    ['replaced', 'replaced']
"""
from __future__ import annotations

import logging

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from evefx.errors import PassError
from evefx.graph import (
    ACTIVATION_MODULES,
    Block,
    insert_after,
    insert_before_output,
    marked,
    module_of,
    output_block,
    provenance,
    remove_node,
    unique_name,
)
from evefx.layers import out_channels
from evefx.modules.encoding import DirectEncoder, MeanDecoder, PoissonEncoder
from evefx.modules.neurons import IFNeuron, LIFNeuron, PLIFNeuron, SpikingNeuron
from evefx.passes.base import Change, PassResult, SectionPass
from evefx.spec import SpikeSection

__all__ = ["SpikePass", "make_neuron", "scale_feeding_weights", "firing_rates"]

log = logging.getLogger(__name__)

_NEURON = {"if": IFNeuron, "lif": LIFNeuron, "plif": PLIFNeuron}
# deterministic, stateless per sample: safe to compute once when every step sees the same input
_TIME_INVARIANT = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity, nn.ZeroPad2d, *ACTIVATION_MODULES,
})


def make_neuron(section: SpikeSection, channels: int | None, channel_axis: int | None = 1) -> SpikingNeuron:
    """The neuron a ``kind: spike`` section asks for (one layer's section, overrides applied), with
    its channels on ``channel_axis`` of its input (1 after a conv, -1 after a Linear).

    Example:
        >>> make_neuron(SpikeSection(kind="spike"), channels=16)
        LIFNeuron(tau=2, timesteps=8, threshold=1, ...)
    """
    cfg = section.neuron
    kwargs = dict(
        channels=channels, channel_axis=1 if channel_axis is None else channel_axis,
        neuron_wise=cfg.neuron_wise and channels is not None,
        learnable_threshold=cfg.learnable_threshold, learnable_reset=cfg.learnable_reset,
        time_dependent=cfg.time_dependent, binary=cfg.binary, surrogate=cfg.surrogate.name,
        alpha=cfg.surrogate.alpha, upgrade=section.upgrade_threshold, relative_surrogate=cfg.surrogate.relative,
        threshold_std=cfg.threshold_std if cfg.threshold is None else None,
    )
    if cfg.type != "if":
        kwargs["tau"] = cfg.tau
    # a data-dependent threshold starts at 1 until the first batch sets it
    threshold = 1.0 if cfg.threshold is None else cfg.threshold
    return _NEURON[cfg.type](section.timesteps, threshold, cfg.reset, **kwargs)


def scale_feeding_weights(gm: fx.GraphModule, block: Block, scale: float) -> str | None:
    """Multiply the weight and bias of a block's layer by ``scale`` and say how the block's output
    is kept the same: ``"batchnorm"`` (a ``layer -> BatchNorm`` block: the BatchNorm's running
    statistics and ``eps`` are scaled to match, training and eval), ``"gain"`` (no BatchNorm: the
    module reading the layer's output must multiply it by ``1/scale``; the caller sets that gain), or
    None when it did not scale: the weights also serve another call, or the layer is not a plain
    conv/linear. Why (``weight_scale`` in the spec): Adam moves each weight by about ``lr`` per
    step, so smaller weights learn faster relative to their size.

    Example:
        >>> scale_feeding_weights(gm, output_block(gm, conv_node), 1 / 3)
        'batchnorm'
    """
    if not _scale_layer(gm, block.layer, block.bn, scale):
        return None
    if block.bn is None:
        return "gain"
    bn = module_of(gm, block.bn)
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.mul_(scale)
            bn.running_var.mul_(scale * scale)
    bn.eps = float(bn.eps) * scale * scale  # type: ignore[assignment]  # BatchNorm's float attribute
    return "batchnorm"


def _no_bn_scale(section: SpikeSection) -> float:
    """The weight scale of a layer without BatchNorm after it (``weight_scale_no_bn``, else ``weight_scale``)."""
    return section.weight_scale if section.weight_scale_no_bn is None else section.weight_scale_no_bn


def _scale_layer(gm: fx.GraphModule, node: fx.Node, bn: fx.Node | None, scale: float) -> bool:
    """Multiply a plain conv/linear's weight and bias by ``scale``, unless they (or its BatchNorm)
    also serve another call, or it is not plain (e.g. already quantized: its ranges would go stale)."""
    if node.op != "call_module":
        return False
    layer = module_of(gm, node)
    weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)) or not isinstance(weight, nn.Parameter) \
            or any(True for _ in layer.children()):
        return False
    targets = (node.target,) if bn is None else (node.target, bn.target)
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in targets]
    shared = sum(p is weight for _, p in gm.named_parameters(remove_duplicate=False)) > 1
    if len(calls) > len(targets) or shared:
        return False
    with torch.no_grad():
        weight.mul_(scale)
        if isinstance(bias, torch.Tensor):
            bias.mul_(scale)
    return True


def _is_tensor_input(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    if meta is not None:
        return isinstance(meta, TensorMetadata)
    return not node.args  # a placeholder with a default value is a non-tensor option


def _integer_input(node: fx.Node) -> bool:
    """An input known (from the example inputs) to hold integers or booleans: token ids, masks."""
    meta = node.meta.get("tensor_meta")
    return isinstance(meta, TensorMetadata) and not meta.dtype.is_floating_point and not meta.dtype.is_complex


class SpikePass(SectionPass[SpikeSection]):
    """Runs one ``kind: spike`` section (see the module docstring for what it does).

    Example:
        >>> result = SpikePass(spec.passes[0], "passes[0]")(gm)
        >>> result.changes[-1].detail
        'MeanDecoder(T=8) on output classifier_3'
    """

    name = "spike"

    def __init__(self, section: SpikeSection, spec_path: str, *, hoist: bool = True):
        super().__init__(section, spec_path)
        self.hoist = hoist
        """With direct encoding, run the layers before the first neurons once instead of T times."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        changes: list[Change] = []
        analog: list[str] = []  # neurons_at: activations, and the layer has none to replace
        skipped: list[str] = []
        timesteps = self.section.timesteps
        for layer, planned in self.plan(gm).items():
            if self.marked(gm, layer, role="neuron"):
                skipped.append(layer)
                continue
            section = planned.section
            if section.timesteps != timesteps:
                raise PassError(f"{self.spec_path}.overrides: timesteps cannot differ per layer ({layer})")
            self.current_node = planned.node
            block = output_block(gm, planned.node)
            if block.act is None and section.neurons_at == "activations":
                analog.append(layer)
                continue
            neuron = make_neuron(section, out_channels(planned.module), planned.channel_axis)
            neuron.train(planned.module.training)
            before = block.bn or block.layer
            new = insert_after(gm, before, neuron, f"{layer}.neuron")
            self.mark(new, layer, "neuron", channel_axis=planned.channel_axis)
            kind = type(neuron).__name__
            scale = section.weight_scale if block.bn is not None else _no_bn_scale(section)
            undone = scale_feeding_weights(gm, block, scale) if scale != 1.0 else None
            if undone == "gain":
                neuron.input_gain.fill_(1.0 / scale)
                kind += f"; weights x{scale:g}, input x{1 / scale:.4g}"
            elif undone:
                kind += f"; weights x{scale:g}"
            if block.act is not None:
                act_name = block.act.target if block.act.op == "call_module" else getattr(block.act.target, "__name__", block.act.target)
                act_desc = type(module_of(gm, block.act)).__name__ if block.act.op == "call_module" else str(act_name)
                remove_node(gm, block.act)
                changes.append(self.change("replaced", new, layer, f"{act_desc} ({block.act.name}) -> {kind}"))
            else:
                changes.append(self.change("inserted", new, layer, f"{kind} after {before.name}"))
        self.current_node = None
        if analog:
            log.info("%s: neurons_at activations: %d selected layers without an activation stay analog (%s)",
                     self.spec_path, len(analog), ", ".join(analog[:5]) + (", ..." if len(analog) > 5 else ""))
        self.warn_skipped(gm, skipped, "spiking")
        changes += self._encode(gm, timesteps)
        changes += self._decode(gm, timesteps)
        return PassResult(gm, bool(changes), tuple(changes))

    def _existing_timesteps(self, gm: fx.GraphModule, role: str) -> list[int]:
        # nn.Module.__getattr__ types attributes as Tensor | Module; every encoder, neuron and decoder holds an int
        return [module_of(gm, n).timesteps for n in self.marked(gm, role=role)]  # type: ignore[misc]

    def _check_same_t(self, gm: fx.GraphModule, role: str, timesteps: int) -> bool:
        found = self._existing_timesteps(gm, role)
        if found and any(t != timesteps for t in found):
            raise PassError(
                f"{self.spec_path}: the model already runs {found[0]} timesteps (an earlier spike section) but this "
                f"section asks for {timesteps}; use one timesteps value for the whole model"
            )
        return bool(found)

    def _invariant_region(self, gm: fx.GraphModule) -> list[fx.Node]:
        """The tensor inputs, plus (with direct encoding) the deterministic stateless layers fed
        only by them: with the same input at every step these compute the same thing T times."""
        region = [n for n in gm.graph.nodes if n.op == "placeholder" and _is_tensor_input(n)]
        if self.section.encoder != "direct" or not self.hoist:
            return region
        inside = set(region)
        for n in gm.graph.nodes:
            if (n.op == "call_module" and "evefx" not in n.meta and not n.kwargs and n.all_input_nodes
                    and all(a in inside for a in n.all_input_nodes)
                    and type(module_of(gm, n)) in _TIME_INVARIANT):
                region.append(n)
                inside.add(n)
        return region

    def _encode(self, gm: fx.GraphModule, timesteps: int) -> list[Change]:
        if self._check_same_t(gm, "encoder", timesteps):
            return []
        region = self._invariant_region(gm)
        if not region:
            raise PassError(f"{self.spec_path}: the model has no tensor input to encode into spikes")
        inside = set(region)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        changes = []
        anchor = placeholders[-1]  # encoders of inputs go after all placeholders (fx keeps those first)
        hoisted = [n.target for n in region if n.op == "call_module"]
        for src in region:
            outside = [u for u in src.users if u not in inside]
            if not outside:
                continue
            # token ids and masks are not rates: they are repeated at every step, whatever ``encoder`` says
            integer = _integer_input(src)
            poisson = self.section.encoder == "poisson" and not integer
            enc = PoissonEncoder(timesteps) if poisson else DirectEncoder(timesteps)
            name = unique_name(gm, f"spike_encoder_{src.name}")
            gm.add_submodule(name, enc)
            after = anchor if src.op == "placeholder" else src
            with gm.graph.inserting_after(after):
                new = gm.graph.call_module(name, (src,))
            if src.op == "placeholder":
                anchor = new
            for user in outside:
                user.replace_input_with(src, new)
            if "tensor_meta" in src.meta:
                new.meta["tensor_meta"] = src.meta["tensor_meta"]
            self.mark(new, src.name, "encoder")
            where = f"input {src.name}" if src.op == "placeholder" else f"{src.name} ({src.target})"
            detail = f"{type(enc).__name__}(T={timesteps}) on {where}"
            if integer and self.section.encoder == "poisson":
                detail += " (not floating point: repeated at every step, not rate-coded)"
            if src.op != "placeholder":
                detail += f"; {', '.join(map(str, hoisted))} run once, not once per step (same input every step)"
            changes.append(self.change("inserted", new, src.name, detail))
        return changes

    def _decode(self, gm: fx.GraphModule, timesteps: int) -> list[Change]:
        if self._check_same_t(gm, "decoder", timesteps):
            return []
        changes = []
        scale = _no_bn_scale(self.section)
        for new in insert_before_output(gm, lambda: MeanDecoder(timesteps), "spike_decoder"):
            src = new.args[0]
            assert isinstance(src, fx.Node)  # insert_before_output wraps nodes only
            if "tensor_meta" in src.meta:
                new.meta["tensor_meta"] = src.meta["tensor_meta"]
            self.mark(new, "output", "decoder")
            detail = f"MeanDecoder(T={timesteps}) on output {src.name}"
            # the output layer (analog: exclude_last) learns at the pace weight_scale gives the others
            if scale != 1.0 and len(src.users) == 1 and _scale_layer(gm, src, None, scale):
                module_of(gm, new).gain.fill_(1.0 / scale)
                detail += f"; {src.name} weights x{scale:g}, output x{1 / scale:.4g}"
            changes.append(self.change("inserted", new, "output", detail))
        return changes

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ensure_marked_are(gm, "neuron", (SpikingNeuron,), "a neuron")


def firing_rates(gm: fx.GraphModule) -> dict[str, float]:
    """Firing rate of every neuron, by layer, from the last forward.

    Example:
        >>> gm(x); firing_rates(gm)
        {'features.0': 0.21, 'features.3': 0.14, ...}
    """
    return {provenance(node).layer: module_of(gm, node).observations().get("firing_rate", 0.0)
            for node in marked(gm, "spike", role="neuron")}
