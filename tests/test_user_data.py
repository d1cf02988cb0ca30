"""A user's own data (a .pt file) through ``evefx.data.open_data`` and every command's ``--data``."""
from __future__ import annotations

import csv

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evefx import OptionError
from evefx.cli import app
from evefx.data import open_data
from tests.helpers import ColourNet, colour_data, token_data

runner = CliRunner()
MODEL = ["--model", "tests.helpers:ColourNet", "--model-kwargs", '{"num_classes": 3}']


def test_a_file_of_inputs_and_labels_keeps_its_last_fifth_out(tmp_path):
    x, y = colour_data(100)
    torch.save((x, y), tmp_path / "d.pt")
    d = open_data(tmp_path / "d.pt")
    assert (len(d.train), len(d.held_out), d.labelled, d.validation_size) == (80, 20, True, 16)
    assert torch.equal(d.held_out.tensors[0], x[80:]) and torch.equal(d.train.tensors[1], y[:80])
    assert torch.equal(d.inputs("train", 5, start=78), x[78:80])  # never reaches into the held-out part
    torch.save(x[:10].double(), tmp_path / "x.pt")
    only = open_data(tmp_path / "x.pt")
    assert (len(only.train), len(only.held_out), only.labelled) == (8, 2, False) and only.inputs("train", 1).dtype == torch.float32
    torch.save((torch.arange(20).view(10, 2), y[:10]), tmp_path / "ids.pt")
    assert open_data(tmp_path / "ids.pt").inputs("train", 1).dtype == torch.int64  # token ids stay integers
    torch.save({"train": (x[:30], y[:30]), "test": (x[30:40], y[30:40])}, tmp_path / "tt.pt")
    split = open_data(tmp_path / "tt.pt")
    assert (len(split.train), len(split.held_out), split.validation_size) == (30, 10, 6)
    from torch.utils.data import Subset

    from evefx.data import DataSplits  # any map-style data set (a Python user's), not only tensors
    mine = DataSplits("mine", Subset(split.train, range(10, 20)), split.held_out, True, 2)
    assert torch.equal(mine.inputs("train", 3, start=8), x[18:20])
    assert mine.inputs("train", 32, start=32).shape == (0, 3, 32, 32)  # past the end: an empty batch, not an error


