"""The README's example commands run and write what they say (small sizes; the figures are in docs/)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import evefx

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_quantization_example_quick_writes_table_and_plot(tmp_path):
    out = run("quantization.py", "--quick", "--out", str(tmp_path))
    data = json.loads((tmp_path / "quantization.json").read_text())
    rows = {r["row"]: r for r in data["rows"]}
    assert list(rows) == ["float", "W8A8", "W4A4"]
    assert rows["W8A8"]["bytes"] < rows["float"]["bytes"] / 3  # 8-bit weights, 32-bit biases
    assert all(0 <= r["accuracy"] <= 100 and len(r["curve"]) == 1 for r in rows.values())
    assert (tmp_path / "quantization.png").stat().st_size > 10_000
    assert "W4A4" in out


def test_search_example_writes_specs_that_transform(tmp_path):
    run("search.py", "--episodes", "6", "--final-epochs", "0", "--out", str(tmp_path))
    for kind in ("bits", "prune"):
        best = tmp_path / kind / "best.yaml"
        spec = evefx.load_spec(best)  # validates
        assert spec.passes and spec.passes[0].overrides
        assert (tmp_path / kind / "search.png").exists()
