"""The evefx command: validate (no torch), schema, transform, inspect, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import evefx
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
    result = runner.invoke(app, ["inspect", "--model", "examples.models:DemoNet", "--spec", str(ROOT / "examples/specs/demo.yaml")],
                           terminal_width=250)
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


@pytest.mark.parametrize("fmt", ["onnx", "nir"])
def test_export_of_a_spiking_spec_sets_data_dependent_thresholds_from_the_calibration_batches(fmt, tmp_path):
    # export refuses a threshold never set; without a checkpoint the CLI sets it as it calibrates ranges
    spec = tmp_path / "s.yaml"
    spec.write_text("trace: {input_shape: [1, 1, 28, 28]}\npasses: [{kind: spike, encoder: direct, timesteps: 2}]\n")
    out = tmp_path / f"snn.{fmt}"
    result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(spec), "--out", str(out),
                                 "--format", fmt, "--data", "mnist5k", "--calibrate-batches", "1"])
    assert result.exit_code == 0, result.output
    assert out.exists() and ("passed" in result.output or fmt == "nir")


def test_export_without_shape_is_a_clear_error(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("passes: [{kind: quantize}]\n")
    result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(spec), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "error: give --input-shape, trace.input_shape in the spec, or --data: export needs example inputs")


# ---- issue 12: one clear error per user mistake, nothing silently a no-op -----------------------------------------

MYNETS = '''
from torch import nn


class Net(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)
'''


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"evefx {evefx.__version__}"


def test_validate_rejects_an_empty_file_and_warns_without_version(tmp_path):
    """Item 1: an empty spec file validated "ok"; a missing schema_version was accepted without a word."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = runner.invoke(app, ["validate", str(empty)])
    assert result.exit_code == 1
    assert f"{empty}: <spec>: the file is empty; write at least `schema_version: 1`" in result.output
    unversioned = tmp_path / "v.yaml"
    unversioned.write_text("passes: [{kind: quantize}]\n")
    result = runner.invoke(app, ["validate", str(unversioned)])
    assert result.exit_code == 0
    assert f"warning: {unversioned}: no schema_version; assuming schema_version: 1" in result.output


def test_model_that_needs_arguments_says_how_and_model_kwargs_builds_it(tmp_path, monkeypatch):
    """Item 10: a constructor with required arguments gave a raw TypeError traceback."""
    (tmp_path / "mynets.py").write_text(MYNETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = tmp_path / "s.yaml"
    spec.write_text("schema_version: 1\npasses: [{kind: quantize}]\n")
    result = runner.invoke(app, ["transform", "--model", "mynets:Net", "--spec", str(spec)])
    assert result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit)
    assert result.output.strip() == (
        "error: cannot build mynets:Net: missing a required argument: 'width'; pass its arguments as JSON with "
        "--model-kwargs '{\"name\": value}', or point --model at a factory function that needs none")
    ok = runner.invoke(app, ["transform", "--model", "mynets:Net", "--model-kwargs", '{"width": 3}', "--spec", str(spec)])
    assert ok.exit_code == 0, ok.output
    assert "QuantLinear" in ok.output or "fc" in ok.output
    bad = runner.invoke(app, ["transform", "--model", "mynets:Net", "--model-kwargs", "[3]", "--spec", str(spec)])
    assert bad.exit_code == 1 and "--model-kwargs must be a JSON/YAML mapping" in bad.output


def test_inspect_shows_bits_and_resolved_options_per_layer():
    """Item 15: inspect showed module names only, not the bits or the options the plan resolved."""
    result = runner.invoke(app, ["inspect", "--model", "examples.models:DemoNet", "--spec",
                                 str(ROOT / "examples/specs/mixed_precision.yaml")], terminal_width=250)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "I8 W8 A8" in rows["features.0"] and "W4 A4" in rows["features.3"]
    options = [line for line in result.output.splitlines() if line.startswith("│ weight.bits ")]
    assert len(options) == 1 and [c.strip() for c in options[0].split("│")[2:4]] == ["8", "4"]
    assert "passes[0] (quantize): options as resolved per layer" in result.output


def test_export_refuses_pruners_that_never_pruned(tmp_path):
    """Item 4: a prune spec exported without a pruned checkpoint gave an unpruned float file and no word."""
    out = tmp_path / "p.onnx"
    result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(ROOT / "examples/specs/prune.yaml"),
                                 "--out", str(out), "--calibrate-batches", "1"])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip() == (
        "error: the pruners of features.0, features.3, features.6, classifier.1 have never pruned (no --checkpoint "
        "was given): the file would be the unpruned model with no-op Mul nodes; pass --checkpoint of a model pruned "
        "with evefx.prune_step, or --allow-unpruned to export it anyway")