def test_data_that_does_not_fit_is_a_one_line_error(tmp_path):
    x, y = colour_data(10)
    cases = {
        "labels.pt": ((x, y.float()), "labels must be a 1-D integer tensor of one label per input (got (10,) torch.float32 for 10 inputs)"),
        "keys.pt": ({"train": (x, y)}, "a dict must have exactly the keys 'train' and 'test' (got ['train'])"),
        "mixed.pt": ({"train": (x, y), "test": x}, "'train' and 'test' must both have labels or both not, "
                                                   "with the same number of inputs"),
        "one.pt": (x[:1], "holds 1 sample(s); at least 2 are needed (one to hold out)"),
        "other.pt": ([1, 2, 3], "must hold a tensor of inputs, a pair (inputs, labels), ((inputs_1, inputs_2, ...), labels) "
                                "for a model of several inputs, or a dict {'train': ..., 'test': ...} of those (got list); "
                                "save one with torch.save"),
        "rows.pt": (((x, x[:5]), y), "every input must have one row per sample (got [10, 5] rows)"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(OptionError) as e:
            open_data(tmp_path / name)
        assert str(e.value).startswith(f"--data {tmp_path / name}") and str(e.value).endswith(message), str(e.value)
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(OptionError, match=r"^--data .*text.pt: cannot read it with torch.load\(weights_only=True\): "):
        open_data(tmp_path / "text.pt")
    with pytest.raises(OptionError, match=r"^--data must be mnist5k, mnist, a .pt file saved with torch.save or a .npz file \(got .nope.pt.: no such file\)$"):
        open_data("nope.pt")
    with pytest.raises(OptionError, match=r"^--data mnist needs --data-root, the folder holding torchvision's MNIST$"):
        open_data("mnist")


def _spec(tmp_path, text: str):
    path = tmp_path / "s.yaml"
    path.write_text("schema_version: 1\ntrace: {input_shape: [1, 3, 32, 32]}\n" + text)
    return str(path)


def test_search_runs_on_the_users_file_and_scores_on_its_own_validation_part(tmp_path, monkeypatch):
    """`evefx search` knew only MNIST: a user's model and data could not be searched from the command line."""
    import evefx.upgrade

    x, y = colour_data(120)
    torch.save((x, y), tmp_path / "d.pt")
    seen = []
    score = evefx.upgrade.Accuracy.__call__

    def spy(self, model):
        seen.append(torch.cat([b[0] for b in self.data]))
        return score(self, model)

    monkeypatch.setattr(evefx.upgrade.Accuracy, "__call__", spy)
    spec = _spec(tmp_path, "passes: [{kind: quantize, upgrade_bits: true, min_bits: 2, max_bits: 8}]\n"
                           "search: {algorithm: random, episodes: 2, evaluator: {kind: none}, budget: {kind: avg_bits, max: 4}}\n")
    result = runner.invoke(app, ["search", *MODEL, "--spec", spec, "--data", str(tmp_path / "d.pt"),
                                 "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert result.exit_code == 0, result.output
    assert seen and all(torch.equal(s, x[77:96]) for s in seen)  # the last fifth of the 96 training inputs
    rows = list(csv.DictReader(open(tmp_path / "run" / "episodes.csv")))
    assert len(rows) == 2 and all(float(r["cost"]) <= 4 for r in rows)
    assert yaml.safe_load((tmp_path / "run" / "best.yaml").read_text())["passes"][0]["overrides"]
    torch.save(x, tmp_path / "x.pt")
    unlabelled = runner.invoke(app, ["search", *MODEL, "--spec", spec, "--data", str(tmp_path / "x.pt"),
                                     "--run-dir", str(tmp_path / "run2")])
    assert unlabelled.exit_code == 1 and unlabelled.output.strip().splitlines()[-1] == (
        f"error: --data {tmp_path / 'x.pt'} holds no labels: a search scores accuracy, so it needs (inputs, labels)")


def test_export_calibrates_on_the_users_file_and_checks_parity_on_its_held_out_part(tmp_path, monkeypatch):
    """`evefx export --data` took only mnist5k: a user's model was calibrated on random inputs."""
    import evefx.export

    x, y = colour_data(80)
    torch.save((x, y), tmp_path / "d.pt")
    seen = {}
    export = evefx.export.export_onnx

    def spy(gm, example, path, **kwargs):
        seen["parity"] = kwargs["real_inputs"]
        seen["range"] = {n: float(q.range_max.max()) for n, q in gm.named_modules() if n == "body_0_input_quant"}
        return export(gm, example, path, **kwargs)

    monkeypatch.setattr(evefx.export, "export_onnx", spy)
    spec = _spec(tmp_path, "passes: [{kind: quantize}]\n")
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", *MODEL, "--spec", spec, "--out", str(out), "--data", str(tmp_path / "d.pt"),
                                 "--calibrate-batches", "1"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output and out.exists()
    assert torch.equal(seen["parity"], x[64:])  # the held-out fifth, not the calibration inputs
    assert seen["range"]["body_0_input_quant"] == pytest.approx(float(x[:32].max()))  # the file's inputs, not U(0, 1)
    mnist = runner.invoke(app, ["export", *MODEL, "--spec", spec, "--out", str(tmp_path / "n.onnx"), "--data", "mnist5k"])
    assert mnist.exit_code == 1 and mnist.output.strip().splitlines()[-1] == (
        "error: --data mnist5k holds inputs of shape [1, 28, 28] but the model takes [1, 3, 32, 32]; give data of that "
        "shape, or no --data (random inputs)")
    assert not (tmp_path / "n.onnx").exists()


def test_quantize_takes_model_arguments_and_scores_on_the_held_out_part(tmp_path):
    torch.manual_seed(0)
    model = ColourNet(3)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    x, _ = colour_data(50)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[:40] = (y[:40] + 1) % 3  # wrong labels on the calibration part: scoring there would say 0% for float
    torch.save((x, y), tmp_path / "d.pt")
    report = tmp_path / "r.json"
    result = runner.invoke(app, ["quantize", *MODEL, "--checkpoint", str(tmp_path / "w.pt"), "--spec",
                                 _spec(tmp_path, "passes: [{kind: quantize, weight: {bits: 7}}]\n"),
                                 "--data", str(tmp_path / "d.pt"), "--out", str(tmp_path / "m.onnx"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(report.read_text())["accuracy"]["float"] == 100.0


def test_a_numpy_file_reads_as_the_same_splits(tmp_path):
    import numpy as np

    x, y = colour_data(50)
    np.savez(tmp_path / "d.npz", x=x.double().numpy(), y=y.numpy())
    d = open_data(tmp_path / "d.npz")
    assert (len(d.train), len(d.held_out), d.labelled) == (40, 10, True)
    assert d.inputs("train", 1).dtype == torch.float32 and torch.allclose(d.inputs("held_out", 10), x[40:])
    np.savez(tmp_path / "tt.npz", x=x[:30].numpy(), y=y[:30].numpy(), x_test=x[30:].numpy(), y_test=y[30:].numpy())
    assert (len(open_data(tmp_path / "tt.npz").train), len(open_data(tmp_path / "tt.npz").held_out)) == (30, 20)
    np.savez(tmp_path / "bad.npz", images=x.numpy())
    with pytest.raises(OptionError) as e:
        open_data(tmp_path / "bad.npz")
    assert str(e.value) == (f"--data {tmp_path / 'bad.npz'}: a .npz file holds arrays x, and optionally y, x_test, y_test; "
                            "a model of several inputs numbers them x0, x1, ... and x0_test, x1_test, ... (got ['images'])")
    np.savez(tmp_path / "gap.npz", x0=x.numpy(), x2=x.numpy(), y=y.numpy())  # x1 missing: x2 is not an input
    with pytest.raises(OptionError, match=r"numbers them x0, x1, \.\.\. and x0_test, x1_test, \.\.\. \(got \['x0', 'x2', 'y'\]\)$"):
        open_data(tmp_path / "gap.npz")
    np.savez(tmp_path / "both.npz", x=x.numpy(), x0=x.numpy())
    with pytest.raises(OptionError) as e:
        open_data(tmp_path / "both.npz")
    assert str(e.value) == f"--data {tmp_path / 'both.npz'}: both x and x0: name one input x, several x0, x1, ..."


def test_a_numpy_file_of_several_inputs_reads_as_the_pt_file_does(tmp_path):
    """x0, x1 (+ y, x0_test, x1_test, y_test) read as ((x0, x1), y) does from a .pt file; without y
    the inputs stay two inputs, unlabelled (a plain pair would read as inputs and labels)."""
    import numpy as np

    from evefx.data import rows

    ids, y = token_data(100)
    mask = torch.ones(ids.shape)
    mask[::2, 8:] = 0
    torch.save(((ids, mask), y), tmp_path / "two.pt")
    np.savez(tmp_path / "two.npz", x0=ids.numpy(), x1=mask.double().numpy(), y=y.numpy())
    pt, npz = open_data(tmp_path / "two.pt"), open_data(tmp_path / "two.npz")
    assert npz.labelled and (len(npz.train), len(npz.held_out)) == (80, 20)
    for a, b in zip(pt.train.tensors + pt.held_out.tensors, npz.train.tensors + npz.held_out.tensors):
        assert a.dtype == b.dtype and torch.equal(a, b)
    np.savez(tmp_path / "split.npz", x0=ids[:70].numpy(), x1=mask[:70].numpy(), x0_test=ids[70:].numpy(),
             x1_test=mask[70:].numpy())
    d = open_data(tmp_path / "split.npz")
    assert not d.labelled and (len(d.train), len(d.held_out)) == (70, 30)
    first = d.inputs("held_out", 2)
    assert isinstance(first, tuple) and rows(first) == 2 and torch.equal(first[0], ids[70:72])
    plain = tmp_path / "plain.yaml"
    plain.write_text("schema_version: 1\npasses: [{kind: quantize}]\n")
    for name in ("two.npz", "split.npz"):  # labelled (accuracy) and unlabelled (output error against float)
        ranked = runner.invoke(app, ["sensitivity", "--model", "tests.helpers:TokenMaskNet", "--spec", str(plain),
                                     "--data", str(tmp_path / name), "--calib-samples", "32", "--bits", "8,2"])
        assert ranked.exit_code == 0 and "fc1" in ranked.output and "fc2" in ranked.output, ranked.output
    np.savez(tmp_path / "odd.npz", x0=ids.numpy(), x1=mask[:50].numpy())
    with pytest.raises(OptionError) as e:
        open_data(tmp_path / "odd.npz")
    assert str(e.value) == f"--data {tmp_path / 'odd.npz'}: every input must have one row per sample (got [100, 50] rows)"
    np.savez(tmp_path / "mixed.npz", x0=ids.numpy(), x1=mask.numpy(), y=y.numpy(), x_test=ids.numpy(), y_test=y.numpy())
    with pytest.raises(OptionError, match="'train' and 'test' must both have labels or both not, with the same number of inputs"):
        open_data(tmp_path / "mixed.npz")


def test_a_token_model_exports_and_searches_on_its_integer_data(tmp_path):
    """The commands traced with float zeros of --input-shape: a model of token ids failed in its
    embedding, even with the ids given in --data. The data's own inputs are now the example."""
    ids, y = token_data(100)
    torch.save((ids, y), tmp_path / "tokens.pt")
    token_model = ["--model", "tests.helpers:TokenNet"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("schema_version: 1\npasses: [{kind: quantize}]\n")
    out = tmp_path / "t.onnx"
    result = runner.invoke(app, ["export", *token_model, "--spec", str(plain), "--out", str(out),
                                 "--data", str(tmp_path / "tokens.pt"), "--calibrate-batches", "2"])
    assert result.exit_code == 0, result.output
    assert "passed" in result.output and out.exists()
    no_shape = runner.invoke(app, ["export", *token_model, "--spec", str(plain), "--out", str(tmp_path / "n.onnx")])
    assert no_shape.exit_code == 1 and no_shape.output.strip().splitlines()[-1] == (
        "error: give --input-shape, trace.input_shape in the spec, or --data: export needs example inputs")
    spec = tmp_path / "s.yaml"  # trace.input_shape given, as docs/search.md writes it
    spec.write_text("schema_version: 1\ntrace: {input_shape: [1, 12]}\n"
                    "passes: [{kind: quantize, upgrade_bits: true, min_bits: 2, max_bits: 8}]\n"
                    "search: {algorithm: random, episodes: 2, evaluator: {kind: none}, budget: {kind: avg_bits, max: 4}}\n")
    search = runner.invoke(app, ["search", *token_model, "--spec", str(spec), "--data", str(tmp_path / "tokens.pt"),
                                 "--run-dir", str(tmp_path / "run"), "--epochs", "1"])
    assert search.exit_code == 0, search.output
    assert len(list(csv.DictReader(open(tmp_path / "run" / "episodes.csv")))) == 2
    inspected = runner.invoke(app, ["inspect", *token_model, "--spec", str(spec), "--data", str(tmp_path / "tokens.pt")])
    assert inspected.exit_code == 0 and "QuantLinear" in inspected.output, inspected.output
    zeros = runner.invoke(app, ["transform", *token_model, "--spec", str(spec)])  # float zeros of trace.input_shape
    assert zeros.exit_code == 1 and "layer emb (Embedding) fails on inputs of shape (1, 12)" in zeros.output
    assert runner.invoke(app, ["transform", *token_model, "--spec", str(spec), "--data", str(tmp_path / "tokens.pt")]).exit_code == 0
    best = runner.invoke(app, ["export", *token_model, "--spec", str(tmp_path / "run" / "best.yaml"), "--checkpoint",
                               str(tmp_path / "run" / "best.pt"), "--data", str(tmp_path / "tokens.pt"),
                               "--out", str(tmp_path / "best.onnx")])
    assert best.exit_code == 0, best.output
    assert "passed" in best.output


def test_a_two_input_model_searches_through_the_python_api(tmp_path):
    """search_from_spec took only each item's first field for its example and observation batch: a
    model of (ids, mask) failed with a missing argument."""
    from torch.utils.data import TensorDataset

    from evefx.data import DataSplits
    from evefx.recipes import search_from_spec
    from tests.helpers import TokenMaskNet

    ids, y = token_data(100)
    mask = torch.ones(ids.shape)
    mask[::2, 8:] = 0  # padded sequences
    splits = DataSplits("mine", TensorDataset(ids[:80], mask[:80], y[:80]), TensorDataset(ids[80:], mask[80:], y[80:]),
                        True, 16)
    spec = {"schema_version": 1, "passes": [{"kind": "quantize", "upgrade_bits": True, "min_bits": 2, "max_bits": 8}],
            "search": {"algorithm": "random", "episodes": 2, "evaluator": {"kind": "none"},
                       "budget": {"kind": "avg_bits", "max": 4}}}
    result = search_from_spec(TokenMaskNet(), spec, data=splits, run_dir=tmp_path / "run", epochs=1, progress=False)
    assert len(result.episodes) == 2 and result.best["cost"] <= 4


def test_a_two_input_model_runs_every_command_on_its_file(tmp_path):
    """`--data` held one input per sample: a model of (ids, mask) could not be calibrated, exported,
    quantized or searched from the command line. ((ids, mask), labels) files now feed all of them."""
    from evefx.data import rows, take

    ids, y = token_data(100)
    mask = torch.ones(ids.shape)
    mask[::2, 8:] = 0
    torch.save(((ids, mask), y), tmp_path / "two.pt")
    d = open_data(tmp_path / "two.pt")
    first = d.inputs("train", 3, start=79)  # never reaches into the held-out part
    assert d.labelled and isinstance(first, tuple) and rows(first) == 1 and torch.equal(first[1], mask[79:80])
    assert torch.equal(take(d.inputs("held_out", 256), 0, 2)[0], ids[80:82])
    data, two = ["--data", str(tmp_path / "two.pt")], ["--model", "tests.helpers:TokenMaskNet"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("schema_version: 1\npasses: [{kind: quantize}]\n")
    exported = runner.invoke(app, ["export", *two, "--spec", str(plain), *data, "--out", str(tmp_path / "e.onnx")])
    assert exported.exit_code == 0 and "passed" in exported.output, exported.output
    quantized = runner.invoke(app, ["quantize", *two, "--spec", str(plain), *data, "--out", str(tmp_path / "q.onnx"),
                                    "--report", str(tmp_path / "r.json")])
    assert quantized.exit_code == 0, quantized.output
    import json

    accuracy = json.loads((tmp_path / "r.json").read_text())["accuracy"]
    assert accuracy["quantized (PyTorch)"] == accuracy["quantized (onnxruntime)"]
    spec = tmp_path / "s.yaml"
    spec.write_text("schema_version: 1\npasses: [{kind: quantize, upgrade_bits: true, min_bits: 2, max_bits: 8}]\n"
                    "search: {algorithm: random, episodes: 2, evaluator: {kind: none}, budget: {kind: avg_bits, max: 4}}\n")
    searched = runner.invoke(app, ["search", *two, "--spec", str(spec), *data, "--run-dir", str(tmp_path / "run"),
                                   "--epochs", "1"])
    assert searched.exit_code == 0, searched.output
    assert len(list(csv.DictReader(open(tmp_path / "run" / "episodes.csv")))) == 2
