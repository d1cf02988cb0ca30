"""NIR export and import of spiking evefx models (the Neuromorphic Intermediate Representation).

A spiking model becomes a :class:`nir.NIRGraph` of continuous-time nodes that other simulators
(norse, snntorch, spikingjelly, sinabs, rockpool, lava-dl) and neuromorphic chips read. The
evefx neurons are discrete-time; with a step of ``dt`` seconds, forward Euler integration of
NIR's equations gives evefx's recurrence exactly when (docs/nir.md derives it)::

    LIF/PLIF (tau in steps, hard reset r)  ->  nir.LIF(tau = tau * dt, r = 1, v_leak = r,
                                                      v_reset = r, v_threshold = threshold)
    IF (hard reset r)                      ->  nir.IF(r = 1 / dt, v_reset = r, v_threshold = threshold)
    Conv2d/Conv1d (+ BatchNorm folded)     ->  nir.Conv2d / nir.Conv1d (zero bias when none)
    Linear (+ BatchNorm1d folded)          ->  nir.Affine (nir.Linear without a bias)
    Flatten, AvgPool2d, add                ->  nir.Flatten, nir.AvgPool2d, two edges into one node

Per-channel thresholds and resets are broadcast to the neurons' shape (NIR parameters are per
neuron). The encoder and the mean decoder are outside the graph: the NIR ``Input`` receives one
time step (the spike train of a Poisson encoder, or the analog input repeated by a direct
encoder), the ``Output`` emits one step, and the graph's metadata records ``timesteps``,
``encoder``, ``decoder`` and ``dt``. What NIR cannot express (soft reset, analog spikes,
max pooling, an analog activation between layers, quantizers) raises :class:`ExportError`
naming the node and what to do.

This module builds the graph and writes the file; the node-by-node mapping is in
:mod:`evefx.export.nir_nodes` and reading a graph back (``import_nir``, ``spike_traces``) in
:mod:`evefx.export.nir_import`, both reachable from here.

Example:
    >>> gm = evefx.transform(DemoNet(), "examples/specs/spiking.yaml")
    >>> report = evefx.export_nir(gm.eval(), "demo.nir", dt=1e-3)
    >>> [type(n).__name__ for n in report.graph.nodes.values()][:3]
    ['Input', 'Conv2d', 'LIF']
    >>> back = evefx.import_nir("demo.nir")       # the evefx model again, steps in, steps out
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import fx, nn

from evefx.channels import compact
from evefx.errors import ExportError, PruneError
from evefx.export.nir_import import import_nir, spike_traces
from evefx.export.nir_nodes import NodeBuilder, load_nir
from evefx.export.spiking import require_threshold
from evefx.graph import recorded_inputs
from evefx.modules.neurons import SpikingNeuron
from evefx.modules.prune import ChannelPruner

__all__ = ["export_nir", "to_nir", "import_nir", "spike_traces", "NIRReport", "DEFAULT_DT"]

log = logging.getLogger(__name__)

DEFAULT_DT = 1e-3
"""Seconds per evefx time step when none is given (1 ms, the usual neuromorphic step)."""

# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------
@dataclass
class NIRReport:
    """What :func:`export_nir` wrote: the graph, where, its size, and one row per NIR node.

    Example:
        >>> report = export_nir(gm, "model.nir")
        >>> report.size_bytes, report.node_types()["LIF"]
        (31512, 4)
    """

    graph: Any
    path: Path | None
    size_bytes: int | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def node_types(self) -> dict[str, int]:
        """How many nodes of each NIR type the graph has."""
        out: dict[str, int] = {}
        for node in self.graph.nodes.values():
            out[type(node).__name__] = out.get(type(node).__name__, 0) + 1
        return out

    def table(self):
        """The nodes as a rich table (name, NIR type, output shape, evefx source, mapping)."""
        from rich.table import Table

        size = f", {self.size_bytes:,} bytes" if self.size_bytes is not None else ""
        md = self.graph.metadata
        table = Table(title=f"NIR graph: {len(self.graph.nodes)} nodes, {len(self.graph.edges)} edges{size}; "
                            f"T={md.get('timesteps')}, dt={md.get('dt')}, encoder={md.get('encoder')}")
        for col in ("node", "NIR type", "shape", "from", "mapping"):
            table.add_column(col)
        for row in self.rows:
            table.add_row(row["name"], row["type"], str(row["shape"]), row["source"], row["note"])
        return table


# --------------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------------
class _Shapes(fx.Interpreter):
    """Records every node's output (shape, whether a tensor) on one example forward, as ShapeProp does."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            raise ExportError(f"NIR export: running node {n.format_node()} on the example input failed: {e}") from e
        self.shapes[n] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _example_input(gm: fx.GraphModule, example_input: Any) -> tuple:
    if example_input is not None:
        return tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    args = []
    for name, shape, dtype in recorded_inputs(gm):
        if shape is None:
            raise ExportError(
                f"NIR export needs the input shape: input {name} has no recorded shape; pass example_input="
                f"torch.zeros(1, ...) (or transform the model with example inputs)"
            )
        args.append(torch.zeros((1, *tuple(shape)[1:]), dtype=dtype))
    return tuple(args)


