"""Parity of an exported ONNX file with the PyTorch module it came from (eval mode, CPU onnxruntime).

Three comparisons: :func:`graph_parity` (PyTorch vs the QDQ graph as written, op by op: each
quantizer computed from PyTorch's values of the quantizers before it), and :func:`check_parity`
end to end, PyTorch vs this CPU's integer kernels and kernels vs graph (``reference=None``).

Tolerances (also in the README):

* an output written by a quantizer (``DequantizeLinear``): every element within **one quantization
  step** of that quantizer (its largest scale). Integer kernels round intermediate results once
  where PyTorch rounds in float; a code that lands on the other side of a tie moves by one step;
* any other output of a quantized model: ``0.05 * max|y|``: the last float op amplifies step-sized
  differences of the codes it reads;
* a float model: ``1e-4 + 1e-3 * max|y|``.

For classifier-shaped outputs (``[N, K]``, ``K > 1``) top-1 decisions must agree on at least 99.5%
of the rows; a row agrees when onnxruntime's top class scores, in PyTorch, within one step of the
output quantizer of PyTorch's best (quantized logits often tie, and classes closer than the file's
resolution have no single decision). End to end, at least 95% of the elements must be within
tolerance (:data:`WITHIN_MIN`; op by op, all). Models with quantizers below 8 bits are
held to the element-wise rule only (top-1 agreement is reported): one step of a 2-4-bit code is a
large move, and the one-step ties that grow through a deep network reorder near-tied logits. Op by
op, :func:`graph_parity` also bounds how often a code may be one step off (:data:`OFF_BY_ONE_MAX`). When a check fails, :func:`first_divergence` re-runs both sides with every module's
output exposed and names the first one (in graph order) that disagrees.

Example:
    >>> result = check_parity(reference, "model.onnx", [x])
    >>> result.passed, result.top1_agreement
    (True, 100.0)
"""
from __future__ import annotations

import dataclasses
import logging

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import onnx
import torch
from torch.utils._pytree import tree_leaves
from onnx import helper, numpy_helper
from torch import nn

from evefx.export.deploy import safe_deepcopy
from evefx.export.onnx_graph import consumers, scope_of
from evefx.modules import Quantizer

log = logging.getLogger(__name__)

__all__ = ["Parity", "check_parity", "graph_parity", "degenerate_outputs", "first_divergence", "ort_session", "flatten_outputs", "plain_outputs", "TOP1_MIN"]

TOP1_MIN = 99.5
"""Minimum top-1 agreement (percent) between PyTorch and onnxruntime."""

WITHIN_MIN = 0.95
"""End to end (and kernels vs graph), the share of output elements that must lie within tolerance.
A tie rounded differently in one layer moves a code by one step, and the layers after it carry
that difference on (a residual sum re-quantized to a finer grid turns it into 2-3 steps), so in a
deep network a few percent of the outputs legitimately differ by more than one step. The op-by-op
:func:`graph_parity` has no such allowance: there every element is within one step."""

OFF_BY_ONE_MAX = 1e-3
"""Op by op, the largest fraction of a quantizer's codes that may be one step off PyTorch's where
PyTorch's value is not at a rounding tie (:data:`TIE_WINDOW`). A tie goes either way with the
float summation order, and some layers make many exact ties (an output grid finer than the
accumulator's ``s_x * s_w``: mnasnet's last blocks put 0.19% of a quantizer's codes a step off, at
ties); away from ties a code moves when the file computes an op otherwise: a transformer's MatMul
bias left in float (until 2026-11-30) put 0.68% of the 4-bit codes after it a step off away from
ties, and those flips grew to 0.31 max |diff| end to end. At least :data:`OFF_BY_ONE_MIN_CODES`
codes must differ."""

TIE_WINDOW = 1e-3
"""Within this many quantization steps of ``k + 0.5`` a PyTorch value is at a rounding tie. Long
float sums can differ by more: away from ties at most 0.0041% of a quantizer's codes moved on the
zoo's models (shufflenet_v2 W8A8), 24 times under :data:`OFF_BY_ONE_MAX`."""

OFF_BY_ONE_MIN_CODES = 10