def test_search_without_eve_parameters_fails_before_training(tmp_path):
    """Item 15: the search trained for minutes, then failed because the spec has no eve parameters."""
    spec = tmp_path / "s.yaml"
    spec.write_text("schema_version: 1\npasses: [{kind: quantize}]\nsearch: {episodes: 2}\n")
    start = time.perf_counter()
    result = runner.invoke(app, ["search", "--model", "examples.models:DemoNet", "--spec", str(spec),
                                 "--run-dir", str(tmp_path / "run"), "--episodes", "1", "--seed", "3"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == ("error: the spec has no eve parameters to search: set upgrade_bits: true in a "
                                     "quantize section or upgrade_ratio: true in a prune section")
    assert time.perf_counter() - start < 20 and not (tmp_path / "run" / "start.pt").exists()


def test_search_episodes_and_seed_override_the_spec(tmp_path, monkeypatch):
    import evefx.recipes

    seen = {}

    def fake(model, spec, **kwargs):
        seen["search"] = spec.search
        raise evefx.SearchError("stop here")

    monkeypatch.setattr(evefx.recipes, "search_from_spec", fake)
    result = runner.invoke(app, ["search", "--model", "examples.models:DemoNet", "--spec",
                                 str(ROOT / "examples/specs/mixed_precision.yaml"), "--episodes", "3", "--seed", "7"])
    assert result.exit_code == 1 and "stop here" in result.output
    assert seen["search"].episodes == 3 and seen["search"].seed == 7 and seen["search"].algorithm == "ddpg"


def test_help_shows_defaults_the_same_way_and_demo_says_what_it_does():
    for command in ("transform", "inspect", "export", "search"):
        text = " ".join(runner.invoke(app, [command, "--help"], env={"COLUMNS": "250"}).output.replace("│", " ").split())
        assert "[default: (trace.input_shape)]" in text or "[default: (search.episodes)]" in text, command
    demo = " ".join(runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "250"}).output.replace("│", " ").split())
    assert "quantize, export, spike and prune" in demo and "summary table" in demo


def test_bad_checkpoint_and_output_folder_are_one_line_errors(tmp_path):
    """Further instances found for issue 12: a missing or foreign checkpoint and a missing output folder gave tracebacks."""
    demo = str(ROOT / "examples/specs/demo.yaml")
    missing = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", demo,
                                  "--out", str(tmp_path / "m.onnx"), "--checkpoint", str(tmp_path / "nope.pt")])
    assert missing.exit_code == 1 and missing.output.startswith(f"error: cannot read --checkpoint {tmp_path / 'nope.pt'}: ")
    import torch

    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    foreign = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", demo,
                                  "--out", str(tmp_path / "m.onnx"), "--checkpoint", str(tmp_path / "other.pt")])
    assert foreign.exit_code == 1
    assert foreign.output.startswith(f"error: --checkpoint {tmp_path / 'other.pt'} does not fit this model (missing [")
    assert "unexpected ['fc.weight']" in foreign.output
    nofolder = runner.invoke(app, ["transform", "--model", "examples.models:DemoNet", "--spec", demo,
                                   "--out", str(tmp_path / "no" / "m.pt")])
    assert nofolder.exit_code == 1 and f"error: cannot write {tmp_path / 'no' / 'm.pt'}: " in nofolder.output