def to_nir(gm: nn.Module, example_input: Any = None, *, dt: float = DEFAULT_DT,
           rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None) -> Any:
    """The spiking model as a :class:`nir.NIRGraph` (no file); see :func:`export_nir`.

    Example:
        >>> graph = to_nir(gm, torch.zeros(1, 1, 28, 28), dt=1e-3)
        >>> graph.metadata["timesteps"]
        8
    """
    return _build(gm, example_input, dt, rules)[0]


def _build(gm: nn.Module, example_input: Any, dt: float, rules=None) -> tuple[Any, list[dict[str, Any]]]:
    if not isinstance(dt, (int, float)) or not dt > 0:
        raise ExportError(f"NIR export: dt must be a number > 0, seconds per step (got {dt!r})")
    if not isinstance(gm, fx.GraphModule):
        raise ExportError(f"NIR export takes the fx.GraphModule evefx.transform returns, not a {type(gm).__name__}")
    args = _example_input(gm, example_input)
    for name, m in gm.named_modules():
        if isinstance(m, SpikingNeuron):
            require_threshold(m, name)  # the shape run below would set it from the example input
    if any(isinstance(m, ChannelPruner) for m in gm.modules()):
        # NIR has no mask node: the pruned channels go for real, as export_onnx does (a new module)
        try:
            work = compact(gm).eval()
        except PruneError as e:
            raise ExportError(f"NIR export: the pruners' channels must be removed first, and compact cannot: {e}") from e
    else:
        work = copy.deepcopy(gm).eval()  # copy once: the shape run must not touch the user's statistics
    for m in work.modules():
        if isinstance(m, SpikingNeuron) and m.step_mode != "multi":
            m.set_mode(step="multi")
    shapes = _Shapes(work)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # a Poisson encoder must not move the user's RNG
        shapes.run(*args)
    builder = NodeBuilder(work, shapes.shapes, dt, rules)  # BatchNorm folds with the running statistics (eval)
    graph = builder.build()
    return graph, builder.rows


def export_nir(gm: nn.Module, path: str | os.PathLike | None = None, example_input: Any = None, *,
               dt: float = DEFAULT_DT,
               rules: dict[type, Callable[[nn.Module, tuple[int, ...]], Any]] | None = None) -> NIRReport:
    """Write a spiking evefx model as a NIR graph (``nir.write``, HDF5) and return a report.

    ``dt`` is the duration of one evefx time step in seconds: NIR's time constants are
    continuous-time, so ``tau`` and IF's ``r`` are scaled by it (docs/nir.md). The model should
    be in eval mode (BatchNorm is folded with its running statistics). ``example_input`` (one
    input, any batch size) gives the shapes; by default they come from the shapes recorded when
    the model was transformed with example inputs.

    ``rules`` maps a module type evefx does not know to ``fn(module, input_shape) -> nir node``
    (``input_shape`` without the batch dim); rules are tried before the built-in mapping.

    Raises :class:`~evefx.errors.ExportError` naming the node for anything NIR cannot express.

    Example:
        >>> report = export_nir(gm.eval(), "model.nir", torch.zeros(1, 1, 28, 28), dt=1e-3)
        >>> report.node_types()
        {'Input': 1, 'Conv2d': 3, 'LIF': 4, 'Flatten': 1, 'Affine': 2, 'Output': 1}
    """
    if path is not None and Path(path).is_dir():
        raise ExportError(f"{path} is a folder; give the file to write, e.g. {Path(path) / 'model.nir'}")
    graph, rows = _build(gm, example_input, dt, rules)
    size = None
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)  # as export_onnx does
        try:
            load_nir().write(str(path), graph)
        except OSError as e:
            raise ExportError(f"NIR export: cannot write {path}: {e}") from e
        size = path.stat().st_size
        log.info("wrote %s (%d nodes, %d bytes)", path, len(graph.nodes), size)
    return NIRReport(graph=graph, path=path, size_bytes=size, rows=rows)
