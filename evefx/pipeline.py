"""``evefx.transform``: copy, trace, plan, run the spec's passes, return an :class:`EveModule`."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence, cast

import torch
from torch import fx, nn

from evefx.errors import EvefxError
from evefx.layers import as_inputs, count_params
from evefx.modules.protocol import EveHooks
from evefx.passes import Sequential, pass_for
from evefx.report import TransformReport
from evefx.spec import Spec, load_spec
from evefx.trace import propagate_shapes, trace

__all__ = ["EveModule", "transform"]

log = logging.getLogger(__name__)


class EveModule(fx.GraphModule):
    """A transformed model: a ``torch.fx.GraphModule`` with the same call signature as the original.

    ``.spec`` is the validated spec it was made with, ``.report`` the changes (a
    :class:`~evefx.report.TransformReport`). Both live in ``self.meta`` so that
    ``copy.deepcopy`` keeps them.

    Example:
        >>> gm = evefx.transform(model, "examples/specs/demo.yaml")
        >>> gm(x).shape == model(x).shape
        True
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # torch pickles a GraphModule as code and re-traces it on load, which drops node.meta;
        # carry evefx's provenance and shapes (and the spec/report) across by node name.
        rebuild, args = super().__reduce__()
        node_meta = {n.name: _portable(n.meta) for n in self.graph.nodes}
        return (_rebuild_eve_module, (rebuild, args, node_meta, dict(self.meta)))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.meta.get("evefx_shapes_pending") and args and not kwargs:
            # transformed without example inputs: the first batch records the shapes (once, in eval
            # mode, no grad, no statistic updated), so pruning and observations work after training
            del self.meta["evefx_shapes_pending"]
            propagate_shapes(self, args)
            for m in self.modules():
                if isinstance(m, EveHooks):
                    m.reset_state()
            log.info("evefx: shapes recorded from the first batch (%s)", ", ".join(
                str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor)))
        return super().__call__(*args, **kwargs)

    @property
    def spec(self) -> Spec:
        return self.meta.get("evefx_spec", Spec())

    @property
    def report(self) -> TransformReport:
        return self.meta.get("evefx_report", TransformReport())


_PORTABLE_META = ("evefx", "tensor_meta")


def _portable(meta: dict[str, Any]) -> dict[str, Any]:
    out = {k: meta[k] for k in _PORTABLE_META if k in meta}
    tm = out.get("tensor_meta")
    if hasattr(tm, "_replace") and hasattr(tm, "memory_format"):
        out["tensor_meta"] = tm._replace(memory_format=None)  # memory formats do not pickle at protocol 2
    return out


def _rebuild_eve_module(rebuild: Any, args: tuple[Any, ...], node_meta: dict[str, dict], meta: dict) -> EveModule:
    plain = rebuild(*args)
    gm = EveModule(plain, plain.graph, type(plain).__name__)
    gm.training = plain.training
    for node in gm.graph.nodes:
        node.meta.update(node_meta.get(node.name, {}))
    gm.meta.update(meta)
    return gm


def transform(
    model: nn.Module, spec: Spec | dict | str | Path, example_inputs: torch.Tensor | Sequence[Any] | None = None
) -> EveModule:
    """Trace a copy of ``model`` and apply ``spec``'s passes in order. ``model`` is never touched.

    ``example_inputs`` (or ``trace.input_shape`` in the spec) lets evefx propagate shapes, which
    pruning, observations and MAC counts use; without them, the first batch the module runs
    records the shapes. Transforming an ``EveModule`` again with the same spec
    changes nothing.

    Example:
        >>> gm = evefx.transform(DemoNet(), {"passes": [{"kind": "quantize"}]}, torch.zeros(1, 1, 28, 28))
        >>> rich.print(gm.report)
    """
    spec = load_spec(spec)
    inputs = as_inputs(example_inputs)
    if inputs is None and spec.trace.input_shape is not None:
        inputs = (torch.zeros(spec.trace.input_shape),)
    if not isinstance(model, nn.Module):
        raise EvefxError(f"evefx.transform needs a torch.nn.Module (got {type(model).__name__})")
    try:
        model_copy = copy.deepcopy(model)
    except Exception as e:
        raise EvefxError(
            f"cannot copy {type(model).__name__} (evefx never edits your model, so it works on a deep copy): {e}"
        ) from e
    if isinstance(model_copy, EveModule):
        gm = model_copy
    else:
        gm = cast(EveModule, trace(model_copy, spec.trace, cls=EveModule))  # trace builds a ``cls``
    has_shapes = any("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "placeholder")
    if inputs is not None and not has_shapes:
        propagate_shapes(gm, inputs)
    params_before = count_params(gm)
    result = Sequential([pass_for(s, f"passes[{i}]") for i, s in enumerate(spec.passes)])(gm)
    assert result.graph_module is gm, "passes edit the module in place"
    gm.recompile()
    if inputs is None and not has_shapes:
        gm.meta["evefx_shapes_pending"] = True  # the first call records them (see EveModule.__call__)
    gm.meta["evefx_spec"] = spec
    gm.meta["evefx_report"] = TransformReport(result.changes, params_before, count_params(gm))
    log.info("evefx.transform: %d changes", len(result.changes))
    return gm
