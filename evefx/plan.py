"""Plan, then apply: resolve a section's ``select`` and ``overrides`` to ``{layer: section}``.

Planning reads the graph and never edits it, so it gives dry runs (``evefx inspect``) and
precise errors before anything changes.

Precedence, in order:
1. candidates are the conv/linear layers a pass can attach to (``accepts``), in graph order;
2. ``select.types`` AND ``select.names`` AND ``select.regex`` (each only when given; within a
   list any entry may match); with none given, every candidate is selected;
3. ``select.exclude`` globs remove layers;
4. ``exclude_last`` removes the network's last conv/linear layer (the classifier);
5. ``overrides`` patch the options of the layers their ``names`` match (later ones win);
   they never add or remove layers.
An empty selection and an override that matches no selected layer are errors, and so is every
part of a selector that can only be a typo: a ``types`` entry that names no class of the model and
no ``torch.nn`` class, a ``names`` or ``exclude`` glob that matches no candidate layer. Each error
suggests the closest known names.
"""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Generic, TypeVar

from torch import fx, nn

from evefx.errors import EvefxWarning, PlanError, ShapeError
from evefx.graph import LAYER_TYPES, layer_nodes, module_of
from evefx.layers import channel_axis, out_channels, shape_of
from evefx.spec import Section

__all__ = ["PlannedLayer", "listed", "plan_section", "type_matches"]


S = TypeVar("S", bound=Section)
"""The kind of section being planned: a pass's plan holds its own section type."""


@dataclass(frozen=True)
class PlannedLayer(Generic[S]):
    """One layer a section will act on, with the section as it applies to that layer.

    ``channel_axis`` is the axis of the layer's output that holds its channels (1 for a conv, -1
    for a Linear, see :func:`evefx.layers.channel_axis`), checked against the propagated shapes.
    """

    name: str
    node: fx.Node
    module: nn.Module
    section: S
    channel_axis: int | None = None


def _resolve_dotted(path: str) -> type | None:
    mod_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def type_matches(module: nn.Module | type, wanted: str) -> bool:
    """``Conv2d`` matches by class name anywhere in the MRO; ``pkg.mod.Class`` by dotted path
    (subclasses too). ``module`` may also be a class."""
    kind = module if isinstance(module, type) else type(module)
    if "." in wanted:
        cls = _resolve_dotted(wanted)
        if cls is not None:
            return issubclass(kind, cls)
        return any(f"{c.__module__}.{c.__qualname__}" == wanted for c in kind.__mro__)
    return any(c.__name__ == wanted for c in kind.__mro__)


@lru_cache(maxsize=1)
def _torch_module_names() -> frozenset[str]:
    return frozenset(n for n, obj in vars(nn).items() if isinstance(obj, type) and issubclass(obj, nn.Module))


def _suggest(word: str, known: list[str] | set[str] | frozenset[str], n: int = 2) -> str:
    close = difflib.get_close_matches(word, sorted(known), n=n, cutoff=0.6)
    return f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""


def _check_selector_words(gm: fx.GraphModule, section: Section, spec_path: str, candidates: list[fx.Node]) -> None:
    """Every ``types`` entry names a class that exists; every ``names``/``exclude`` glob matches a candidate."""
    select = section.select
    if select.types is not None:
        in_model = {c.__name__ for m in gm.modules() for c in type(m).__mro__}
        known = in_model | _torch_module_names()
        for t in select.types:
            if "." in t:
                if _resolve_dotted(t) is None and not any(type_matches(m, t) for m in gm.modules()):
                    raise PlanError(
                        f"{spec_path}.select.types: cannot import class {t!r} and no module of the model has that "
                        f"dotted class path; check the spelling or that its package is importable"
                    )
            elif t not in known:
                raise PlanError(
                    f"{spec_path}.select.types: unknown class name {t!r} (no module of the model and no torch.nn "
                    f"class is called that); {_suggest(t, known)}write a class name such as Conv2d or a dotted path"
                )
    names = [str(n.target) for n in candidates]
    for field in ("names", "exclude"):
        for glob in getattr(select, field) or ():
            if not any(fnmatch.fnmatchcase(name, glob) for name in names):
                regex = ""
                if ".*" in glob or glob.startswith("^") or glob.endswith("$"):
                    regex = (f"it reads like a regular expression, but {field} takes shell globs "
                             f"({glob.replace('.*', '*').strip('^$')!r}; or write select.regex); ")
                raise PlanError(
                    f"{spec_path}.select.{field}: {glob!r} matches no layer; {regex}{_suggest(glob, names, 1)}"
                    f"candidates: {listed(names)}"
                )


