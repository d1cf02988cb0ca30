"""The evefx command: validate (no torch), schema, transform, inspect, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from evefx.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_validate_ok_and_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes:\n  - {kind: quantize, weight: {bits: 0}}\n  - {kind: nope}\n")
    result = runner.invoke(app, ["validate", str(ROOT / "examples/specs/demo.yaml"), str(bad)])
    assert result.exit_code == 1
    assert f"{bad}: passes[0].weight.bits: must be between 1 and 16 (got 0)" in result.output
    assert f"{bad}: passes[1]: unknown kind 'nope'" in result.output
    ok = runner.invoke(app, ["validate", *map(str, sorted((ROOT / "examples/specs").glob("*.yaml")))])
    assert ok.exit_code == 0, ok.output


def test_validate_is_fast_and_torch_free():
    start = time.perf_counter()
    code = "import sys; from evefx.cli import app; sys.argv=['evefx','validate','examples/specs/demo.yaml']\ntry:\n    app()\nexcept SystemExit as e:\n    assert not e.code\nassert 'torch' not in sys.modules, 'validate imported torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert time.perf_counter() - start < 5.0


def test_schema_matches_checked_in_file(tmp_path):
    out = tmp_path / "schema.json"
    assert runner.invoke(app, ["schema", "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == json.loads((ROOT / "schemas/evefx-spec.schema.json").read_text())


def test_transform_prints_table_and_writes_report(tmp_path):
    spec = tmp_path / "empty.yaml"
    spec.write_text("schema_version: 1\n")
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["transform", "--model", "examples.models:DemoNet", "--spec", str(spec),
                                 "--input-shape", "1,1,28,28", "--report", str(report), "--out", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert json.loads(report.read_text())["changes"] == []
    assert (tmp_path / "m.pt").stat().st_size > 0


def test_transform_user_errors_are_one_line(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("schema_version: 1\n")
    bad_model = runner.invoke(app, ["transform", "--model", "torchvision:nonet", "--spec", str(spec)])
    assert bad_model.exit_code == 1 and "torchvision has no model 'nonet'" in bad_model.output
    bad_shape = runner.invoke(app, ["transform", "--model", "examples.models:DemoNet", "--spec", str(spec), "--input-shape", "1,x"])
    assert bad_shape.exit_code == 1 and "--input-shape must be comma-separated integers" in bad_shape.output
    wrong = runner.invoke(app, ["transform", "--model", "examples.models:DemoNet", "--spec", str(spec), "--input-shape", "1,3,28,28"])
    assert wrong.exit_code == 1 and "do not fit the model" in wrong.output


def test_inspect_lists_what_each_pass_put_there():
    result = runner.invoke(app, ["inspect", "--model", "examples.models:DemoNet", "--spec", str(ROOT / "examples/specs/demo.yaml")])
    assert result.exit_code == 0, result.output
    assert "features.0" in result.output and "passes[0] activation" in result.output


def test_export_writes_checked_int8_file(tmp_path):
    import onnx

    out = tmp_path / "demo.onnx"
    result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(ROOT / "examples/specs/demo.yaml"),
                                 "--out", str(out), "--calibrate-batches", "2"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output and "int8 QDQ" in result.output
    model = onnx.load(out)
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def test_export_without_shape_is_a_clear_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("passes: [{kind: quantize}]\n")
    result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(spec), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and "give --input-shape or trace.input_shape" in result.output
