"""Packed low-bit weights: layers of 4 bits or fewer stored as INT4/UINT4, two weights per byte.

``weight_storage: packed`` (a quantize section option, or ``export_onnx(weight_storage=...)``)
rewrites the exported int8 QDQ graph, layer by layer:

* a conv (or any weight that is not a plain Linear) keeps its ``DequantizeLinear``, per channel on
  axis 0, with INT4 (signed) or UINT4 (unsigned) codes and zero point: ONNX opset 21. onnxruntime
  1.32's CPU provider runs these (the DQ dequantizes the weight, the conv runs in float: it has no
  integer conv kernel for int4 weights), so the file is half the size of the int8 one but not faster;
* a Linear (``Gemm``) becomes onnxruntime's ``com.microsoft.MatMulNBits`` (4-bit weights in blocks of
  :data:`MATMULNBITS_BLOCK` along the input features, one scale per block, which repeats the channel's
  scale, so the codes and values are exactly the quantizer's), with ``accuracy_level`` 0: float
  compute on the dequantized weights. Level 4 (int8 compute) re-quantizes the input per block and
  moved a quarter of a test layer's outputs by 2-3 steps, so evefx never writes it. Measured on
  the AVX2-only EPYC (``bench/bench_onnx.py --int4``, docs/export.md): MatMulNBits (level 0) is
  several to tens of times faster than Q/DQ INT4 + Gemm, so it is the form of every packed Linear
  (``linear_form="qdq"`` keeps the Q/DQ form);
* 5-8 bit layers keep their int8 codes.

Example:
    >>> forms = pack_weights(model, {"features.0": 4, "classifier": 4})
    >>> forms
    {'features.0': 'int4', 'classifier': 'matmulnbits'}
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import fx, nn

from evefx.errors import ExportError
from evefx.graph import provenance
from evefx.export.onnx_graph import consumers, producers, scope_of
from evefx.modules import QUANT_LAYER_TYPES

__all__ = ["PACKED_MAX_BITS", "MIN_PACKED_OPSET", "MATMULNBITS_BLOCK", "packed_layers", "require_opset", "name_weight_nodes",
           "upgrade_opset", "int4_tensor", "int4_codes", "pack_weights", "matmulnbits_weights",
           "matmulnbits_codes", "weight_bytes"]

PACKED_MAX_BITS = 4
"""Weights of at most this many bits are packed; wider ones keep int8 codes."""

MIN_PACKED_OPSET = 21
"""INT4/UINT4 tensors in ``QuantizeLinear``/``DequantizeLinear`` need ONNX opset 21."""

MATMULNBITS_BLOCK = 128
"""Block length of ``MatMulNBits`` weights along K: one float scale (4 bytes) per 64 bytes of codes.
In a probe on the EPYC (Linear 512-4096 x 10-1024, batch 1 and 8) 128 was among the fastest of
32-1024. Inputs narrower than a block use one block of the next power of two (at least 16, the
kernel's minimum)."""

LinearForm = Literal["matmulnbits", "qdq"]
_SPEC_PATH = re.compile(r"^(passes\[(\d+)\])")


def packed_layers(model: nn.Module, storage: str | None = None) -> dict[str, tuple[int, str]]:
    """Layers whose weights are stored packed: ``{layer: (bits, where it was asked)}``.

    ``storage`` (``int8`` or ``packed``) applies to every layer; ``None`` reads each layer's quantize
    section (``weight_storage``, overrides included). Only layers of <= 4 bits are packed.

    Example:
        >>> packed_layers(gm)           # spec: weight_storage: packed, weight bits 4
        {'features.0': (4, 'passes[0].weight_storage'), ...}
    """
    if storage not in (None, "int8", "packed"):
        raise ExportError(f"weight_storage must be 'int8' or 'packed' (got {storage!r})")
    sections = _weight_sections(model)
    spec = getattr(model, "spec", None)
    out: dict[str, tuple[int, str]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QUANT_LAYER_TYPES) or not module.weight_quantizer.enabled:
            continue
        bits = int(module.weight_quantizer.bits)
        if storage is not None:
            wanted, where = storage, "export_onnx(weight_storage=...)"
        elif name in sections and spec is not None:
            index, path = sections[name]
            wanted, where = spec.passes[index].for_layer(name).weight_storage, f"{path}.weight_storage"
        else:
            continue
        if wanted == "packed" and bits <= PACKED_MAX_BITS:
            out[name] = (bits, where)
    return out


def _weight_sections(model: nn.Module) -> dict[str, tuple[int, str]]:
    """Layer -> (index in spec.passes, spec path) of the quantize section that quantized its weights."""
    out: dict[str, tuple[int, str]] = {}
    if isinstance(model, fx.GraphModule):
        for node in model.graph.nodes:
            prov = provenance(node)
            match = _SPEC_PATH.match(prov.spec_path) if prov is not None else None
            if prov is not None and prov.role == "weight" and match:
                out[str(node.target)] = (int(match.group(2)), match.group(1))
    return out


def require_opset(layers: dict[str, tuple[int, str]], opset: int) -> None:
    """Refuse packed storage below opset 21, naming the first layer and what to do."""
    if layers and opset < MIN_PACKED_OPSET:
        layer, (bits, where) = next(iter(layers.items()))
        raise ExportError(
            f"{where}: layer {layer} has {bits}-bit weights stored packed (INT4), which needs ONNX opset >= "
            f"{MIN_PACKED_OPSET} (got opset {opset}); export with opset={MIN_PACKED_OPSET} (or leave opset unset), "
            f"or set weight_storage: int8 for this layer")


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The model at ``opset`` of the default domain (the TorchScript exporter writes at most 20)."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as e:  # the converter lacks an adapter for some op
        raise ExportError(f"cannot convert the exported graph from opset {current} to {opset} ({e}); "
                          f"export with weight_storage: int8 and opset {current}") from e


def name_weight_nodes(model: onnx.ModelProto, codes: dict[str, np.ndarray]) -> dict[str, str]:
    """Rename each weight ``DequantizeLinear`` to ``/<layer>/DequantizeLinear`` with the layer's
    qualified name; returns ``{layer: node name}``.

    The TorchScript exporter names a node after the attribute names of its modules, which in a
    GraphModule lose their parents (``layer1.0.conv1`` and ``layer2.0.conv1`` are both ``conv1``,
    ``conv1_1``): a layer is found by that attribute name and by its integer codes (``codes``:
    layer -> codes), taken in graph order, so later steps can key the nodes by layer. (A child of
    a container keeps its container's name: ``downsample.0``.)
    """
    inits = {i.name: i for i in model.graph.initializer}
    left = dict(codes)
    named: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits or node.name.endswith("_bias_dq"):
            continue
        scope = scope_of(node)
        tails = {scope, re.sub(r"_\d+$", "", scope)}  # conv1, conv1_1; downsample.0 (a container's child)
        array = None
        for layer, c in left.items():
            if not any(layer == t or layer.endswith("." + t) for t in tails):
                continue
            array = numpy_helper.to_array(inits[node.input[0]]) if array is None else array
            if array.shape == tuple(c.shape) and np.array_equal(array, c):
                node.name = f"/{layer}/DequantizeLinear"
                named[layer] = node.name
                del left[layer]
                break
    return named


# ----------------------------------------------------------------------------- INT4/UINT4 tensors
def int4_tensor(codes: np.ndarray, signed: bool, name: str) -> onnx.TensorProto:
    """Integer codes as an INT4 (signed) or UINT4 initializer, two per byte (onnx packs them).

    Example:
        >>> t = int4_tensor(np.array([-8, 7, 3]), True, "w")
        >>> len(t.raw_data), int4_codes(t).tolist()
        (2, [-8, 7, 3])
    """
    lo, hi = (-8, 7) if signed else (0, 15)
    codes = np.asarray(codes)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ExportError(f"{name}: codes in [{codes.min()}, {codes.max()}] do not fit "
                          f"{'INT4' if signed else 'UINT4'} [{lo}, {hi}]")
    return numpy_helper.from_array(codes.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4), name)