def listed(names: list[str], most: int = 20) -> str:
    """``names`` comma-separated, the first ``most`` of them (a deep network has hundreds)."""
    if not names:
        return "(none)"
    more = f", ... ({len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def _describe(gm: fx.GraphModule, nodes: list[fx.Node]) -> str:
    return ", ".join(f"{n.target} ({type(module_of(gm, n)).__name__})" for n in nodes) or "(none)"


def plan_section(
    gm: fx.GraphModule,
    section: S,
    spec_path: str,
    accepts: tuple[type[nn.Module], ...] = LAYER_TYPES,
) -> dict[str, PlannedLayer[S]]:
    """Resolve ``section`` against ``gm``: ``{qualified layer name: PlannedLayer}`` in graph order.

    Example:
        >>> list(plan_section(gm, spec.passes[0], "passes[0]"))
        ['features.0', 'features.3', 'features.6', 'classifier.1']
    """
    select = section.select
    candidates = layer_nodes(gm, accepts)
    _check_selector_words(gm, section, spec_path, candidates)
    chosen: list[fx.Node] = []
    types = select.types
    for node in candidates:
        module = module_of(gm, node)
        if types is not None and not any(type_matches(module, t) for t in types):
            continue
        if not select.matches_name(str(node.target)):
            continue
        chosen.append(node)
    if types is not None:
        # a named type the pass cannot attach to is a user error, not a silent skip
        others = [n for n in gm.graph.nodes if n.op == "call_module" and n not in candidates]
        wrong = [n for n in others if any(type_matches(module_of(gm, n), t) for t in types)]
        if wrong and not chosen:
            raise PlanError(
                f"{spec_path}.select.types {list(types)} matched {_describe(gm, wrong)}, but a "
                f"{section.kind} section attaches only to {', '.join(t.__name__ for t in accepts)} layers; "
                f"candidates: {_describe(gm, candidates)}"
            )
    if section.exclude_last and candidates and chosen and chosen[-1] is candidates[-1]:
        chosen = chosen[:-1]
        if not chosen:
            raise PlanError(
                f"{spec_path}: the only selected layer is the last one ({candidates[-1].target}), which "
                f"exclude_last leaves out; select more layers or set exclude_last: false"
            )
    if not chosen:
        raise PlanError(
            f"{spec_path}.select matches no layer; candidates: {_describe(gm, candidates)}. "
            f"Fix types/names/regex/exclude."
        )
    _warn_traced_through(gm, section, spec_path, accepts)
    names = [str(n.target) for n in chosen]
    for i, patch in enumerate(section.overrides):
        if not any(fnmatch.fnmatchcase(name, g) for g in patch["names"] for name in names):
            raise PlanError(
                f"{spec_path}.overrides[{i}].names {list(patch['names'])} match no selected layer; "
                f"selected: {', '.join(names)}"
            )
    return {
        str(n.target): PlannedLayer(str(n.target), n, module_of(gm, n), section.for_layer(str(n.target)),
                                    _checked_axis(gm, n, spec_path))
        for n in chosen
    }


def _warn_traced_through(gm: fx.GraphModule, section: Section, spec_path: str,
                         accepts: tuple[type[nn.Module], ...]) -> None:
    """Warn about layers the section would select that are not called in the graph: fx traced into
    their forward (a subclass that overrides it, ``2 * super().forward(x)``) or their parent hands
    their weights to a function, so no pass can attach to them and they stay float and dense.
    Layers inside a module kept opaque (a leaf) are meant and not named."""
    types = section.select.types
    traced_into = gm.meta.get("evefx_traced_into", {}) if hasattr(gm, "meta") else {}
    hidden = [name for name, kind in traced_into.items() if issubclass(kind, accepts)
              and (types is None or any(type_matches(kind, t) for t in types)) and section.select.matches_name(name)]
    if hidden:
        warnings.warn(
            f"{spec_path}: {listed(hidden)} {'is' if len(hidden) == 1 else 'are'} not called as layers in the "
            f"traced graph (a function reads their weights: a subclass that overrides forward, or a parent such "
            f"as torchvision's shifted_window_attention), so this section leaves them as they are; a pass reaches "
            f"a layer that is called as a module; select.names the layers you mean to silence this",
            EvefxWarning, stacklevel=2)


def _checked_axis(gm: fx.GraphModule, node: fx.Node, spec_path: str) -> int | None:
    """The layer's channel axis, after checking that its recorded output shape has its channels there."""
    module = module_of(gm, node)
    axis, channels = channel_axis(module), out_channels(module)
    shape = shape_of(node)
    if axis is None or channels is None or shape is None:
        return axis
    if not -len(shape) <= axis < len(shape) or shape[axis] != channels:
        raise ShapeError(
            f"{spec_path}: layer {node.target} ({type(module).__name__}) has {channels} output channels, which "
            f"evefx expects on dim {axis} of its output, but its output has shape {tuple(shape)}; "
            f"add {str(node.target)!r} to select.exclude"
        )
    return axis