def test_an_output_path_that_is_a_folder_is_refused_before_any_work(tmp_path):
    """`export --out FOLDER` said 'ONNX export failed ... replace that operation', `transform --out
    FOLDER` 'check that its folder exists'. Files are refused as folders (--run-dir) likewise."""
    import torch

    from evefx import ExportError
    from examples.models import DemoNet

    demo, spiking = str(ROOT / "examples/specs/demo.yaml"), str(ROOT / "examples/specs/spiking.yaml")
    for command in (["export", "--spec", demo, "--out", str(tmp_path)], ["transform", "--spec", demo, "--out", str(tmp_path)],
                    ["quantize", "--spec", str(ROOT / "examples/specs/ptq.yaml"), "--out", str(tmp_path)]):
        result = runner.invoke(app, [*command[:1], "--model", "examples.models:DemoNet", *command[1:]])
        flat = "".join(result.output.replace("│", "").split())  # click's box wraps the message and the path
        assert result.exit_code == 2 and f"Invalidvaluefor'--out':file'{tmp_path}'isadirectory." in flat, result.output
    (tmp_path / "file").write_text("")
    result = runner.invoke(app, ["search", "--model", "examples.models:DemoNet", "--spec", demo, "--run-dir", str(tmp_path / "file")])
    assert result.exit_code == 2 and "Invalidvaluefor'--run-dir'" in "".join(result.output.replace("│", "").split())
    gm = evefx.transform(DemoNet(), "passes: [{kind: quantize}]", torch.zeros(1, 1, 28, 28))
    with pytest.raises(ExportError) as e:
        evefx.export_onnx(gm, torch.zeros(1, 1, 28, 28), tmp_path)
    assert str(e.value) == f"{tmp_path} is a folder; give the file to write, e.g. {tmp_path / 'model.onnx'}"
    snn = evefx.transform(DemoNet(), spiking, torch.zeros(1, 1, 28, 28)).eval()
    with pytest.raises(ExportError, match="is a folder; give the file to write, e.g. .*model.nir$"):
        evefx.export_nir(snn, tmp_path, torch.zeros(1, 1, 28, 28), dt=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # nothing written


def test_model_refs_load_from_the_current_folder_without_editing_sys_path(monkeypatch):
    """Issue 13: the CLI put the current folder on sys.path to import examples.models."""
    from evefx.cli.models import load_model

    for name in [n for n in sys.modules if n == "examples" or n.startswith("examples.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(ROOT))])
    monkeypatch.chdir(ROOT)
    path = list(sys.path)
    model = load_model("examples.models:DemoNet", {"num_classes": 10})
    assert type(model).__name__ == "DemoNet" and sys.path == path
    assert sys.modules["examples.models"].__file__ == str(ROOT / "examples" / "models.py")
    for name in ("examples", "examples.models"):
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.chdir(ROOT / "tests")
    missing = runner.invoke(app, ["transform", "--model", "examples.models:DemoNet", "--spec", str(ROOT / "examples/specs/demo.yaml")])
    assert missing.exit_code == 1 and "error: cannot load model 'examples.models:DemoNet': No module named 'examples'" in missing.output


def test_search_hands_the_ray_address_to_connect_not_to_the_environment(tmp_path, monkeypatch):
    """Issue 13: --ray-address was passed on through os.environ["RAY_ADDRESS"]."""
    import os

    from evefx.errors import SearchError
    from evefx.upgrade import ray_backend

    got = []

    def connect(address=None, num_cpus=None):
        got.append(address)
        raise SearchError("no cluster here")

    monkeypatch.setattr(ray_backend, "connect", connect)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text("passes: [{kind: quantize, upgrade_bits: true, weight: {bits: 8}}]\nsearch: {algorithm: random, episodes: 1}\n")
    out = runner.invoke(app, ["search", "--model", "examples.models:DemoNet", "--spec", str(spec), "--run-dir",
                              str(tmp_path / "run"), "--ray-address", "ray://head:10001"])
    assert out.exit_code == 1 and "error: no cluster here" in out.output, out.output
    assert got == ["ray://head:10001"] and "RAY_ADDRESS" not in os.environ


def test_export_reestimates_batchnorm_on_the_data_only(tmp_path):
    import onnx
    import torch

    from examples.models import DemoNet

    spec = ROOT / "examples/specs/demo.yaml"
    noise = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(spec),
                                "--out", str(tmp_path / "n.onnx"), "--reestimate-bn"])
    assert noise.exit_code == 1 and noise.output.startswith("error: --reestimate-bn needs real images: give --data")
    assert not (tmp_path / "n.onnx").exists()
    gm = evefx.transform(DemoNet(), spec)  # a checkpoint whose BatchNorms never saw data: statistics 0 / 1
    evefx.calibrate(gm, [torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))], progress=False)
    torch.save(gm.state_dict(), tmp_path / "ckpt.pt")
    files = {}
    for flag in ("--no-reestimate-bn", "--reestimate-bn"):
        out = tmp_path / f"{flag}.onnx"
        result = runner.invoke(app, ["export", "--model", "examples.models:DemoNet", "--spec", str(spec), "--out", str(out),
                                     "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", "mnist5k",
                                     "--calibrate-batches", "2", flag])
        assert result.exit_code == 0, result.output
        assert ("re-estimated 3 BatchNorms on 2 batches of --data" in result.output) == (flag == "--reestimate-bn")
        files[flag] = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    # the folded biases carry the BatchNorm statistics: re-estimated ones change them, and the file still passes parity
    changed = [k for k in files["--reestimate-bn"] if k in files["--no-reestimate-bn"]
               and files["--reestimate-bn"][k].shape == files["--no-reestimate-bn"][k].shape
               and not (files["--reestimate-bn"][k] == files["--no-reestimate-bn"][k]).all()]
    assert changed


@pytest.mark.parametrize("command, option, value", [
    ("quantize", "--batch-size", "0"),        # was a traceback (range() arg 3 must not be zero)
    ("quantize", "--calib-samples", "0"),
    ("export", "--calibrate-batches", "0"),
    ("export", "--top1-min", "150"),          # was 'the exported file is wrong: max |diff| 0 > tolerance'
])
def test_counts_and_percentages_out_of_range_are_refused_by_name(tmp_path, command, option, value):
    spec = str(ROOT / ("examples/specs/ptq.yaml" if command == "quantize" else "examples/specs/demo.yaml"))
    result = runner.invoke(app, [command, "--model", "examples.models:DemoNet", "--spec", spec, "--out",
                                 str(tmp_path / "m.onnx"), option, value])
    flat = "".join(result.output.replace("│", "").split())
    assert result.exit_code == 2 and f"Invalidvaluefor'{option}'" in flat, result.output
    assert not (tmp_path / "m.onnx").exists()
