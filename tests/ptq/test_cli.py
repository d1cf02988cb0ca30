"""``evefx quantize`` and ``evefx sensitivity`` end to end on a tiny model and a .pt data file."""
from __future__ import annotations

import json

import onnx
import torch
import yaml
from typer.testing import CliRunner

from evefx.cli import app
from examples.models import DemoNet

runner = CliRunner()


def _files(tmp_path, spec_text: str):
    torch.manual_seed(0)
    ckpt = tmp_path / "w.pt"
    model = DemoNet()
    torch.save(model.state_dict(), ckpt)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 28, 28, generator=gen)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    data = tmp_path / "d.pt"
    torch.save((x, y), data)
    spec = tmp_path / "s.yaml"
    spec.write_text(spec_text)
    return ckpt, data, spec, model


def test_quantize_end_to_end(tmp_path):
    # 7-bit weights: onnxruntime's u8s8 kernels on AVX2 machines without VNNI add pairs of products in
    # int16 and saturate with full 8-bit weight codes (DESIGN.md); the parity check would see that
    ckpt, data, spec, model = _files(tmp_path, "passes:\n  - kind: quantize\n    weight: {bits: 7}\n"
                                               "    calibration: {method: percentile}\n"
                                               "    bias_correction: true\n    equalize: true\n")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    result = runner.invoke(app, ["quantize", "--model", "examples.models:DemoNet", "--checkpoint", str(ckpt), "--spec", str(spec),
                                 "--data", str(data), "--out", str(out), "--calib-samples", "32", "--batch-size", "16",
                                 "--report", str(rep)])
    assert result.exit_code == 0, result.output
    assert "bias correction" in result.output and "passed" in result.output
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(out).graph.node)
    figures = json.loads(rep.read_text())
    acc = figures["accuracy"]
    assert acc["float"] == 100.0 and acc["quantized (PyTorch)"] == acc["quantized (onnxruntime)"] >= 90.0
    assert figures["ptq"]["calibration"]["samples"] == 32
    methods = {(r["role"], r["method"]) for r in figures["ptq"]["calibration"]["rows"]}
    assert ("activation", "percentile") in methods and ("weight", "minmax") in methods
    assert all(torch.equal(v, torch.load(ckpt)[k]) for k, v in before.items())  # the checkpoint is untouched


def test_sensitivity_end_to_end(tmp_path):
    ckpt, data, spec, _ = _files(tmp_path, "passes:\n  - kind: quantize\n")
    png, ov = tmp_path / "s.png", tmp_path / "o.yaml"
    result = runner.invoke(app, ["sensitivity", "--model", "examples.models:DemoNet", "--checkpoint", str(ckpt), "--spec", str(spec),
                                 "--data", str(data), "--bits", "4,2", "--budget", "3", "--png", str(png),
                                 "--overrides", str(ov), "--calib-samples", "32", "--allocation", "knapsack"])
    assert result.exit_code == 0, result.output
    assert png.exists() and "drop @2" in result.output
    patches = yaml.safe_load(ov.read_text())["overrides"]
    assert patches and all(set(p) == {"names", "weight"} for p in patches)


def test_quantize_user_errors_are_one_line(tmp_path):
    ckpt, data, spec, _ = _files(tmp_path, "passes:\n  - kind: quantize\n")
    bad = runner.invoke(app, ["quantize", "--model", "examples.models:DemoNet", "--spec", str(spec), "--data", "nope",
                              "--out", str(tmp_path / "m.onnx")])
    assert bad.exit_code == 1 and "--data must be mnist5k, mnist, a .pt file saved with torch.save or a .npz file" in bad.output
    torch.save({"fc.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    wrong = runner.invoke(app, ["quantize", "--model", "examples.models:DemoNet", "--spec", str(spec), "--data", str(data),
                                "--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "m.onnx")])
    assert wrong.exit_code == 1 and wrong.output.startswith(f"error: --checkpoint {tmp_path / 'bad.pt'} does not fit this model (")
    assert wrong.output.rstrip().endswith("save it from the float model examples.models:DemoNet (torch.save(model.state_dict()))")


def test_quantize_checkpoints_that_cannot_be_read_are_one_line_errors_and_write_nothing(tmp_path):
    """A missing file, a text file and a list gave tracebacks from `quantize --checkpoint`; a
    training checkpoint {"epoch": ..., "state_dict": ...} is read as its state_dict."""
    from evefx.api import load_checkpoint

    _, data, spec, _ = _files(tmp_path, "passes:\n  - kind: quantize\n")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    expected = {"nope.pt": f"error: cannot read --checkpoint {tmp_path / 'nope.pt'}: [Errno 2] No such file or directory",
                "text.pt": f"error: cannot read --checkpoint {tmp_path / 'text.pt'}: torch.load(weights_only=True) refused "
                           "it; save the model's state_dict with torch.save",
                "list.pt": f"error: --checkpoint {tmp_path / 'list.pt'} holds a list, not a state_dict (save model.state_dict())"}
    for name, message in expected.items():
        out = tmp_path / f"{name}.onnx"
        result = runner.invoke(app, ["quantize", "--model", "examples.models:DemoNet", "--spec", str(spec), "--data",
                                     str(data), "--checkpoint", str(tmp_path / name), "--out", str(out)])
        assert result.exit_code == 1 and result.output.startswith(message), result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()
    torch.manual_seed(0)
    model = DemoNet()
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "wrapped.pt")
    loaded = DemoNet()
    load_checkpoint(loaded, tmp_path / "wrapped.pt")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    ok = runner.invoke(app, ["quantize", "--model", "examples.models:DemoNet", "--spec", str(spec), "--data", str(data),
                             "--checkpoint", str(tmp_path / "wrapped.pt"), "--out", str(tmp_path / "w.onnx"),
                             "--calib-samples", "32"])
    assert ok.exit_code == 0 and (tmp_path / "w.onnx").exists(), ok.output