@dataclass(frozen=True)
class Parity:
    """Figures of one parity check. ``max_steps`` is the largest difference in quantization steps
    (quantized outputs only); ``top1_agreement`` is in percent (classifier outputs only)."""

    samples: int
    max_abs_diff: float
    tolerance: float
    rule: str
    within_tolerance: float
    max_steps: float | None
    top1_agreement: float | None
    passed: bool
    top1_required: bool = True
    first_divergence: str | None = None
    off_by_one: float | None = None
    """Op by op (:func:`graph_parity`): the largest fraction, over the quantizers, of codes one step
    off PyTorch's where PyTorch's value is not at a rounding tie."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ort_session(path_or_bytes: Any, threads: int = 1, optimized_path: str | None = None, optimize: bool = True) -> Any:
    """A CPU onnxruntime session with all graph optimizations (what deployment runs: Q/DQ fused into
    integer kernels), or with none (``optimize=False``: the graph as written, Q/DQ in float).

    Example:
        >>> ort_session("model.onnx", optimize=False).run(None, {"x": x.numpy()})
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])


def plain_outputs(out: Any) -> Any:
    """``out`` with every dataclass instance (a model's ``Output(logits=..., hidden=...)``) made a
    dict of its fields, recursively; tuples, lists and dicts keep their type. The TorchScript
    exporter and pytree read those containers, not dataclasses.

    Example:
        >>> plain_outputs(Output(logits=y, hidden=h))
        {'logits': y, 'hidden': h}
    """
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return {f.name: plain_outputs(getattr(out, f.name)) for f in dataclasses.fields(out)}
    if isinstance(out, dict):
        return {k: plain_outputs(v) for k, v in out.items()}
    if isinstance(out, tuple) and not hasattr(out, "_fields"):  # a named tuple keeps its fields
        return tuple(plain_outputs(v) for v in out)
    if isinstance(out, list):
        return [plain_outputs(v) for v in out]
    return out


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Tensors of a module's output in the order ``torch.onnx.export`` writes them (dataclass
    fields in their order, see :func:`plain_outputs`)."""
    return [t for t in tree_leaves(plain_outputs(out)) if isinstance(t, torch.Tensor)]


def _as_tuple(inputs: Any) -> tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _run_torch(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    with torch.no_grad():
        _reset(model)
        return [t.detach().float().cpu().numpy() for t in flatten_outputs(model(*(t.cpu() for t in inputs)))]


def _reset(model: nn.Module) -> None:
    # stateful (spiking) modules start every sample batch from rest, as the exported graph does
    for m in model.modules():
        fn = getattr(m, "reset_state", None)
        if callable(fn):
            fn()


def _run_ort(session: Any, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


def output_steps(model: onnx.ModelProto) -> list[float | None]:
    """Per graph output: the quantization step of the ``DequantizeLinear`` that writes it, else None."""
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    steps: list[float | None] = []
    for out in model.graph.output:
        node = prod.get(out.name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            steps.append(float(np.max(numpy_helper.to_array(inits[node.input[1]]))))
        else:
            steps.append(None)
    return steps


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def check_parity(
    reference: nn.Module | None,
    onnx_path: str,
    batches: Sequence[Any],
    *,
    tolerance: float | None = None,
    top1_min: float = TOP1_MIN,
    threads: int = 1,
    optimize: bool = True,
    within_min: float = WITHIN_MIN,
) -> Parity:
    """Compare ``reference`` (run in eval mode on a copy) with onnxruntime on every batch in ``batches``.

    ``optimize=False`` runs the graph as written (Q/DQ in float: "graph vs PyTorch"); the default
    runs what deployment runs on this CPU. ``reference=None`` compares the optimized session with
    the unoptimized one ("kernels vs graph"). ``tolerance`` overrides the absolute tolerance of the
    rules in the module docstring and ``top1_min`` the required top-1 agreement (percent).

    Example:
        >>> check_parity(gm, "model.onnx", [torch.rand(8, 1, 28, 28)]).passed
        True
    """
    model = onnx.load(onnx_path)
    steps = output_steps(model)
    quantized = _has_qdq(model)
    session = ort_session(onnx_path, threads, optimize=optimize)
    if reference is None:
        graph = ort_session(onnx_path, threads, optimize=False)
        expect = lambda inputs: [np.asarray(a, dtype=np.float32) for a in _run_ort(graph, inputs)]  # noqa: E731
        required = not any(b < 8 for b in _qdq_bits(model))
    else:
        ref = safe_deepcopy(reference).eval().cpu()
        expect = lambda inputs: _run_torch(ref, inputs)  # noqa: E731
        # below 8 bits a one-step difference is the deployment's own resolution and reorders near-tied
        # logits, so top-1 agreement is reported but only required of models quantized at 8 bits or more
        required = not any(isinstance(m, Quantizer) and m.enabled and int(m.bits) < 8 for m in ref.modules())
    pairs = []
    for batch in batches:
        inputs = _as_tuple(batch)
        pairs.append((expect(inputs), _run_ort(session, inputs)))
    return _compare_outputs(pairs, steps, quantized, tolerance, top1_min, required, within_min)


def _compare_outputs(pairs: Sequence[tuple[list[np.ndarray], list[Any]]], steps: list[float | None], quantized: bool,
                     tolerance: float | None, top1_min: float, required: bool, within_min: float = 1.0) -> Parity:
    """The rules of the module docstring over ``(expected, got)`` output lists, one pair per batch."""
    samples, worst, worst_tol, worst_steps = 0, 0.0, None, None
    within_num = within_den = 0
    agree = rows = 0
    rule = ""
    for expected, got in pairs:
        samples += int(expected[0].shape[0]) if expected and expected[0].ndim else 1
        for i, (e, g) in enumerate(zip(expected, got)):
            g = np.asarray(g, dtype=np.float32).reshape(e.shape)
            diff = np.abs(e - g)
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            step = steps[i] if i < len(steps) else None
            if tolerance is not None:
                tol, rule = tolerance, f"given tolerance {tolerance:g}"
            elif step is not None:
                tol, rule = step * (1 + 1e-4) + 1e-7, "one quantization step of the output quantizer"
            elif quantized:
                tol, rule = 0.05 * scale + 1e-6, "0.05 * max|y| (float output of a quantized model)"
            else:
                tol, rule = 1e-4 + 1e-3 * scale, "1e-4 + 1e-3 * max|y| (float model)"
            d = float(diff.max()) if diff.size else 0.0
            if worst_tol is None or d - tol > worst - worst_tol:
                worst, worst_tol = d, tol
            within_num += int((diff <= tol).sum())
            within_den += diff.size
            if step is not None:
                worst_steps = max(worst_steps or 0.0, d / step)
            if i == 0 and e.ndim == 2 and e.shape[1] > 1:
                agree += _top1_agree(e, g, step or 0.0)
                rows += e.shape[0]
    top1 = 100.0 * agree / rows if rows else None
    within = within_num / within_den if within_den else 1.0
    passed = within >= within_min and (top1 is None or not required or top1 >= top1_min)
    if within_min < 1.0:
        rule += f", on at least {100 * within_min:g}% of the elements"
    return Parity(samples, worst, float(worst_tol or 0.0), rule, within, worst_steps, top1, passed, required)


def _qdq_bits(model: onnx.ModelProto) -> list[int]:
    """Bit widths of the file's quantizers (narrow ones carry a Clip of their codes)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    bits = []
    for node in model.graph.node:
        if node.op_type == "Clip" and len(node.input) == 3 and node.input[1] in inits and node.input[2] in inits:
            span = int(inits[node.input[2]]) - int(inits[node.input[1]]) + 1
            bits.append(max(1, int(np.ceil(np.log2(span)))))
    return bits


