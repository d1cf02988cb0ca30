"""From searched eve-parameter values back to a spec: per-layer ``overrides`` in the sections that made them.

Each eve parameter knows its layer, its kind (``bits``, ``ratio``...), its role (``weight`` or
``activation`` for quantizers) and the spec path of the section that inserted it
(``passes[0]``). That is all it takes to write the value as an override the section already
understands, so the result is an ordinary spec that ``evefx transform`` takes as it is.

Example:
    >>> spec = spec_with_values(gm.spec, evefx.eve_parameters(gm), {"features.0.weight_quantizer.bits": 3})
    >>> spec.passes[0].for_layer("features.0").weight.bits
    3
"""
from __future__ import annotations

import copy
import fnmatch
import glob
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from evefx.api import EveParameter
from evefx.errors import EvefxError, SearchError
from evefx.spec import Spec, load_spec
from evefx.spec.base import deep_merge

__all__ = ["override_for", "spec_with_values"]

_PATH = re.compile(r"^passes\[(\d+)\]$")


def override_for(p: EveParameter, value: float) -> dict[str, Any]:
    """The option patch (without ``names``) that sets parameter ``p`` to ``value`` in its section.

    Example:
        >>> override_for(p_weight_bits, 3)
        {'weight': {'bits': 3}}
    """
    v: Any = int(round(value)) if p.integer else float(value)
    if p.kind == "bits":
        if p.role not in ("weight", "activation"):
            raise SearchError(f"eve parameter {p.name}: bits of role {p.role!r} have no spec field (expected weight or activation)")
        return {p.role: {"bits": v}}
    if p.kind == "ratio":
        return {"ratio": v}
    if p.kind in ("threshold", "tau", "reset"):
        return {"neuron": {p.kind: v}}
    raise SearchError(f"eve parameter {p.name}: kind {p.kind!r} has no spec field evefx knows how to write")


def _leaves(d: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for key, value in d.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,)


def _drop(d: dict[str, Any], path: tuple[str, ...]) -> None:
    """Remove the leaf at ``path`` from ``d`` and the blocks it leaves empty."""
    if len(path) == 1:
        d.pop(path[0], None)
        return
    inner = d.get(path[0])
    if isinstance(inner, dict):
        _drop(inner, path[1:])
        if not inner:
            d.pop(path[0])


def _merge_overrides(overrides: list[dict[str, Any]], per_layer: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold the searched per-layer patches into a section's ``overrides``.

    An option that an existing override sets only for searched layers (its names are all plain
    layer names, each searched with that option) is dropped from it, so no stale value stays behind
    a later one; an override left with nothing but ``names`` goes. A searched layer that already
    has an override of its own gets the patch merged into it; otherwise one is appended.
    """
    out: list[dict[str, Any]] = []
    done: set[str] = set()
    for j, ov in enumerate(overrides):
        ov = copy.deepcopy(dict(ov))
        names = list(ov.get("names") or [])
        own = next((layer for layer in per_layer if names in ([layer], [glob.escape(layer)])), None)
        if own is not None and any(fnmatch.fnmatchcase(own, g) for later in overrides[j + 1:] for g in later["names"]):
            own = None  # a later override also reaches the layer: append the values after it instead
        if own is not None and own not in done:  # the layer's own override: the searched values go in it
            ov = {"names": names, **deep_merge({k: v for k, v in ov.items() if k != "names"}, per_layer[own])}
            done.add(own)
        elif all(glob.escape(n) == n and n in per_layer for n in names):
            for path in list(_leaves({k: v for k, v in ov.items() if k != "names"})):
                if all(path in set(_leaves(per_layer[n])) for n in names):
                    _drop(ov, path)
        if set(ov) - {"names"}:
            out.append(ov)
    out += [{"names": [glob.escape(layer)], **patch} for layer, patch in per_layer.items() if layer not in done]
    return out


def spec_with_values(spec: Spec, params: Sequence[EveParameter], values: Mapping[str, float]) -> Spec:
    """``spec`` with the searched values written as per-layer ``overrides`` of the sections that own
    them, merged with the overrides already there: a value the search replaced does not linger in an
    earlier override (see :func:`_merge_overrides`), so ``best.yaml`` says each layer's value once.

    Raises :class:`~evefx.SearchError` naming the section when the result does not validate.

    Example:
        >>> spec_with_values(gm.spec, evefx.eve_parameters(gm), {"features.0.weight_quantizer.bits": 3})
    """
    patches: dict[int, dict[str, dict[str, Any]]] = {}
    for p in params:
        if p.name not in values:
            continue
        m = _PATH.match(p.spec_path)
        if m is None or int(m.group(1)) >= len(spec.passes):
            raise SearchError(f"eve parameter {p.name} comes from {p.spec_path!r}, which is not a section of this spec; "
                              "search the model transformed with this very spec")
        per_layer = patches.setdefault(int(m.group(1)), {})
        per_layer[p.layer] = deep_merge(per_layer.get(p.layer, {}), override_for(p, values[p.name]))
    data = spec.model_dump(mode="json")
    for index, per_layer in patches.items():
        section = data["passes"][index]
        section["overrides"] = _merge_overrides(list(section.get("overrides") or []), per_layer)
    try:
        return load_spec(data)
    except EvefxError as e:
        raise SearchError(f"the searched values do not make a valid spec: {e}") from e
