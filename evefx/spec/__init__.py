"""The evefx spec: pure, frozen, versioned data that names the passes to run.

Importing ``evefx.spec`` never imports torch, so ``evefx validate`` is instant.

Example:
    >>> from evefx.spec import load_spec
    >>> spec = load_spec("passes: [{kind: quantize, weight: {bits: 4}}]")
    >>> spec.passes[0].weight.bits
    4
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from evefx.errors import EvefxWarning, SpecError
from evefx.spec.base import Bounded, NestedErrors, Section, Select, StrictModel, TraceOptions
from evefx.spec.messages import errors_from_validation
from evefx.spec.prune import Iterative, OneShot, PruneSection
from evefx.spec.quantize import (
    ActivationQuantizerConfig,
    AdaRoundConfig,
    CalibrationConfig,
    QuantizeSection,
    QuantizerConfig,
    WeightQuantizerConfig,
)
from evefx.spec.search import Budget, Evaluator, Reward, SearchSection
from evefx.spec.spike import SURROGATES, NeuronConfig, SpikeSection, SurrogateConfig

__all__ = [
    "Spec",
    "PassSection",
    "SECTION_TYPES",
    "Section",
    "Select",
    "TraceOptions",
    "QuantizeSection",
    "QuantizerConfig",
    "WeightQuantizerConfig",
    "ActivationQuantizerConfig",
    "CalibrationConfig",
    "AdaRoundConfig",
    "SpikeSection",
    "NeuronConfig",
    "SurrogateConfig",
    "SURROGATES",
    "PruneSection",
    "OneShot",
    "Iterative",
    "SearchSection",
    "Budget",
    "Reward",
    "Evaluator",
    "load_spec",
    "load_section",
    "dump_spec",
    "json_schema",
    "Bounded",
    "StrictModel",
]

SECTION_TYPES: tuple[type[Section], ...] = (QuantizeSection, SpikeSection, PruneSection)
"""Every member of the ``passes`` union; ``evefx.passes.PASS_FOR_SECTION`` maps each to its pass."""

PassSection = Annotated[Union[QuantizeSection, SpikeSection, PruneSection], Field(discriminator="kind")]


class Spec(StrictModel):
    """A whole evefx spec: trace options, the ordered passes, and an optional search.

    Example:
        >>> Spec(passes=[{"kind": "prune", "ratio": 0.25}]).passes[0].ratio
        0.25
    """

    schema_version: Literal[1] = 1
    """Version of this schema; evefx refuses specs of a version it does not know."""
    trace: TraceOptions = TraceOptions()
    passes: tuple[PassSection, ...] = ()
    """Sections run in order; each inserts its modules after the layers it selects."""
    search: SearchSection | None = None
    """Settings of ``evefx search`` (the RL upgrader)."""

    @model_validator(mode="after")
    def _prune_before_quantize(self) -> Spec:
        # A pruner placed after quantizers reads quantized codes: the quantizer on the next layer's
        # input turns masked zeros back into codes, so no channel is ever prunable (and export fails
        # parity). Refuse the order here, where `evefx validate` sees it, instead of failing later.
        first_quantize = next((i for i, p in enumerate(self.passes) if p.kind == "quantize"), None)
        if first_quantize is None:
            return self
        errors = [
            (("passes", i), f"a prune section after a quantize section (passes[{first_quantize}]) cannot prune: the "
             "quantizers hide which channels the pruner zeroes, so prune_step finds nothing to prune; "
             f"move this section before passes[{first_quantize}] (prune, then quantize)")
            for i, p in enumerate(self.passes) if p.kind == "prune" and i > first_quantize
        ]
        if errors:
            raise NestedErrors(errors)
        return self


def _parse_text(text: str, source: str | None) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([((), f"malformed YAML: {where}{problem}")], source) from e


def load_spec(obj: Spec | dict | str | Path) -> Spec:
    """Validate ``obj`` (a ``Spec``, a dict, YAML/JSON text, or a path) into a :class:`Spec`.

    Raises :class:`evefx.SpecError` listing every problem, one a line. An empty spec (an empty
    file, ``""``, ``None``, ``{}``) is an error: it is almost always a wrong path or a file saved
    half-way; a spec that deliberately changes nothing says so with ``passes: []``. A spec file or
    text without ``schema_version`` gets an :class:`evefx.EvefxWarning` saying that version 1 is
    assumed (a dict built in Python is taken as the current version without a word).

    Example:
        >>> load_spec("examples/specs/demo.yaml").passes[0].kind
        'quantize'
    """
    if isinstance(obj, Spec):
        return obj
    source: str | None = None
    data: Any = obj
    document = isinstance(obj, (str, Path))
    if isinstance(obj, Path) or (
        isinstance(obj, str) and "\n" not in obj and obj.strip().endswith((".yaml", ".yml", ".json"))
    ):
        path = Path(obj)
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SpecError([((), f"cannot read spec file: {e.strerror or e}")], source) from e
        data = _parse_text(text, source)
    elif isinstance(obj, str):
        data = _parse_text(obj, None)
    if data is None or data == {}:
        what = "the file is empty" if source else f"the spec is empty (got {obj!r})"
        raise SpecError([((), f"{what}; write at least `schema_version: 1` and `passes: [...]` "
                              "(`passes: []` for a spec that changes nothing)")], source)
    if not isinstance(data, dict):
        raise SpecError([((), f"a spec must be a mapping at the top level (got {type(data).__name__})")], source)
    if document and "schema_version" not in data:
        warnings.warn(f"{source or 'spec text'}: no schema_version; assuming schema_version: 1 "
                      "(add `schema_version: 1` to silence this)", EvefxWarning, stacklevel=2)
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        raise SpecError(errors_from_validation(e), source) from None
    except (TypeError, ValueError, RecursionError) as e:  # pydantic passes some input errors through raw
        raise SpecError([((), f"invalid spec: {e}")], source) from e


def load_section(cls: type[StrictModel], obj: Any, path: str) -> Any:
    """``obj`` (an instance of ``cls`` or the mapping a YAML file would give) validated as ``cls``.

    Every API that takes a piece of a spec (``budget=``, ``reward=``, ``options=``) accepts the
    same dict a spec file holds; problems raise :class:`evefx.SpecError` with paths under ``path``.

    Example:
        >>> load_section(Budget, {"kind": "avg_bits", "max": 3.0}, "search.budget").max
        3.0
    """
    if isinstance(obj, cls):
        return obj
    if not isinstance(obj, dict):
        raise SpecError([(tuple(path.split(".")), f"must be a {cls.__name__} or a mapping (got {type(obj).__name__})")])
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        raise SpecError([(tuple(path.split(".")) + p, m) for p, m in errors_from_validation(e)]) from None


def dump_spec(spec: Spec, path: str | Path | None = None) -> str:
    """The spec as YAML (defaults included, so it is complete and reproducible); written to ``path`` if given.

    Example:
        >>> print(dump_spec(load_spec("passes: [{kind: prune}]")))
    """
    data = json.loads(spec.model_dump_json())
    data["passes"] = [{"kind": p.pop("kind"), **p} for p in data["passes"]]  # kind first: it names the section
    text = yaml.safe_dump(data, sort_keys=False)
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def json_schema() -> dict[str, Any]:
    """The JSON Schema of :class:`Spec` (what ``schemas/evefx-spec.schema.json`` holds)."""
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "evefx spec"
    return schema
