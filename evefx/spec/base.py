"""Shared pieces of every spec section: strict models, bounded numbers, ``select``, ``overrides``.

Pure pydantic: importing this never imports torch.
"""
from __future__ import annotations

import fnmatch
import re
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["StrictModel", "Bounded", "Select", "Section", "TraceOptions", "NestedErrors", "deep_merge"]


class StrictModel(BaseModel):
    """Frozen, no unknown fields: the base of every spec model."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


def Bounded(tp: type, low: float, high: float, *, low_open: bool = False, doc: str = "") -> Any:
    """An ``int``/``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``) whose error reads
    ``must be between 1 and 16 (got 0)`` and whose JSON Schema carries the bounds."""

    def check(value: Any) -> Any:
        bad = value <= low if low_open else value < low
        if bad or value > high:
            lo = f"greater than {low}" if low_open else f"between {low} and {high}"
            msg = f"must be {lo} and at most {high}" if low_open else f"must be {lo}"
            raise ValueError(f"{msg} (got {value})")
        return value

    bounds = {"exclusiveMinimum" if low_open else "minimum": low, "maximum": high}
    return Annotated[tp, Field(json_schema_extra=bounds, description=doc or None), AfterValidator(check)]


class NestedErrors(ValueError):
    """Carries ``(path, message)`` pairs out of a validator so that ``SpecError`` can show full paths."""

    def __init__(self, errors: list[tuple[tuple[str | int, ...], str]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, p))}: {m}" for p, m in errors))


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` over ``base``; nested dicts merge, anything else replaces."""
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class Select(StrictModel):
    """Which layers a section applies to.

    A layer is selected when it satisfies every criterion that is given (``types`` AND
    ``names`` AND ``regex``; within a list any entry may match), and no ``exclude`` glob
    matches it. With no criterion at all, the section's default types are used.
    """

    types: tuple[str, ...] | None = None
    """Module class names (``Conv2d``) or dotted paths of classes (``mypkg.blocks.Gate``); subclasses match too."""
    names: tuple[str, ...] | None = None
    """fnmatch globs on qualified module names (``features.*``, ``layer?.0.conv1``)."""
    regex: str | None = None
    """A Python regular expression that must match the whole qualified name."""
    exclude: tuple[str, ...] = ()
    """fnmatch globs of qualified names removed from the selection (applied last)."""

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from None
        return value

    @field_validator("types", "names")
    @classmethod
    def _not_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and len(value) == 0:
            raise ValueError("must not be empty (leave it out to not filter on it)")
        return value

    def matches_name(self, name: str) -> bool:
        """Name-only part of the selection (types are checked by the planner, which sees modules)."""
        if self.names is not None and not any(fnmatch.fnmatchcase(name, g) for g in self.names):
            return False
        if self.regex is not None and re.fullmatch(self.regex, name) is None:
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)


class Section(StrictModel):
    """Fields every pass section shares. Subclasses add ``kind: Literal[...]`` and their options.

    ``overrides`` are per-layer patches: each has ``names`` (globs) and any of the section's
    option fields. For a layer, the section's fields apply first, then every override whose
    globs match the layer, in list order (later ones win). Nested blocks merge field by field,
    so ``{names: [fc], weight: {bits: 4}}`` keeps the section's other weight options.
    Overrides change options, never membership: a layer must be selected by ``select``.
    """

    NOT_OVERRIDABLE: ClassVar[frozenset[str]] = frozenset({"kind", "select", "overrides", "exclude_last"})
    if TYPE_CHECKING:
        # every concrete section declares ``kind: Literal[...]``; declared here for the type checker
        # only, since a pydantic field on the base would need a value
        kind: str

    select: Select = Select()
    """Which layers this section applies to; default: every Conv2d and Linear."""
    exclude_last: bool = False
    """Leave the last selected layer (in graph order: usually the classifier) untouched."""
    overrides: tuple[dict[str, Any], ...] = ()
    """Per-layer patches: ``{names: [globs], <option>: <value>, ...}``; later ones win."""

    @model_validator(mode="after")
    def _check_overrides(self) -> Section:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for i, patch in enumerate(self.overrides):
            names = patch.get("names")
            if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
                errors.append((("overrides", i, "names"), "required: a non-empty list of name globs"))
                continue
            for key in patch:
                if key in self.NOT_OVERRIDABLE:
                    errors.append((("overrides", i, key), "cannot be overridden per layer; set it on the section"))
            if any(key in self.NOT_OVERRIDABLE for key in patch):
                continue
            try:
                self._apply(patch)
            except ValidationError as e:
                from evefx.spec.messages import errors_from_validation

                errors += [(("overrides", i, *p), m) for p, m in errors_from_validation(e)]
        if errors:
            raise NestedErrors(errors)
        return self

    def _apply(self, patch: dict[str, Any]) -> Self:
        base = self.model_dump(mode="python", exclude={"overrides"})
        body = {k: v for k, v in patch.items() if k != "names"}
        return type(self).model_validate(deep_merge(base, body))

    def for_layer(self, name: str) -> Self:
        """The section as it applies to layer ``name``: every matching override applied in order.

        Example:
            >>> s.for_layer("classifier.1").weight.bits
            8
        """
        out = self.model_copy(update={"overrides": ()})
        for patch in self.overrides:
            if any(fnmatch.fnmatchcase(name, g) for g in patch["names"]):
                out = out._apply(patch)
        return out


class TraceOptions(StrictModel):
    """How evefx traces the model with torch.fx."""

    leaf_modules: tuple[str, ...] = ()
    """Modules torch.fx must not trace into: class names, dotted class paths or qualified-name globs."""
    concrete_args: dict[str, Any] | None = None
    """Arguments fixed at trace time (passed to ``torch.fx.Tracer.trace``), e.g. ``{use_cache: false}``."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one example input (``[1, 1, 28, 28]``); lets evefx propagate shapes without example inputs."""

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, value: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if value is not None and (not value or any(d < 1 for d in value)):
            raise ValueError(f"must be a non-empty list of positive sizes (got {list(value)})")
        return value
