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


def test_spiking_example_recipes(tmp_path):
    """--recipe standard (default): the plain recipe, reference row = the spec defaults; tuned: the
    earlier recipe and reference. Each row changes one thing of its recipe's reference."""
    sys.path.insert(0, str(ROOT))
    from examples.spiking import RECIPES, rows

    standard, tuned = rows("standard"), rows("tuned")
    assert standard["lif_T8"]["spec"] == {"passes": [{"kind": "spike", "neuron": {}}]}
    assert standard["if"]["spec"]["passes"][0] == {"kind": "spike", "neuron": {"type": "if"}}
    assert "direct" in standard and "poisson" in tuned and tuned["lif_T8"]["spec"]["passes"][0]["weight_scale"] == 1.0
    assert (RECIPES["standard"]["lr"], RECIPES["standard"]["batch"]) == (1e-3, 128)
    out = run("spiking.py", "--quick", "--rows", "float", "direct", "--threads", "1", "--out", str(tmp_path))
    assert "standard recipe (Adam 0.001, batch 128)" in out.replace("\n", " ")
    assert (tmp_path / "spiking.csv").read_text().count("\n") == 3  # header + 2 rows


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


def test_demo_logs_progress_line_by_line_and_ends_with_summary_and_paths(tmp_path, monkeypatch, caplog):
    """Issue 12, item 14: piped to a file, `make demo` showed nothing for ~40 s per stage and ended without
    saying what it wrote. Small data here: the figures are not the point, the output is."""
    import io
    import logging

    import torch
    from rich.console import Console
    from torch.utils.data import DataLoader, Subset

    import examples.demo as demo
    from evefx.data import mnist5k

    def small(batch_size=128, seed=0):
        train, test = mnist5k("train"), mnist5k("test")
        return (DataLoader(Subset(train, range(256)), batch_size=128, shuffle=True,
                           generator=torch.Generator().manual_seed(seed)),
                DataLoader(Subset(test, range(256)), batch_size=256))

    monkeypatch.setattr(demo, "loaders", small)
    stdout = io.StringIO()
    # the loggers' own levels too: a CLI test run earlier in this process leaves "evefx" at WARNING
    with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="evefx"), \
            caplog.at_level(logging.INFO, logger="examples"):
        demo.main(epochs=1, out=tmp_path, console=Console(file=stdout, width=200))
    lines = [r.getMessage() for r in caplog.records]
    assert [m for m in lines if m.startswith("demo: ")][1:] == [
        "demo: 1. float DemoNet", "demo: 2. quantization-aware training, W8A8 (examples/specs/demo.yaml)",
        "demo: 3. int8 ONNX export, checked with onnxruntime", "demo: 4. spiking DemoNet (examples/specs/spiking.yaml)",
        "demo: 5. prune half the channels, fine-tune, compact (examples/specs/prune.yaml)", "demo: summary"]
    assert any(m.startswith("float epoch 1/1: loss ") for m in lines)
    text = stdout.getvalue()
    assert "W8A8 int8 ONNX (onnxruntime)" in text and "50% channels removed (compact)" in text
    for name in ("demo_w8a8.pt", "demo_w8a8.onnx", "demo_pruned.pt"):
        assert f"  {tmp_path / name}\n" in text and (tmp_path / name).stat().st_size > 0


def test_demo_script_runs_from_anywhere_and_honours_help(tmp_path):
    """Issue 12, item 13: `python examples/demo.py` failed with No module named 'examples';
    `python -m examples.demo --help` ignored --help and ran the whole demo."""
    for argv, cwd in (([str(ROOT / "examples" / "demo.py"), "--help"], tmp_path), (["-m", "examples.demo", "--help"], ROOT)):
        proc = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "--epochs" in proc.stdout and "summary table" in proc.stdout


def test_demonet_width_multiplies_every_layer_and_width_1_is_the_seed_network():
    import torch

    from examples.models import DemoNet

    torch.manual_seed(0)
    seed_net = DemoNet()
    torch.manual_seed(0)
    same = DemoNet(width=1)
    assert all(torch.equal(a, b) for a, b in zip(seed_net.state_dict().values(), same.state_dict().values()))
    wide = DemoNet(width=2)
    convs = [m.out_channels for m in wide.features if isinstance(m, torch.nn.Conv2d)]
    assert convs == [8, 16, 32]
    assert (wide.classifier[1].in_features, wide.classifier[1].out_features) == (512, 32)
    assert sum(p.numel() for p in seed_net.parameters()) == 5842
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
