"""The ``quantize`` pass: quantization-aware training of the selected conv/linear layers.

For every planned layer, in graph order:

* ``weight`` set: the layer becomes a :class:`~evefx.modules.quant_layers.QuantConv2d` (1d/3d) or
  :class:`~evefx.modules.quant_layers.QuantLinear` whose weights pass through a quantizer; with
  ``fold_bn`` the BatchNorm fed only by the layer is folded into it and its node removed;
* ``activation`` set: a :class:`~evefx.modules.quantizer.Quantizer` is inserted after the layer's
  output block (``layer -> [bn] -> [activation] -> quantizer``);
* ``quantize_inputs`` (with ``activation``): a :class:`~evefx.modules.quantizer.Quantizer` is inserted
  on the layer's input edge when that input does not already come from a quantizer (looking back
  through flatten/reshape/dropout/max-pool, which keep a quantized tensor on its grid): the network
  input, a residual sum, pooled features, or a per-channel activation quantizer (integer kernels
  take one input scale, so such an input is re-quantized per tensor). Layers reading the same tensor share one input quantizer;
  other readers of that tensor (a residual branch) keep the float value;
* ``upgrade_bits``: every weight/activation quantizer's bits become an eve parameter in
  ``[min_bits, max_bits]`` (input quantizers keep the activation's starting bits).

Nodes are marked with roles ``weight``, ``activation`` and ``input``; a layer already marked is
skipped, so running the pass twice changes nothing.

Example:
    >>> gm = evefx.transform(DemoNet(), {"passes": [{"kind": "quantize", "weight": {"bits": 4}}]})
    >>> quant_summary(gm)[0]
    {'layer': 'features.0', 'w_bits': 4, 'a_bits': 8, 'params': 40, 'bytes': 34}
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from evefx.errors import PassError, QuantizationError
from evefx.graph import (
    calls_one_of,
    insert_after,
    layer_nodes,
    marked,
    module_of,
    output_block,
    provenance,
    remove_node,
    replace_module,
    unique_name,
)
from evefx.layers import out_channels
from evefx.modules import (
    QUANT_LAYER_TYPES,
    ChannelPruner,
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    Quantizer,
    QuantizerOptions,
    QuantLinear,
)
from evefx.modules.quant_layers import RUNNING_STATS_MAX_BITS
from evefx.passes.base import Change, PassResult, SectionPass
from evefx.spec import QuantizeSection, QuantizerConfig
from evefx.spec.quantize import SATURATION_FREE_WEIGHT_CODES

__all__ = ["QuantizePass", "quant_summary", "make_quantizer", "weight_code_range"]

log = logging.getLogger(__name__)

_QUANT_CLASS = {nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d, nn.Conv3d: QuantConv3d, nn.Linear: QuantLinear}
# ops that keep a quantized tensor on its grid: a quantizer before them quantizes the layer's input
# (a pruner's 0/1 mask too: zero is on every grid evefx builds, since ranges always include 0)
_PASS_THROUGH_MODULES = (nn.Flatten, nn.Unflatten, nn.Dropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, ChannelPruner)
_PASS_THROUGH_FUNCTIONS = {torch.flatten, torch.reshape, F.dropout, F.max_pool1d, F.max_pool2d, F.max_pool3d}
_PASS_THROUGH_METHODS = {"flatten", "view", "reshape", "contiguous"}
# sources whose output is never negative (an unsigned symmetric grid loses nothing on them)
_NON_NEGATIVE_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_NON_NEGATIVE_FUNCTIONS = {F.relu, F.relu6, torch.relu, torch.sigmoid, F.sigmoid, F.hardsigmoid}
_NON_NEGATIVE_METHODS = {"relu", "relu_", "sigmoid"}
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d, nn.Linear: nn.BatchNorm1d}
# the spec block's fields that are quantizer options of the same name and meaning (``progressive``
# becomes ``bits_schedule``; the rest of the options the pass decides per layer)
_SPEC_OPTIONS = tuple(f.name for f in dataclasses.fields(QuantizerOptions) if f.name in QuantizerConfig.model_fields)


def make_quantizer(
    cfg: QuantizerConfig,
    *,
    name: str,
    num_channels: int,
    ch_axis: int,
    bit_range: tuple[int, int] | None = None,
    code_range: tuple[int, int] | None = None,
) -> Quantizer:
    """A :class:`Quantizer` built from a spec's ``weight``/``activation`` block: the block's fields
    that are quantizer options (same names) plus what the pass decides for this layer.

    Example:
        >>> make_quantizer(QuantizerConfig(bits=4), name="fc", num_channels=10, ch_axis=0)
    """
    same = {field: getattr(cfg, field) for field in _SPEC_OPTIONS}
    return Quantizer(QuantizerOptions(
        **same, ch_axis=ch_axis, num_channels=num_channels, bit_range=bit_range, code_range=code_range,
        bits_schedule=cfg.bits_schedule(), name=name,
    ))


def weight_code_range(target: str, signed: bool) -> tuple[int, int] | None:
    """The weight code limit a deployment target needs (``None``: the full range of the bits).

    Example:
        >>> weight_code_range("portable", signed=True), weight_code_range("x86-vnni", signed=True)
        ((-64, 63), None)
    """
    # unsigned weights run as u8u8 kernels, which widen to int16 before multiplying: no saturation
    return SATURATION_FREE_WEIGHT_CODES if target == "portable" and signed else None


def _layer_bn_statistics(choice: str, bn: nn.modules.batchnorm._BatchNorm) -> str:
    """``bn_statistics`` of the layer folding ``bn``: ``auto`` stays ``auto`` (running statistics at
    low weight bits, see :class:`~evefx.modules.QuantConv2d`) once the BatchNorm has tracked some (a
    trained network) and is ``batch`` while it has its initial 0 / 1 (they mean nothing yet)."""
    if choice != "auto":
        return choice
    assert bn.running_mean is not None and bn.running_var is not None, "_foldable_bn folds only BatchNorms with statistics"
    tracked = bn.num_batches_tracked is not None and int(bn.num_batches_tracked) > 0
    # checkpoints saved before torch 0.4.1 load with num_batches_tracked 0: the statistics tell too
    initial = bool((bn.running_mean == 0).all()) and bool((bn.running_var == 1).all())
    return "auto" if tracked or not initial else "batch"


def _base_type(module: nn.Module) -> type[nn.Module] | None:
    for base in _QUANT_CLASS:
        if isinstance(module, base):
            return base
    return None


class QuantizePass(SectionPass[QuantizeSection]):
    """Runs one ``kind: quantize`` section (see the module docstring for what it does).

    Example:
        >>> result = QuantizePass(spec.passes[0], "passes[0]")(gm)
        >>> [c.action for c in result.changes][:3]
        ['replaced', 'folded', 'inserted']
    """

    name = "quantize"

    def _bit_range(self, section: QuantizeSection, cfg: QuantizerConfig, layer: str, role: str) -> tuple[int, int] | None:
        if not section.upgrade_bits:
            return None
        if not section.min_bits <= cfg.bits <= section.max_bits:
            raise QuantizationError(
                f"{self.spec_path}: layer {layer} has {role}.bits={cfg.bits}, outside "
                f"[min_bits, max_bits] = [{section.min_bits}, {section.max_bits}] that upgrade_bits searches; "
                f"make the bits fit the range or widen it"
            )
        return (section.min_bits, section.max_bits)

    def _foldable_bn(self, gm: fx.GraphModule, layer_node: fx.Node, bn_node: fx.Node | None, module: nn.Module) -> nn.Module | None:
        if bn_node is None:
            return None
        bn = module_of(gm, bn_node)
        base = _base_type(module)
        assert base is not None, "call() checked the layer's type before folding"
        if not isinstance(bn, _BN_FOR[base]) or bn.num_features != out_channels(module):
            return None
        if not bn.track_running_stats or bn.running_var is None:
            log.info("%s: %s keeps its BatchNorm %s (no running statistics to fold)", self.spec_path, layer_node.target, bn_node.target)
            return None
        calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        if calls.count(bn_node.target) > 1 or calls.count(layer_node.target) > 1:
            return None  # the BatchNorm or the layer is applied elsewhere too: folding would change that call
        return bn

    @staticmethod
    def _kept(cfg: QuantizerConfig | None, bits: int | None) -> QuantizerConfig | None:
        """``cfg`` at ``keep_first_last`` bits (no progressive lowering: the layer stays at those bits)."""
        if cfg is None or bits is None:
            return cfg
        return cfg.model_copy(update={"bits": bits, "progressive": None})

    def call(self, gm: fx.GraphModule) -> PassResult:
        changes: list[Change] = []
        plan = self.plan(gm)
        names = list(plan)
        skipped: list[str] = []
        for layer, planned in plan.items():
            node, module, section = planned.node, planned.module, planned.section
            keep = section.keep_first_last
            is_first, is_last = keep is not None and layer == names[0], keep is not None and layer == names[-1]
            # keep_first_last: the first layer's weights and input, the last layer's weights, input
            # and output at ``keep`` bits; the rest of the section applies unchanged
            weight_cfg = self._kept(section.weight, keep) if is_first or is_last else section.weight
            act_cfg = self._kept(section.activation, keep) if is_last else section.activation
            input_cfg = self._kept(section.activation, keep) if is_first or is_last else section.activation
            if self.marked(gm, layer) or isinstance(module, QUANT_LAYER_TYPES):
                skipped.append(layer)
                continue
            base = _base_type(module)
            if base is None:
                raise PassError(
                    f"{self.spec_path}: layer {layer} is a {type(module).__name__}; quantize supports "
                    f"Conv1d/Conv2d/Conv3d/Linear. Remove it from select."
                )
            self.current_node = node
            channels = out_channels(module)
            if weight_cfg is not None:
                cfg = weight_cfg
                wq = make_quantizer(cfg, name=f"{layer} (weight)", num_channels=channels, ch_axis=0,
                                    bit_range=self._bit_range(section, cfg, layer, "weight"),
                                    code_range=weight_code_range(section.target, cfg.signed))
                block = output_block(gm, node)
                bn = self._foldable_bn(gm, node, block.bn, module) if section.fold_bn else None
                # the QuantConv*d classes are built at import time (the checker sees ``type``); all have from_float
                new = _QUANT_CLASS[base].from_float(module, wq, bn)  # type: ignore[attr-defined]
                new.train_int32_bias = section.train_int32_bias
                new.bn_statistics = "batch" if bn is None else _layer_bn_statistics(section.bn_statistics, bn)
                new.train(module.training)
                wq.train(module.training)
                replace_module(gm, node, new)
                self.mark(node, layer, "weight", channel_axis=planned.channel_axis)
                changes.append(self.change("replaced", node, layer,
                                           f"{type(module).__name__} -> {type(new).__name__} ({_describe(cfg)})"))
                if bn is not None:
                    bn_node = block.bn
                    assert bn_node is not None
                    stats = {"running": "running statistics, frozen", "batch": "batch statistics",
                             "auto": f"running statistics, frozen, at {RUNNING_STATS_MAX_BITS} weight bits or fewer, "
                                     f"batch statistics above"}[new.bn_statistics]
                    changes.append(Change("folded", bn_node.name, str(bn_node.target), layer, self.spec_path,
                                          f"{type(bn).__name__} folded into {layer} (trains on {stats})"))
                    remove_node(gm, bn_node)
            last = output_block(gm, node).last  # looked up after folding: the BatchNorm node is gone
            if act_cfg is not None and (section.quantize_output or not self._feeds_output(gm, last)):
                cfg = act_cfg
                # per channel along the layer's channel axis: 1 after a conv, -1 after a Linear
                axis = planned.channel_axis if planned.channel_axis is not None else 1
                aq = make_quantizer(cfg, name=f"{layer} (activation)", num_channels=channels, ch_axis=axis,
                                    bit_range=self._bit_range(section, cfg, layer, "activation"))
                aq.train(module.training)
                new_node = insert_after(gm, last, aq, f"{layer}.act_quant")
                self.mark(new_node, layer, "activation", channel_axis=axis)
                changes.append(self.change("inserted", new_node, layer, f"activation quantizer after {last.name} ({_describe(cfg)})"))
            if section.quantize_inputs and input_cfg is not None:
                inserted = self._quantize_input(gm, node, layer, input_cfg)
                if inserted is not None:
                    changes.append(inserted)
            if is_last and input_cfg is not None:
                changes += self._keep_input_bits(gm, node, layer, input_cfg.bits)
            self._link_input_quantizer(gm, node)
        self.current_node = None
        self.warn_skipped(gm, skipped, "quantized")
        return PassResult(gm, bool(changes), tuple(changes))

    def _keep_input_bits(self, gm: fx.GraphModule, node: fx.Node, layer: str, bits: int) -> list[Change]:
        """``keep_first_last`` on the last layer: the quantizer its input comes from (the previous
        layer's activation quantizer) takes ``bits`` too."""
        inp = node.args[0] if node.args else None
        src = self._source(gm, inp) if isinstance(inp, fx.Node) else None
        q = module_of(gm, src) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not isinstance(q, Quantizer):
            return []
        if int(q.bits) == bits and q.bits_schedule is None:
            return []
        # fixed at these bits: the upgrader and a schedule leave it alone
        q.options = dataclasses.replace(q.options, bit_range=None, bits_schedule=None)
        q.set_bits(bits)
        return [self.change("modified", src, layer, f"{src.target} at {bits} bits (keep_first_last: the last layer's input)")]

    @staticmethod
    def _feeds_output(gm: fx.GraphModule, node: fx.Node) -> bool:
        """Whether ``node``'s value is returned by the graph, directly or through ops that keep it
        as it is (flatten, reshape, dropout...)."""
        frontier, seen = [node], set()
        while frontier:
            n = frontier.pop()
            for user in n.users:
                if user.op == "output":
                    return True
                if user not in seen and _keeps_grid(gm, user):
                    seen.add(user)
                    frontier.append(user)
        return False

    def _source(self, gm: fx.GraphModule, node: fx.Node) -> Any:
        """Follow ``node`` back through ops that keep values on a quantization grid."""
        src: Any = node
        while isinstance(src, fx.Node) and src.args and _keeps_grid(gm, src):
            src = src.args[0]
        return src

    def _link_input_quantizer(self, gm: fx.GraphModule, node: fx.Node) -> None:
        """Tell a weight-quantized layer which quantizer's codes it reads, so its eval bias is rounded
        as integer kernels store it (see ``set_input_quantizer``)."""
        layer = module_of(gm, node)
        inp = node.args[0] if node.args else None
        if not isinstance(layer, QUANT_LAYER_TYPES) or not isinstance(inp, fx.Node):
            return
        src = self._source(gm, inp)
        if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(module_of(gm, src), Quantizer):
            layer.set_input_quantizer(module_of(gm, src))

    def _quantize_input(self, gm: fx.GraphModule, node: fx.Node, layer: str, cfg: QuantizerConfig) -> Change | None:
        inp = node.args[0] if node.args else None
        if not isinstance(inp, fx.Node):
            return None
        src = self._source(gm, inp)
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(module_of(gm, src), Quantizer)
                and module_of(gm, src).num_channels is None):
            return None  # already on a per-tensor evefx grid (an activation quantizer, or a shared input quantizer)
        # a per-channel activation grid is re-quantized per tensor: integer kernels take one input scale
        # (onnxruntime's MatMulIntegerToFloat refuses a per-channel input zero point)
        for user in inp.users:  # another layer reading the same tensor already quantized it: share
            prov = provenance(user)
            if prov is not None and prov.pass_name == self.name and prov.role == "input":
                node.replace_input_with(inp, user)
                return None
        non_negative = calls_one_of(gm, src, _NON_NEGATIVE_MODULES, _NON_NEGATIVE_FUNCTIONS, _NON_NEGATIVE_METHODS)
        # per tensor (integer kernels take one input scale); a symmetric unsigned grid would clip
        # negative inputs to 0, so it becomes signed unless the input is known to be non-negative
        update: dict[str, Any] = {"granularity": "per_tensor"}
        if cfg.symmetric and not cfg.signed and not non_negative:
            update["signed"] = True
        in_cfg = cfg.model_copy(update=update)
        q = make_quantizer(in_cfg, name=f"{layer} (input)", num_channels=1, ch_axis=1)
        q.train(module_of(gm, node).training)
        name = unique_name(gm, f"{layer}.input_quant")
        gm.add_submodule(name, q)
        with gm.graph.inserting_before(node):
            new_node = gm.graph.call_module(name, (inp,))
        if "tensor_meta" in inp.meta:
            new_node.meta["tensor_meta"] = inp.meta["tensor_meta"]
        node.replace_input_with(inp, new_node)
        self.mark(new_node, layer, "input")
        return self.change("inserted", new_node, layer, f"input quantizer before {layer} ({_describe(in_cfg)})")

    def ensures(self, gm: fx.GraphModule) -> None:
        self.ensure_marked_are(gm, "weight", QUANT_LAYER_TYPES, "weight-quantized")


