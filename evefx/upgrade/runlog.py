"""The run folder of a search: the episode log, the best episode so far, the progress bar.

``episodes.csv`` holds one row per finished episode (reward, accuracy, cost, values, actions);
``best.json`` the best so far. A row cut short by a kill is dropped when the log is read back,
so a resumed run appends to a file that still parses.

Example:
    >>> rows = read_episodes("out/mp"); len(rows)
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from evefx.upgrade.env import EpisodeResult

__all__ = ["read_episodes", "write_json", "RunLog", "CSV_FIELDS"]

log = logging.getLogger(__name__)

CSV_FIELDS = ("episode", "reward", "accuracy", "cost", "lowered", "seconds", "values", "actions")


def read_episodes(run_dir: str | Path) -> list[dict[str, Any]]:
    """The finished episodes logged in ``run_dir/episodes.csv`` (a row cut short by a kill is dropped).

    Example:
        >>> max(read_episodes("out/mp"), key=lambda r: r["reward"])["values"]
    """
    path = Path(run_dir) / "episodes.csv"
    if not path.exists():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for raw in csv.DictReader(f):
            try:
                rows.append({
                    "episode": int(raw["episode"]), "reward": float(raw["reward"]), "accuracy": float(raw["accuracy"]),
                    "cost": float(raw["cost"]), "lowered": raw["lowered"] == "True", "seconds": float(raw["seconds"]),
                    "values": json.loads(raw["values"]), "actions": json.loads(raw["actions"]),
                })
            except (TypeError, ValueError, KeyError, json.JSONDecodeError):
                log.warning("episodes.csv: dropped an incomplete row (the run stopped while writing it)")
                break
    return rows


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


class RunLog:
    """Appends finished episodes to the CSV, keeps the best one, drives the progress bar and TensorBoard."""

    def __init__(self, run_dir: Path, rows: list[dict[str, Any]], target: int, progress: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.run_dir = run_dir
        self.rows = list(rows)
        self.target = target
        self.best: dict[str, Any] | None = max(rows, key=lambda r: r["reward"]) if rows else None
        new = not (run_dir / "episodes.csv").exists()
        if not new:
            self._rewrite()  # drop a half-written last line so appends stay parseable
        self._file = open(run_dir / "episodes.csv", "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=CSV_FIELDS)
        if new:
            self._csv.writeheader()
            self._file.flush()
        self._bar = Progress(TextColumn("search"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                             TimeRemainingColumn(), disable=not progress)
        self._task = self._bar.add_task("search", total=target, completed=len(rows), status=self._status())
        self.logger: Any = None
        self.autodump = False

    def _rewrite(self) -> None:
        with open(self.run_dir / "episodes.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            for r in self.rows:
                w.writerow(self._csv_row(r))

    @staticmethod
    def _csv_row(r: dict[str, Any]) -> dict[str, Any]:
        return {**{k: r[k] for k in CSV_FIELDS if k not in ("values", "actions")},
                "values": json.dumps(r["values"]), "actions": json.dumps(r["actions"])}

    def _status(self) -> str:
        if self.best is None:
            return "best reward -"
        return f"best reward {self.best['reward']:.4f} (acc {self.best['accuracy']:.2f}%, cost {self.best['cost']:.4g})"

    @property
    def done(self) -> int:
        return len(self.rows)

    def record(self, result: EpisodeResult) -> None:
        row = {"episode": self.done + 1, **{k: result[k] for k in CSV_FIELDS if k != "episode"}}
        self.rows.append(row)
        self._csv.writerow(self._csv_row(row))
        self._file.flush()
        if self.best is None or row["reward"] > self.best["reward"]:
            self.best = row
            write_json(self.run_dir / "best.json", row)
        if self.logger is not None:
            for key in ("reward", "accuracy", "cost"):
                self.logger.record(f"search/{key}", row[key])
            self.logger.record("search/best_reward", self.best["reward"])
            if self.autodump:  # no agent dumps it for us
                self.logger.dump(step=self.done)
        self._bar.update(self._task, completed=self.done, status=self._status())
        log.info("episode %d: reward %.4f accuracy %.2f cost %.4g", row["episode"], row["reward"], row["accuracy"], row["cost"])

    def __enter__(self) -> RunLog:
        self._bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.stop()
        self._file.close()
