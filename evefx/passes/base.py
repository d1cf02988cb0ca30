"""Pass infrastructure, after onnx-ir's: a pass is ``call(gm) -> PassResult``.

``Pass.__call__`` checks preconditions (``requires``), runs ``call``, then checks
postconditions on the result (``ensures``). ``Sequential`` composes passes, lints and
recompiles after each, and wraps unexpected failures in :class:`evefx.PassError`.
"""
from __future__ import annotations

import abc
import logging
import warnings
from dataclasses import asdict, dataclass, field
from typing import Generic, Literal

from torch import fx, nn

from evefx.errors import EvefxError, EvefxWarning, PassError
from evefx.graph import LAYER_TYPES, Role, describe_node, mark, marked, module_of
from evefx.plan import PlannedLayer, S, listed, plan_section

__all__ = ["Change", "PassResult", "Pass", "Sequential", "SectionPass"]

log = logging.getLogger(__name__)

Action = Literal["inserted", "replaced", "folded", "removed", "modified"]


@dataclass(frozen=True)
class Change:
    """One edit: what was done, at which node and module, for which layer and spec section."""

    action: Action
    node: str
    target: str
    layer: str
    spec_path: str
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (edited in place) module, whether it changed, and the changes."""

    graph_module: fx.GraphModule
    modified: bool
    changes: tuple[Change, ...] = field(default_factory=tuple)


class Pass(abc.ABC):
    """A graph pass. Subclasses implement :meth:`call`; override ``requires``/``ensures`` to check.

    Example:
        >>> class Nothing(Pass):
        ...     def call(self, gm): return PassResult(gm, False)
        >>> Nothing()(gm).modified
        False
    """

    name: str = "pass"
    spec_path: str = ""
    current_node: fx.Node | None = None
    """The node being edited; failure messages name it."""

    def requires(self, gm: fx.GraphModule) -> None:
        """Precondition on the input; raise :class:`PassError` when it does not hold."""

    def ensures(self, gm: fx.GraphModule) -> None:
        """Postcondition on the result; raise :class:`PassError` when it does not hold."""

    @abc.abstractmethod
    def call(self, gm: fx.GraphModule) -> PassResult: ...

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        self.ensures(result.graph_module)
        return result


class Sequential(Pass):
    """Run passes in order; lint and recompile after each one that modified the graph."""

    name = "sequential"

    def __init__(self, passes: list[Pass]):
        self.passes = list(passes)

    def call(self, gm: fx.GraphModule) -> PassResult:
        changes: list[Change] = []
        modified = False
        for p in self.passes:
            try:
                result = p(gm)
                gm = result.graph_module
                if result.modified:
                    gm.graph.lint()
                    gm.recompile()
            except EvefxError:
                raise
            except Exception as e:
                where = f" at {describe_node(gm, p.current_node)}" if p.current_node is not None else ""
                raise PassError(
                    f"{p.spec_path or p.name}: the {p.name} pass failed{where}: {type(e).__name__}: {e}. "
                    f"Add that layer to {p.spec_path or 'the section'}.select.exclude, or report a bug with this message."
                ) from e
            log.debug("%s (%s): %d changes", p.name, p.spec_path, len(result.changes))
            changes += result.changes
            modified |= result.modified
        return PassResult(gm, modified, tuple(changes))


class SectionPass(Pass, Generic[S]):
    """A pass driven by one spec section. Subclasses set ``name`` (and ``accepts``) and implement ``call``.

    Subclasses name their section type (``class PrunePass(SectionPass[PruneSection])``), so the
    plan's per-layer sections are typed as that section.

    ``self.plan(gm)`` resolves the section's selection (see :mod:`evefx.plan`).
    """

    accepts: tuple[type[nn.Module], ...] = LAYER_TYPES

    def __init__(self, section: S, spec_path: str):
        self.section = section
        self.spec_path = spec_path

    def plan(self, gm: fx.GraphModule) -> dict[str, PlannedLayer[S]]:
        return plan_section(gm, self.section, self.spec_path, self.accepts)

    def change(self, action: Action, node: fx.Node, layer: str, detail: str = "") -> Change:
        """A :class:`Change` of this pass's section."""
        return Change(action, node.name, str(node.target), layer, self.spec_path, detail)

    def mark(self, node: fx.Node, layer: str, role: Role | str, channel_axis: int | None = None) -> None:
        """Record that this pass's section put (or changed) ``node`` for ``layer`` in ``role``.

        Example:
            >>> self.mark(new_node, "fc1", "neuron", channel_axis=-1)
        """
        mark(node, pass_name=self.name, layer=layer, spec_path=self.spec_path, role=role, channel_axis=channel_axis)

    def warn_skipped(self, gm: fx.GraphModule, layers: list[str], state: str) -> None:
        """Warn that ``layers``, skipped because they were already ``state``, were taken by another
        section of this pass: this section's settings never apply to them. Layers this same
        section marked in an earlier transform are not named (re-running a spec changes nothing, by design).

        Example:
            >>> self.warn_skipped(gm, ["features.0"], "quantized")
        """
        by: dict[str, list[str]] = {}
        for layer in layers:
            paths = {n.meta["evefx"].spec_path for n in self.marked(gm, layer)} - {self.spec_path}
            if paths:
                by.setdefault(", ".join(sorted(paths)), []).append(layer)
        for sections, names in by.items():
            one = len(names) == 1
            warnings.warn(f"{self.spec_path}: {listed(names)} {'is' if one else 'are'} already {state} by {sections}, so "
                          f"this section leaves {'it as it is' if one else 'them as they are'}; give {sections} other "
                          f"settings for some layers with its overrides, or select.names the layers each section takes",
                          EvefxWarning, stacklevel=3)

    def marked(self, gm: fx.GraphModule, layer: str | None = None, role: str | None = None) -> list[fx.Node]:
        """The nodes this pass marked (any section of it), filtered by layer and role."""
        return marked(gm, self.name, layer, role)

    def ensure_marked_are(self, gm: fx.GraphModule, role: str, types: tuple[type[nn.Module], ...], what: str) -> None:
        """Postcondition: every node this pass marked with ``role`` calls a module of ``types``.

        Example:
            >>> self.ensure_marked_are(gm, "neuron", (SpikingNeuron,), "a neuron")
        """
        for node in self.marked(gm, role=role):
            module = module_of(gm, node)
            if not isinstance(module, types):
                raise PassError(f"{self.spec_path}: {node.target} is marked as {what} but is a "
                                f"{type(module).__name__}; report a bug with this message")