def int4_codes(tensor: onnx.TensorProto) -> np.ndarray:
    """The integer codes of an INT4/UINT4 (or any integer) initializer, as int64."""
    return numpy_helper.to_array(tensor).astype(np.int64)


def _block_of(k: int) -> int:
    block = 16
    while block < min(k, MATMULNBITS_BLOCK):
        block *= 2
    return block


def matmulnbits_weights(codes: np.ndarray, zero_point: np.ndarray, signed: bool,
                        block: int | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """``MatMulNBits`` storage of weight codes ``[N, K]`` (zero point per row): ``B`` as uint8
    ``[N, blocks, block / 2]`` (unsigned 4-bit values, low nibble first), the packed uint8 zero
    points ``[N, ceil(blocks / 2)]`` (None when every one is the kernel's default 8) and the block
    length. Signed codes are offset by 8; the padding past K holds the zero point (value 0).

    Example:
        >>> b, zp, block = matmulnbits_weights(np.array([[-8, 7]]), np.array([0]), True)
        >>> b.shape, zp, block
        ((1, 1, 8), None, 16)
    """
    n, k = codes.shape
    block = block or _block_of(k)
    blocks = -(-k // block)
    offset = 8 if signed else 0
    zq = (np.asarray(zero_point).reshape(-1).astype(np.int64) + offset) * np.ones(n, np.int64)
    q = np.repeat(zq[:, None], blocks * block, axis=1)
    q[:, :k] = codes.astype(np.int64) + offset
    if q.min() < 0 or q.max() > 15:
        raise ExportError(f"codes in [{codes.min()}, {codes.max()}] do not fit 4 bits")
    nibbles = q.astype(np.uint8).reshape(n, blocks, block)
    b = (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).astype(np.uint8)
    if np.all(zq == 8):
        return b, None, block
    zfull = np.repeat(zq[:, None], blocks + blocks % 2, axis=1).astype(np.uint8)
    return b, (zfull[:, 0::2] | (zfull[:, 1::2] << 4)).astype(np.uint8), block


def matmulnbits_codes(b: np.ndarray, zero_points: np.ndarray | None, k: int, signed: bool) -> np.ndarray:
    """The weight codes ``[N, K]`` a ``MatMulNBits`` ``B`` holds (inverse of :func:`matmulnbits_weights`)."""
    n = b.shape[0]
    q = np.empty((*b.shape[:2], b.shape[2] * 2), np.int64)
    q[..., 0::2], q[..., 1::2] = b & 0x0F, b >> 4
    return q.reshape(n, -1)[:, :k] - (8 if signed else 0)


# ----------------------------------------------------------------------------- the graph rewrite
def pack_weights(model: onnx.ModelProto, layers: dict[str, Any], linear_form: LinearForm = "matmulnbits") -> dict[str, str]:
    """Store the weight codes of ``layers`` packed, in place; returns ``{layer: form}`` with form
    ``int4`` (Q/DQ with INT4/UINT4 codes) or ``matmulnbits``. Run after the passes of
    :mod:`evefx.export.rewrite` (``QuantizeBiases``)."""
    if linear_form not in ("matmulnbits", "qdq"):
        raise ExportError(f"linear_form must be 'matmulnbits' or 'qdq' (got {linear_form!r})")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    prod, users = producers(graph), consumers(graph)
    forms: dict[str, str] = {}
    replace: dict[int, onnx.NodeProto] = {}
    drop: set[int] = set()
    index = {n.output[0]: i for i, n in enumerate(graph.node) if n.output}
    for node in list(graph.node):
        layer = scope_of(node)
        if node.op_type != "DequantizeLinear" or layer not in layers or node.input[0] not in inits:
            continue
        codes_init = inits[node.input[0]]
        if codes_init.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) or node.name.endswith("_bias_dq"):
            continue
        codes = numpy_helper.to_array(codes_init).astype(np.int64)
        signed = codes_init.data_type == onnx.TensorProto.INT8
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 else np.zeros(1, np.int64)
        site = _linear_site(users, node, codes) if linear_form == "matmulnbits" else None
        if site is not None:
            product, between = site
            replace[index[product.output[0]]] = _to_matmulnbits(graph, product, prod, inits, codes, scale, zero, signed,
                                                                layer)
            drop.update(index[n.output[0]] for n in (node, *between))
            forms[layer] = "matmulnbits"
            continue
        w = int4_tensor(codes, signed, f"{layer}.weight_int4")
        z = int4_tensor(np.broadcast_to(zero, scale.shape), signed, f"{layer}.weight_zero_point_int4")
        graph.initializer.extend([w, z])
        node.input[0], node.input[2] = w.name, z.name
        forms[layer] = "int4"
    nodes = [replace.get(i, n) for i, n in enumerate(graph.node) if i not in drop]
    del graph.node[:]
    graph.node.extend(nodes)
    if any(f == "matmulnbits" for f in forms.values()) and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(graph)
    missing = sorted(set(layers) - set(forms))
    if missing:
        raise ExportError(f"layer {missing[0]}: no integer weight found in the exported graph to pack; "
                          f"report a bug with this message, or set weight_storage: int8 for it")
    return forms


def _linear_site(users: dict[str, list[onnx.NodeProto]], dq: onnx.NodeProto,
                 codes: np.ndarray) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The product a Linear's ``DQ(W)`` feeds as the TorchScript exporter writes a Linear, and the
    nodes between them, all of which one ``MatMulNBits`` replaces (it takes A of any rank [..., K]):
    ``Gemm(x, DQ(W), b)`` with ``transB=1`` (2-D inputs), or ``MatMul(x, Transpose(DQ(W)))`` with the
    bias in an Add after it (tokens). None for anything else (a conv, a per-input-channel scale)."""
    axis = _attributes(dq).get("axis", 1)
    readers = users.get(dq.output[0], [])
    if codes.ndim != 2 or not (axis == 0 or codes.shape[0] == 1) or len(readers) != 1:
        return None
    reader, attrs = readers[0], _attributes(readers[0])
    if reader.op_type == "Gemm":
        plain = (reader.input[1] == dq.output[0] and attrs.get("transB", 0) == 1 and not attrs.get("transA", 0)
                 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)
        return (reader, []) if plain else None
    if reader.op_type == "Transpose" and attrs.get("perm") in (None, [1, 0]):
        matmul = users.get(reader.output[0], [])
        if len(matmul) == 1 and matmul[0].op_type == "MatMul" and list(matmul[0].input)[1:] == [reader.output[0]]:
            return matmul[0], [reader]
    return None


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _to_matmulnbits(graph: onnx.GraphProto, gemm: onnx.NodeProto, prod: dict[str, onnx.NodeProto],
                    inits: dict[str, onnx.TensorProto], codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                    signed: bool, layer: str) -> onnx.NodeProto:
    n, k = codes.shape
    b, zp, block = matmulnbits_weights(codes, zero, signed)
    blocks = b.shape[1]
    scales = np.repeat(np.broadcast_to(scale.reshape(-1), (n,))[:, None], blocks, axis=1).astype(np.float32)
    inputs = [gemm.input[0], f"{layer}.weight_nbits", f"{layer}.weight_nbits_scale"]
    graph.initializer.extend([numpy_helper.from_array(b, inputs[1]), numpy_helper.from_array(scales.reshape(-1), inputs[2])])
    if zp is not None:
        inputs.append(f"{layer}.weight_nbits_zero_point")
        graph.initializer.append(numpy_helper.from_array(zp.reshape(-1), inputs[-1]))
    if len(gemm.input) > 2 and gemm.input[2]:
        inputs += [""] * (5 - len(inputs)) + [_float_bias(graph, gemm.input[2], prod, inits, layer)]
    name = f"/{layer}/MatMulNBits"
    return helper.make_node("MatMulNBits", inputs, list(gemm.output), name=name, domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=0)


def _float_bias(graph: onnx.GraphProto, tensor: str, prod: dict[str, onnx.NodeProto],
                inits: dict[str, onnx.TensorProto], layer: str) -> str:
    """MatMulNBits takes a float bias: the int32 bias codes times their scale, as the DQ computed."""
    if tensor in inits:
        return tensor
    dq = prod[tensor]
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    name = f"{layer}.bias_nbits"
    graph.initializer.append(numpy_helper.from_array((codes * scale).astype(np.float32), name))
    return name


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    dead = [i for i in graph.initializer if i.name not in used]
    for init in dead:
        graph.initializer.remove(init)
    nodes = [n for n in graph.node if not (n.op_type == "DequantizeLinear" and n.name.endswith("_bias_dq")
                                           and not any(n.output[0] in m.input for m in graph.node))]
    if len(nodes) != len(graph.node):
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_unused_initializers(graph)


# ----------------------------------------------------------------------------- bytes per layer
def _nbytes(init: onnx.TensorProto) -> int:
    count = int(np.prod(init.dims)) if init.dims else 1
    if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def weight_bytes(model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    """Per quantized layer: how its weight is stored (``int8``, ``int4``, ``matmulnbits``) and the
    bytes of its codes, scales and zero points (biases not counted).

    Example:
        >>> weight_bytes(onnx.load("m.onnx"))["fc"]
        {'form': 'matmulnbits', 'bytes': 1320}
    """
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"form": "", "bytes": 0})
    for node in model.graph.node:
        layer = scope_of(node) or node.name
        if node.op_type == "MatMulNBits":
            names, form = node.input[1:4], "matmulnbits"
        elif (node.op_type == "DequantizeLinear" and node.input[0] in inits and not node.name.endswith("_bias_dq")
              and inits[node.input[0]].data_type != onnx.TensorProto.INT32):
            packed = inits[node.input[0]].data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
            names, form = node.input[:3], "int4" if packed else "int8"
        else:
            continue
        out[layer]["form"] = form
        out[layer]["bytes"] += sum(_nbytes(inits[n]) for n in names if n in inits)
    return dict(out)
