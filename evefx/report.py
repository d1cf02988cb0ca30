"""``TransformReport``: what a transform changed, as data and as a rich table."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rich.table import Table

from evefx.passes.base import Change

__all__ = ["TransformReport"]


@dataclass(frozen=True)
class TransformReport:
    """The changes of one ``evefx.transform`` call, in order.

    Example:
        >>> rich.print(gm.report)          # a table
        >>> gm.report.to_dict()["changes"][0]["action"]
        'replaced'
    """

    changes: tuple[Change, ...] = ()
    params_before: int = 0
    params_after: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def modified(self) -> bool:
        return bool(self.changes)

    def counts(self) -> dict[str, int]:
        return dict(Counter(c.action for c in self.changes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": [c.to_dict() for c in self.changes],
            "counts": self.counts(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            **self.extra,
        }

    def table(self, title: str = "evefx changes") -> Table:
        t = Table(title=title)
        for col in ("spec path", "layer", "action", "node", "module", "detail"):
            t.add_column(col)
        for c in self.changes:
            t.add_row(c.spec_path, c.layer, c.action, c.node, c.target, c.detail)
        if not self.changes:
            t.add_row("-", "-", "nothing to do", "-", "-", "-")
        t.caption = f"parameters: {self.params_before:,} -> {self.params_after:,}"
        return t

    def __rich__(self) -> Table:
        return self.table()

    def __str__(self) -> str:
        lines = [f"{len(self.changes)} changes ({self.counts()})"]
        lines += [f"  {c.spec_path}: {c.action} {c.target} at {c.layer} {c.detail}".rstrip() for c in self.changes]
        return "\n".join(lines)
