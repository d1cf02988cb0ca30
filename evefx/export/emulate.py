"""What the integer kernels of other CPU classes compute, emulated in numpy.

onnxruntime runs a fused ``QLinearConv``/``QGemm``/``MatMulInteger`` on uint8 activations and int8
weights (u8s8) with different instructions per CPU class:

* x86 with AVX-512 VNNI / AVX-VNNI / AMX, and ARM (SDOT, I8MM): products accumulate in int32. The
  result is exact, so it equals what the QDQ graph computes with optimizations off.
* x86 with AVX2 only (and AVX-512 without VNNI): ``vpmaddubsw`` multiplies u8 x s8 and adds each
  *pair* of neighbouring products into a **saturating int16** before widening to int32. A pair sum
  outside ``[-32768, 32767]`` is clipped and the layer's output is wrong on those CPUs only.

:func:`u8s8_saturation` runs the file's QDQ graph on real inputs (optimizations off), takes the
integer codes entering each such layer and replays the AVX2 accumulation: the pair sums in int16
with saturation against the exact sum. Which neighbours form a pair depends on how onnxruntime packs
the reduction axis (``(c, kh, kw)`` for its im2col path, ``(kh, kw, c)`` for its NHWC path), so both
orders are checked and the worse one is reported. Depthwise convolutions run a kernel without pair
sums and are not affected. A file is portable when no pair of any layer saturates; the quantize
pass's ``target: portable`` guarantees that by construction (weight codes in ``[-64, 63]``).

Example:
    >>> rows = u8s8_saturation("model.onnx", [x])
    >>> [r.layer for r in rows if r.saturated]
    []
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from evefx.export.onnx_graph import consumers, producers

__all__ = ["SaturationRow", "u8s8_saturation", "cpu_flags", "local_cpu_class", "INT16_MIN", "INT16_MAX"]

INT16_MIN, INT16_MAX = -32768, 32767
_MAX_ROWS = 16384  # output positions replayed per layer (a deterministic stride through the batch)


@dataclass(frozen=True)
class SaturationRow:
    """One integer layer under AVX2 u8s8 emulation.

    ``pairs_saturated`` counts the int16 pair sums that left the int16 range; ``outputs_changed``
    is the fraction of output elements whose accumulator differs from the exact one;
    ``max_error_steps`` the largest accumulator error in units of the output's quantization step
    (``s_x * s_w / s_y``; ``None`` when the output is not re-quantized)."""

    layer: str
    op: str
    pairs_checked: int
    pairs_saturated: int
    outputs_changed: float
    max_error_steps: float | None

    @property
    def saturated(self) -> bool:
        return self.pairs_saturated > 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saturated": self.saturated}


def cpu_flags() -> set[str]:
    """The local CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def local_cpu_class() -> str:
    """``x86-vnni``, ``x86-avx2`` (no VNNI: its u8s8 kernels saturate), ``arm`` or ``other``.

    Example:
        >>> local_cpu_class() in ("x86-vnni", "x86-avx2", "arm", "other")
        True
    """
    import platform

    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return "arm"
    flags = cpu_flags()
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "x86-vnni"
    if "avx2" in flags:
        return "x86-avx2"
    return "other"


@dataclass
class _Layer:
    node: onnx.NodeProto
    codes: str  # the uint8 tensor entering the layer (the input of its DequantizeLinear)
    x_zero: int
    weight: np.ndarray  # int8 codes, [C_out, C_in/g, *k] (Conv) or [K, N] (MatMul/Gemm as x @ W)
    scale_ratio: np.ndarray | None  # s_x * s_w / s_y per output channel


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _u8s8_layers(model: onnx.ModelProto) -> list[_Layer]:
    graph = model.graph
    inits = _initializers(graph)
    prod, users = producers(graph), consumers(graph)
    layers = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq_x, dq_w = prod.get(node.input[0]), prod.get(node.input[1])
        if dq_x is None or dq_w is None or dq_x.op_type != "DequantizeLinear" or dq_w.op_type != "DequantizeLinear":
            continue
        w_codes = inits.get(dq_w.input[0])
        zx = inits.get(dq_x.input[2]) if len(dq_x.input) > 2 else None
        if w_codes is None or w_codes.dtype != np.int8 or (zx is not None and zx.dtype != np.uint8):
            continue  # u8u8 and s8s8 kernels have no int16 pair sums; only u8 x s8 saturates
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = w_codes.astype(np.int64)
        if node.op_type == "Conv":
            group = int(attrs.get("group", 1))
            if group > 1 and weight.shape[1] == 1:
                continue  # depthwise: a per-channel kernel that accumulates in int32
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0):
                continue
            weight = weight.T if attrs.get("transB", 0) else weight
        ratio = _scale_ratio(node, dq_x, dq_w, inits, users)
        layers.append(_Layer(node, dq_x.input[0], int(zx.reshape(-1)[0]) if zx is not None else 0, weight, ratio))
    return layers