def degenerate_outputs(reference: nn.Module, batches: Sequence[Any]) -> str | None:
    """Why the reference's outputs cannot show a wrong file (NaN, all zero, the same for every
    sample), or None. A parity check on such outputs would pass vacuously (0 == 0).

    Example:
        >>> degenerate_outputs(model, [torch.rand(64, 1, 28, 28)]) is None
        True
    """
    ref = safe_deepcopy(reference).eval().cpu()
    outs: list[list[np.ndarray]] = []
    for batch in batches:
        outs.append(_run_torch(ref, _as_tuple(batch)))
    for i in range(len(outs[0]) if outs else 0):
        y = np.concatenate([o[i].reshape(o[i].shape[0] if o[i].ndim else 1, -1) for o in outs], axis=0)
        if not np.isfinite(y).all():
            return f"output {i} contains NaN or Inf"
        if not np.any(y):
            return f"output {i} is zero for every sample"
        if y.shape[0] > 1 and np.all(y == y[:1]):
            return f"output {i} is the same for every sample"
    return None


def _top1_agree(expected: np.ndarray, got: np.ndarray, step: float = 0.0) -> int:
    """Rows where onnxruntime's top class is one of PyTorch's top classes: in PyTorch it scores within
    one output quantization step (``step``; 0 for a float output) of the best. Classes closer than
    one step are a tie at the file's resolution, which a one-step rounding difference decides."""
    best = expected.max(axis=1, keepdims=True)
    picked = np.take_along_axis(expected, got.argmax(axis=1)[:, None], axis=1)
    return int((picked >= best - step * (1 + 1e-4)).sum())


