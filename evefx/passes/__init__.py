"""Graph passes: one module per pass, and the one mapping from spec section to pass.

Example:
    >>> from evefx.passes import pass_for
    >>> p = pass_for(spec.passes[0], "passes[0]")
    >>> result = p(gm)
"""
from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Mapping

from evefx.errors import PassError
from evefx.passes.base import Change, Pass, PassResult, SectionPass, Sequential
from evefx.spec import PruneSection, QuantizeSection, Section, SpikeSection

__all__ = ["Change", "Pass", "PassResult", "SectionPass", "Sequential", "PASS_FOR_SECTION", "pass_class", "pass_for"]

PASS_FOR_SECTION: Mapping[type[Section], str] = MappingProxyType(
    {
        QuantizeSection: "evefx.passes.quantize:QuantizePass",
        SpikeSection: "evefx.passes.spike:SpikePass",
        PruneSection: "evefx.passes.prune:PrunePass",
    }
)
"""Section type -> ``module:Class`` of its pass (imported on first use, so ``import evefx`` stays light)."""


def pass_class(section_type: type[Section]) -> type[SectionPass]:
    """The pass class for a section type; an unknown type names the valid kinds."""
    try:
        ref = PASS_FOR_SECTION[section_type]
    except KeyError:
        kinds = sorted(t.model_fields["kind"].annotation.__args__[0] for t in PASS_FOR_SECTION)
        raise PassError(f"no pass for section type {section_type.__name__}; valid kinds: {', '.join(kinds)}") from None
    module, _, cls = ref.partition(":")
    return getattr(importlib.import_module(module), cls)


def pass_for(section: Section, spec_path: str) -> SectionPass:
    """Instantiate the pass that implements ``section`` (found at ``spec_path`` in the spec)."""
    return pass_class(type(section))(section, spec_path)