def _scale_ratio(node: onnx.NodeProto, dq_x: onnx.NodeProto, dq_w: onnx.NodeProto,
                 inits: dict[str, np.ndarray], users: dict[str, list[onnx.NodeProto]]) -> np.ndarray | None:
    """``s_x * s_w / s_y``: one accumulator unit in output steps (None when no Q follows directly)."""
    out = node.output[0]
    nxt = users.get(out, [])
    if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip") and nxt[0].output:
        nxt = users.get(nxt[0].output[0], [])
    q = next((n for n in nxt if n.op_type == "QuantizeLinear"), None)
    if q is None or q.input[1] not in inits:
        return None
    s_x = inits[dq_x.input[1]].astype(np.float64).reshape(-1)
    s_w = inits[dq_w.input[1]].astype(np.float64).reshape(-1)
    s_y = inits[q.input[1]].astype(np.float64).reshape(-1)
    sizes = {s_x.size, s_w.size, s_y.size} - {1}
    if len(sizes) > 1:
        return None  # the next quantizer's channels are not this layer's (a reshape in between)
    return s_x * s_w / s_y


def _conv_columns(x: np.ndarray, node: onnx.NodeProto, weight: np.ndarray, zero: int,
                  channels_last: bool) -> tuple[np.ndarray, int]:
    """im2col of uint8 codes ``x`` [N, C, *spatial] -> rows [M, groups, K] padded with the zero point."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    kernel = list(weight.shape[2:])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dil = list(attrs.get("dilations", [1] * nd))
    pads = list(attrs.get("pads", [0] * 2 * nd))
    group = int(attrs.get("group", 1))
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise ValueError("auto_pad")
    width = [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)]
    xp = np.pad(x, width, constant_values=zero)
    n, c = xp.shape[:2]
    out = [(xp.shape[2 + i] - dil[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(nd)]
    # gather [N, C, *kernel, *out] with strided windows
    from numpy.lib.stride_tricks import as_strided

    st = xp.strides
    shape = (n, c, *kernel, *out)
    strd = (st[0], st[1], *[st[2 + i] * dil[i] for i in range(nd)], *[st[2 + i] * strides[i] for i in range(nd)])
    win = as_strided(xp, shape=shape, strides=strd)
    cg = c // group
    win = win.reshape(n, group, cg, *kernel, *out)
    if channels_last:  # K ordered (kh, kw, c)
        perm = [0, *range(3 + nd, 3 + 2 * nd), 1, *range(3, 3 + nd), 2]
    else:  # K ordered (c, kh, kw)
        perm = [0, *range(3 + nd, 3 + 2 * nd), 1, 2, *range(3, 3 + nd)]
    cols = win.transpose(perm).reshape(-1, group, cg * int(np.prod(kernel)))
    return cols, group


def _weight_rows(weight: np.ndarray, group: int, channels_last: bool) -> np.ndarray:
    """Conv weight [C_out, C_in/g, *k] -> [groups, K, C_out/g] in the same K order as the columns."""
    c_out = weight.shape[0]
    w = weight.reshape(group, c_out // group, *weight.shape[1:])
    if channels_last:
        nd = weight.ndim - 2
        w = w.transpose(0, 1, *range(3, 3 + nd), 2)
    return w.reshape(group, c_out // group, -1).transpose(0, 2, 1)


def _replay(cols: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, int]:
    """Exact minus saturated accumulators [M, N_out] and the number of saturated pair sums."""
    m, k = cols.shape
    if k % 2:
        cols = np.concatenate([cols, np.zeros((m, 1), cols.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((1, w.shape[1]), w.dtype)], axis=0)
    a = cols.astype(np.float64)
    b = w.astype(np.float64)
    error = np.zeros((m, w.shape[1]))
    saturated = 0
    for p in range(0, a.shape[1], 2):
        pair = a[:, p:p + 2] @ b[p:p + 2]  # exact in float64
        clipped = np.clip(pair, INT16_MIN, INT16_MAX)
        hit = pair != clipped
        if hit.any():
            saturated += int(hit.sum())
            error += pair - clipped
    return error, saturated


def _subsample(rows: np.ndarray) -> np.ndarray:
    if rows.shape[0] <= _MAX_ROWS:
        return rows
    step = -(-rows.shape[0] // _MAX_ROWS)
    return rows[::step]


def _layer_rows(layer: _Layer, x: np.ndarray) -> SaturationRow:
    node = layer.node
    scope = node.name.strip("/").split("/")
    name = scope[-2] if len(scope) > 1 else node.name
    worst: tuple[int, float, float | None, int] | None = None
    orders = (False, True) if node.op_type == "Conv" else (False,)
    for channels_last in orders:
        if node.op_type == "Conv":
            cols, group = _conv_columns(x, node, layer.weight, layer.x_zero, channels_last)
            w = _weight_rows(layer.weight, group, channels_last)
        else:
            cols = x.reshape(-1, 1, x.shape[-1])
            w = layer.weight.reshape(1, *layer.weight.shape)
            group = 1
        cols = _subsample(cols)
        checked = saturated = 0
        changed = 0
        max_err = 0.0
        for g in range(group):
            err, sat = _replay(cols[:, g].astype(np.int64), w[g])
            checked += cols.shape[0] * (-(-cols.shape[2] // 2)) * w[g].shape[1]
            saturated += sat
            changed += int((err != 0).sum())
            if sat and layer.scale_ratio is not None:
                lo = g * w[g].shape[1]
                ratio = layer.scale_ratio if layer.scale_ratio.size == 1 else layer.scale_ratio[lo:lo + w[g].shape[1]]
                max_err = max(max_err, float(np.max(np.abs(err) * ratio.reshape(1, -1))))
        total = cols.shape[0] * sum(w[g].shape[1] for g in range(group))
        steps = max_err if layer.scale_ratio is not None else None
        if worst is None or saturated > worst[0]:
            worst = (saturated, changed / max(total, 1), steps, checked)
    assert worst is not None
    return SaturationRow(name, node.op_type, worst[3], worst[0], worst[1], worst[2])


def u8s8_saturation(path: str | Path | onnx.ModelProto, batches: Sequence[Any]) -> list[SaturationRow]:
    """Replay the AVX2 u8s8 accumulation of every u8 x s8 layer of an ONNX file on ``batches``
    (tensors or tuples of tensors, the graph's inputs in order). One row per layer, in graph order.

    Example:
        >>> any(r.saturated for r in u8s8_saturation("model.onnx", [x]))
        False
    """
    import onnxruntime as ort

    model = onnx.load(str(path)) if not isinstance(path, onnx.ModelProto) else onnx.ModelProto.FromString(path.SerializeToString())
    layers = _u8s8_layers(model)
    if not layers:
        return []
    existing = {o.name for o in model.graph.output}
    inputs = {i.name for i in model.graph.input}
    for layer in layers:
        if layer.codes not in existing and layer.codes not in inputs:
            model.graph.output.append(helper.make_tensor_value_info(layer.codes, onnx.TensorProto.UINT8, None))
            existing.add(layer.codes)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    outs = [o.name for o in session.get_outputs()]
    codes: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        tensors = (batch,) if not isinstance(batch, (tuple, list)) else tuple(batch)
        feed = {n: t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t) for n, t in zip(names, tensors)}
        got = dict(zip(outs, session.run(None, feed)))
        for layer in layers:
            value = got.get(layer.codes, feed.get(layer.codes))
            codes.setdefault(layer.codes, []).append(np.asarray(value))
    rows = []
    for layer in layers:
        x = np.concatenate(codes[layer.codes], axis=0)
        rows.append(_layer_rows(layer, x))
    return rows