def _module_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], names: set[str],
                    tie_distance: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The outputs of the named modules on ``inputs``; with ``tie_distance``, also each named
    quantizer's distance from a rounding tie per element (see :func:`_distance_from_tie`)."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name, module in model.named_modules():
        if name in names:
            def hook(m: nn.Module, args: Any, out: Any, name: str = name) -> None:
                if isinstance(out, torch.Tensor):
                    captured[name] = out.detach().float().cpu().clone().numpy()  # a copy: a later in-place op (ReLU(inplace=True)) would change it
                if tie_distance is not None and isinstance(m, Quantizer) and args and isinstance(args[0], torch.Tensor):
                    tie_distance[name] = _distance_from_tie(m, args[0])
            handles.append(module.register_forward_hook(hook))
    try:
        _run_torch(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def _distance_from_tie(quantizer: Quantizer, x: torch.Tensor) -> np.ndarray:
    """How far, in quantization steps, each ``x / s`` lies from a rounding tie ``k + 0.5``: a code
    one step off PyTorch's is a tie decided by float rounding only where this is tiny."""
    u = x.detach().double() / quantizer._view(quantizer.scale.detach().double(), x)
    return (u - torch.floor(u) - 0.5).abs().float().cpu().numpy()


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """The element type onnx's shape inference gives each intermediate value (none when it fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # noqa: BLE001 - the types only refine what is declared; FLOAT is the default
        log.debug("shape inference failed (%s): intermediate values declared float", e)
        return {}
    return {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info if v.type.tensor_type.elem_type}


def first_divergence(
    reference: nn.Module, onnx_path: str, inputs: Any, quantizer_steps: dict[str, float] | None = None
) -> str | None:
    """Name the first module (in the ONNX graph's order) whose output differs between PyTorch and
    onnxruntime, with the size of the difference.

    With ``quantizer_steps`` (module path -> step) only quantizer outputs are compared, each within one
    step; otherwise every module's last output is compared within ``1e-4 + 1e-3 * max|y|`` (a
    quantizer's within one of its steps).

    Example:
        >>> first_divergence(gm, "model.onnx", x, {"features_0_act_quant": 0.02})
        'features_3_act_quant (node /features_3_act_quant/DequantizeLinear): ...'
    """
    inputs = _as_tuple(inputs)
    model = onnx.load(onnx_path)
    value_of: dict[str, tuple[str, str]] = {}  # module path -> (tensor, node name) of its last output
    order: list[str] = []
    graph_inputs = {i.name for i in model.graph.input}
    for node in model.graph.node:
        scope = scope_of(node)
        if not scope or not node.output or node.op_type in ("Constant",) or node.name.endswith(("_requant_q", "_requant_dq", "_bias_dq")):
            continue
        if quantizer_steps is not None and (scope not in quantizer_steps or node.op_type != "DequantizeLinear"):
            continue
        if scope not in value_of:
            order.append(scope)
        value_of[scope] = (node.output[0], node.name)
    if not order:
        return None
    existing = {o.name for o in model.graph.output}
    types = _value_types(model)
    for scope in order:
        name = value_of[scope][0]
        if name not in existing and name not in graph_inputs:
            # integer values too (a spiking text model's repeated token ids): declared with their own type
            model.graph.output.append(helper.make_tensor_value_info(name, types.get(name, onnx.TensorProto.FLOAT), None))
            existing.add(name)
    session = ort_session(model.SerializeToString())
    out_names = [o.name for o in session.get_outputs()]
    names = [i.name for i in session.get_inputs()]
    got = dict(zip(out_names, session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})))
    expected = _module_outputs(safe_deepcopy(reference).eval().cpu(), inputs, set(order))
    # a quantizer's output may differ by one step (a rounding tie decided differently by an integer kernel)
    own_steps = {name: float(m.qparams()[0].max()) for name, m in reference.named_modules()
                 if isinstance(m, Quantizer) and m.enabled and bool(m.initialized)}
    for scope in order:
        tensor, node_name = value_of[scope]
        if scope not in expected or tensor not in got:
            continue
        e = expected[scope]
        g = np.asarray(got[tensor], dtype=np.float32)
        if g.size != e.size:
            continue
        diff = float(np.max(np.abs(e - g.reshape(e.shape)))) if e.size else 0.0
        if quantizer_steps is not None:
            step = quantizer_steps[scope]
            if diff > step * (1 + 1e-4) + 1e-7:
                return f"{scope} (ONNX node {node_name}): max difference {diff:.4g} = {diff / step:.2f} quantization steps"
        else:
            tol = 1e-4 + 1e-3 * float(np.max(np.abs(e)) if e.size else 0.0)
            if scope in own_steps:
                tol = max(tol, own_steps[scope] * (1 + 1e-4) + 1e-7)
            if diff > tol:
                return f"{scope} (ONNX node {node_name}): max difference {diff:.4g} (tolerance {tol:.3g})"
    return None


def _forced_graph(model: onnx.ModelProto, quantizers: set[str], codes: bool = False
                  ) -> tuple[onnx.ModelProto, dict[str, str], dict[str, tuple[np.ndarray, np.ndarray, int]]]:
    """A copy of ``model`` in which the output of every activation quantizer is read from a new graph
    input of the same name, and what the graph computed there is exposed as an extra output
    ``<name>__computed``. The forced tensor is the quantizer's ``DequantizeLinear`` output (float),
    or with ``codes`` its ``QuantizeLinear`` output (the integer codes), which leaves every
    ``DequantizeLinear -> op -> QuantizeLinear`` group intact for onnxruntime to fuse into its
    integer kernels. Returns the model, ``{quantizer scope: tensor name}`` and, for ``codes``,
    ``{scope: (scale, zero point, axis)}`` to turn PyTorch's values into codes."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    op = "QuantizeLinear" if codes else "DequantizeLinear"
    by_scope: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (node.op_type == op and node.input[0] not in inits and scope_of(node) in quantizers
                and not node.name.endswith(("_requant_q", "_requant_dq", "_bias_dq"))):
            by_scope.setdefault(scope_of(node), []).append(node)
    forced: dict[str, str] = {}
    grids: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    users = consumers(graph) if codes else {}
    for scope, nodes in by_scope.items():
        if len(nodes) != 1 or nodes[0].output[0] in outputs:
            continue  # a quantizer applied twice has no single reference value; a graph output needs no forcing
        node = nodes[0]
        elem = onnx.TensorProto.FLOAT
        if codes:
            if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
                continue
            zero = numpy_helper.to_array(inits[node.input[2]])
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            grids[scope] = (numpy_helper.to_array(inits[node.input[1]]).astype(np.float64), zero, axis)
            elem = inits[node.input[2]].data_type
            after = users.get(node.output[0], [])
            if len(after) == 1 and after[0].op_type == "Clip" and scope_of(after[0]) == scope:
                node = after[0]  # below 8 bits the codes are clipped to the quantizer's range: compare those
        name = node.output[0]
        node.output[0] = name + "__computed"
        graph.input.append(helper.make_tensor_value_info(name, elem, None))
        graph.output.append(helper.make_tensor_value_info(name + "__computed", elem, None))
        forced[scope] = name
    return model, forced, grids


def _as_codes(value: np.ndarray, grid: tuple[np.ndarray, np.ndarray, int]) -> np.ndarray:
    """PyTorch's quantizer output (on its grid) as the codes ``QuantizeLinear`` writes."""
    scale, zero, axis = grid
    shape = [1] * value.ndim
    if scale.ndim and scale.size > 1:
        shape[axis] = scale.size
    info = np.iinfo(zero.dtype)
    q = np.rint(value / scale.reshape(shape)) + zero.astype(np.float64).reshape(shape)
    return np.clip(q, info.min, info.max).astype(zero.dtype)


def graph_parity(reference: nn.Module, onnx_path: str, batches: Sequence[Any], *, tolerance: float | None = None,
                 top1_min: float = TOP1_MIN, kernels: bool = False) -> Parity:
    """PyTorch vs the QDQ graph as written (onnxruntime, optimizations off), **op by op**: every
    activation quantizer's output in the graph is computed from PyTorch's values of the quantizers
    before it and must lie within one of its quantization steps of PyTorch's; the graph outputs
    follow the rules of :func:`check_parity` on every element. A one-step tie decided differently
    upstream cannot grow through the layers after it (as it does end to end in a deep or residual
    network), so any larger difference is an op the file computes differently. ``first_divergence``
    names the first quantizer (in graph order) that fails.

    With ``kernels`` the same comparison runs on this CPU's integer kernels: every quantizer's
    codes are fed from PyTorch's values and onnxruntime fuses and optimizes the graph as deployment
    does. It tells a kernel that computes an op differently (many steps off at that op) from
    one-step ties amplified end to end by a deep network (every op within one step).

    Example:
        >>> graph_parity(gm, "model.onnx", [x]).passed
        True
    """
    model = onnx.load(onnx_path)
    ref = safe_deepcopy(reference).eval().cpu()
    quantizers = {n: m for n, m in ref.named_modules() if isinstance(m, Quantizer) and m.enabled and bool(m.initialized)}
    forced_model, forced, grids = _forced_graph(model, set(quantizers), codes=kernels)
    if not forced:
        return check_parity(reference, onnx_path, batches, tolerance=tolerance, top1_min=top1_min, optimize=kernels,
                            within_min=1.0)
    session = ort_session(forced_model.SerializeToString(), optimize=kernels)
    real_inputs = [i.name for i in model.graph.input]
    out_names = [o.name for o in session.get_outputs()]
    n_out = len(model.graph.output)
    order = [scope_of(n) for n in forced_model.graph.node
             if scope_of(n) in forced and n.output and n.output[0] == forced[scope_of(n)] + "__computed"]
    steps = output_steps(model)
    required = not any(int(m.bits) < 8 for m in quantizers.values())
    worst_q = 0.0
    first: str | None = None
    pairs: list[tuple[list[np.ndarray], list[Any]]] = []
    counted: dict[str, list[int]] = {}  # quantizer -> [codes one step off away from ties, codes compared]
    how = "this CPU's kernels, from PyTorch's codes" if kernels else "computed from PyTorch's inputs"
    for batch in batches:
        inputs = _as_tuple(batch)
        near_tie: dict[str, np.ndarray] = {}
        values = _module_outputs(ref, inputs, set(forced), near_tie)
        expected = _run_torch(ref, inputs)
        feed = {n: t.detach().cpu().numpy() for n, t in zip(real_inputs, inputs)}
        feed.update({forced[s]: _as_codes(values[s], grids[s]) if kernels else values[s] for s in forced if s in values})
        got = dict(zip(out_names, session.run(None, feed)))
        for scope in order:
            if scope not in values:
                continue
            step = float(quantizers[scope].qparams()[0].max())
            g = np.asarray(got[forced[scope] + "__computed"]).reshape(values[scope].shape)
            if kernels:  # codes: compare in steps directly
                want = _as_codes(values[scope], grids[scope]).astype(np.int64)
                steps_off = np.abs(g.astype(np.int64) - want)
            else:
                steps_off = np.abs(g.astype(np.float32) - values[scope]) / step
            d = float(np.max(steps_off)) if steps_off.size else 0.0
            seen = counted.setdefault(scope, [0, 0])
            flipped = steps_off > 0.5
            if scope in near_tie and near_tie[scope].size == flipped.size:
                flipped &= near_tie[scope].reshape(flipped.shape) >= TIE_WINDOW  # a tie decided by float rounding is no finding
            seen[0] += int(np.count_nonzero(flipped))
            seen[1] += int(steps_off.size)
            worst_q = max(worst_q, d)
            if first is None and d > 1 + 1e-4:
                first = f"{scope} ({how}): {d:.2f} quantization steps"
        pairs.append((expected, [got[n] for n in out_names[:n_out]]))
    off_by_one = {scope: n / total for scope, (n, total) in counted.items() if total}
    if first is None:
        first = _systematic_flips(counted, how)
    outputs = _compare_outputs(pairs, steps, bool(quantizers), tolerance, top1_min, required)
    return Parity(outputs.samples, outputs.max_abs_diff, outputs.tolerance,
                  outputs.rule + "; every quantizer within one step of PyTorch's given the same inputs"
                  + (" (this CPU's integer kernels)" if kernels else ""),
                  outputs.within_tolerance, max(worst_q, outputs.max_steps or 0.0), outputs.top1_agreement,
                  outputs.passed and first is None, required, first,
                  max(off_by_one.values(), default=0.0))


def _systematic_flips(counted: dict[str, list[int]], how: str) -> str | None:
    """The first quantizer (graph order) with more than :data:`OFF_BY_ONE_MAX` of its codes one step
    off PyTorch's away from rounding ties, described; None when there is none."""
    for scope, (n, total) in counted.items():
        if n >= OFF_BY_ONE_MIN_CODES and n > OFF_BY_ONE_MAX * total:
            return (f"{scope} ({how}): {100 * n / total:.3f}% of its codes one step off where PyTorch's value is "
                    f"not at a rounding tie (at most {100 * OFF_BY_ONE_MAX:g}% allowed): an op before it computes "
                    f"slightly differently (a bias or scale rounded otherwise than in PyTorch)")
    return None
