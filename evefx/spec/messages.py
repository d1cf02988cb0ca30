"""Turn pydantic's validation errors into ``(path, message)`` pairs a user can act on."""
from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from evefx.spec.base import NestedErrors

__all__ = ["errors_from_validation"]

# Union tags pydantic puts into error locations; they are not part of the user's path.
_TAGS = frozenset({"quantize", "spike", "prune", "one_shot", "iterative"})


def _clean(loc: tuple[Any, ...]) -> tuple[str | int, ...]:
    out: list[str | int] = []
    for i, part in enumerate(loc):
        if isinstance(part, str) and i > 0 and isinstance(loc[i - 1], int) and part in _TAGS:
            continue
        if isinstance(part, str) and (part.startswith("function-") or part in {"list[...]", "tuple[...]"}):
            continue
        out.append(part)
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _message(err: dict[str, Any]) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        return "unknown field (check the spelling; see `evefx schema` for the valid fields)"
    if kind == "union_tag_invalid":
        valid = ctx.get("expected_tags", "")
        return f"unknown kind {ctx.get('tag')!r}; valid kinds: {valid}"
    if kind == "union_tag_not_found":
        return "missing 'kind' (which pass is this section for?)"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')} (got {_short(value)})"
    if kind in {"int_type", "int_parsing", "int_from_float"}:
        return f"must be an integer (got {_short(value)})"
    if kind in {"float_type", "float_parsing"}:
        return f"must be a number (got {_short(value)})"
    if kind in {"bool_type", "bool_parsing"}:
        return f"must be true or false (got {_short(value)})"
    if kind in {"string_type"}:
        return f"must be a string (got {_short(value)})"
    if kind in {"model_type", "model_attributes_type", "dict_type"}:
        return f"must be a mapping (got {_short(value)})"
    if kind in {"list_type", "tuple_type"}:
        return f"must be a list (got {_short(value)})"
    if kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return msg
    return f"{err['msg'][0].lower()}{err['msg'][1:]} (got {_short(value)})"


def errors_from_validation(exc: ValidationError) -> list[tuple[tuple[str | int, ...], str]]:
    """Flatten a ``ValidationError`` (including errors nested by override validation).

    Example:
        >>> errors_from_validation(e)
        [(('passes', 1, 'weight', 'bits'), 'must be between 1 and 16 (got 0)')]
    """
    out: list[tuple[tuple[str | int, ...], str]] = []
    for err in exc.errors(include_url=False):
        loc = _clean(tuple(err["loc"]))
        nested = (err.get("ctx") or {}).get("error")
        if isinstance(nested, NestedErrors):
            out += [(loc + tuple(p), m) for p, m in nested.errors]
        else:
            out.append((loc, _message(err)))
    return out