def _keeps_grid(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` is an op that keeps its input's values as they are (flatten, reshape,
    dropout, max-pool, a pruner's mask), so a quantized tensor stays on its grid through it."""
    return calls_one_of(gm, node, _PASS_THROUGH_MODULES, _PASS_THROUGH_FUNCTIONS, _PASS_THROUGH_METHODS)


def _describe(cfg: QuantizerConfig) -> str:
    sym = "sym" if cfg.symmetric else "asym"
    sign = "signed" if cfg.signed else "unsigned"
    return f"{cfg.bits} bits, {cfg.fn}, {cfg.granularity}, {sym}, {sign}, {cfg.tracker}"


def quant_summary(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """Per conv/linear layer: weight and activation bits and the weight size in bytes at those bits.

    ``w_bits`` is 32 for a layer left in float and ``a_bits`` None without an activation
    quantizer. ``params`` counts weights and biases (a folded BatchNorm contributes the bias);
    ``bytes`` stores the weights at ``w_bits`` and biases as 32-bit values (scales not counted).

    Example:
        >>> sum(r["bytes"] for r in quant_summary(gm))  # the model's weight size
    """
    a_bits: dict[str, int] = {}
    for n in marked(gm, "quantize", role="activation"):
        q = module_of(gm, n)
        if isinstance(q, Quantizer):
            a_bits[provenance(n).layer] = int(q.bits)
    rows = []
    for node in layer_nodes(gm):
        layer = str(node.target)
        m = module_of(gm, node)
        weights = m.weight.numel()
        biases = m.bias.numel() if m.bias is not None else 0
        w_bits = 32
        if isinstance(m, QUANT_LAYER_TYPES):
            w_bits = int(m.weight_quantizer.bits)
            if m.bn is not None and m.bias is None:
                biases = out_channels(m)
        rows.append({
            "layer": layer,
            "w_bits": w_bits,
            "a_bits": a_bits.get(layer),
            "params": weights + biases,
            "bytes": math.ceil(weights * w_bits / 8) + 4 * biases,
        })
    return rows
