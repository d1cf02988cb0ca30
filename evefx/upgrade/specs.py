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

import glob
import re
from collections.abc import Mapping, Sequence
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


def spec_with_values(spec: Spec, params: Sequence[EveParameter], values: Mapping[str, float]) -> Spec:
    """``spec`` with one override per searched layer appended to the section that owns it (later
    overrides win, so the searched values replace the section's and earlier overrides' values).

    Raises :class:`~evefx.SearchError` naming the section when the result does not validate.
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
        section["overrides"] = list(section.get("overrides") or []) + [
            {"names": [glob.escape(layer)], **patch} for layer, patch in per_layer.items()
        ]
    try:
        return load_spec(data)
    except EvefxError as e:
        raise SearchError(f"the searched values do not make a valid spec: {e}") from e
