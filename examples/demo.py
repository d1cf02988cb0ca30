"""The main job (``make demo``): DemoNet on the embedded MNIST, transformed by evefx specs.

1. train the plain float network;
2. quantization-aware training at W8A8 (``examples/specs/demo.yaml``): accuracy and weight size;
3. export the quantized network to int8 ONNX and check it with onnxruntime;
4. the same network as a spiking network (``examples/specs/spiking.yaml``): accuracy, firing rates;
5. prune half of its channels (``examples/specs/prune.yaml``), fine-tune, compact: size before/after.

Progress is logged line by line (one line per epoch, also when the output goes to a file); the
run ends with a summary table and the paths of every file it wrote.

Run: ``evefx demo``, ``python -m examples.demo`` or ``python examples/demo.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from rich.console import Console
from rich.table import Table

import evefx
from evefx.data import loaders
from evefx.train import evaluate, fit, seed_everything
from examples.models import DemoNet

SPECS = Path(__file__).parent / "specs"
log = logging.getLogger("examples.demo")


def _stage(console: Console, title: str) -> None:
    """A stage header on the console, and a log line (stderr is unbuffered: a piped run shows it at once)."""
    console.rule(title)
    log.info("demo: %s", title)


def _weight_bytes_fp32(model: torch.nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def main(epochs: int = 5, out: Path = Path("out/demo"), console: Console | None = None) -> dict[str, float]:
    """Run every stage; print a summary table and the files written; return the headline figures."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    seed_everything(0)
    train, test = loaders(batch_size=128, seed=0)
    example = torch.zeros(1, 1, 28, 28)
    figures: dict[str, float] = {}

    written: list[Path] = []
    log.info("demo: 5 stages, %d epochs each; writing to %s", epochs, out)

    _stage(console, "1. float DemoNet")
    float_model = DemoNet()
    fit(float_model, train, test, epochs=epochs, lr=3e-3, description="float")
    figures["float"] = evaluate(float_model, test)["accuracy"]
    console.print(f"float accuracy: {figures['float']:.2f}%")

    _stage(console, "2. quantization-aware training, W8A8 (examples/specs/demo.yaml)")
    qat = evefx.transform(float_model, SPECS / "demo.yaml", example)
    console.print(qat.report)
    fit(qat, train, test, epochs=max(1, epochs - 1), lr=5e-4, description="QAT W8A8")
    figures["w8a8"] = evaluate(qat, test)["accuracy"]
    from evefx.passes.quantize import quant_summary

    rows = quant_summary(qat)
    q_bytes = sum(r["bytes"] for r in rows)
    table = Table(title="float vs W8A8")
    for col in ("model", "accuracy", "weight bytes"):
        table.add_column(col, justify="right")
    table.add_row("float", f"{figures['float']:.2f}%", f"{_weight_bytes_fp32(float_model):,}")
    table.add_row("W8A8 (QAT)", f"{figures['w8a8']:.2f}%", f"{q_bytes:,}")
    console.print(table)
    torch.save(qat.state_dict(), out / "demo_w8a8.pt")
    written.append(out / "demo_w8a8.pt")

    _stage(console, "3. int8 ONNX export, checked with onnxruntime")
    from evefx.export import export_onnx, onnx_accuracy

    x_real = next(iter(test))[0][:256]
    report = export_onnx(qat, example, out / "demo_w8a8.onnx", real_inputs=x_real)
    written.append(out / "demo_w8a8.onnx")
    console.print(report.table())
    figures["onnx"] = onnx_accuracy(out / "demo_w8a8.onnx", test)
    console.print(f"accuracy on the held-out split: PyTorch {figures['w8a8']:.2f}%  onnxruntime {figures['onnx']:.2f}%")

    _stage(console, "4. spiking DemoNet (examples/specs/spiking.yaml)")
    seed_everything(0)
    snn = evefx.transform(DemoNet(), SPECS / "spiking.yaml", example)
    console.print(snn.report)
    fit(snn, train, test, epochs=epochs, lr=3e-3, description="spiking")
    figures["spiking"] = evaluate(snn, test)["accuracy"]
    obs = evefx.observe(snn, next(iter(test))[0][:256])
    rates = Table(title=f"spiking accuracy {figures['spiking']:.2f}%: firing rates")
    rates.add_column("layer")
    rates.add_column("firing rate", justify="right")
    for layer in obs.layers:
        row = obs.row(layer)
        if "neuron.firing_rate" in row:
            rates.add_row(layer, f"{row.get('neuron.firing_rate', 0.0):.3f}")
    console.print(rates)

    _stage(console, "5. prune half the channels, fine-tune, compact (examples/specs/prune.yaml)")
    pruned = evefx.transform(float_model, SPECS / "prune.yaml", example)
    evefx.prune_step(pruned)  # l1_norm ranks channels by weight magnitude: no statistics needed
    fit(pruned, train, test, epochs=max(1, epochs - 1), lr=3e-3, description="fine-tune pruned")
    figures["pruned"] = evaluate(pruned, test)["accuracy"]
    small = evefx.compact(pruned)
    figures["compact"] = evaluate(small, test)["accuracy"]
    console.print(evefx.compact_report(small).table())
    console.print(f"accuracy: float {figures['float']:.2f}%  masked {figures['pruned']:.2f}%  compacted {figures['compact']:.2f}%")
    torch.save(pruned.state_dict(), out / "demo_pruned.pt")
    written.append(out / "demo_pruned.pt")

    _stage(console, "summary")
    summary = Table(title=f"DemoNet on MNIST-5k ({epochs} epoch{'s' if epochs != 1 else ''} per run), test accuracy")
    summary.add_column("model")
    summary.add_column("accuracy", justify="right")
    for key, label in (("float", "float"), ("w8a8", "W8A8 QAT (PyTorch)"), ("onnx", "W8A8 int8 ONNX (onnxruntime)"),
                       ("spiking", "spiking, LIF T=8"), ("pruned", "50% channels masked, fine-tuned"),
                       ("compact", "50% channels removed (compact)")):
        summary.add_row(label, f"{figures[key]:.2f}%")
    console.print(summary)
    console.print("wrote:")
    for path in written:
        console.print(f"  {path}", highlight=False)
    console.print(f"  (the quantized checkpoint exports again with: evefx export --model examples.models:DemoNet "
                  f"--spec examples/specs/demo.yaml --checkpoint {out / 'demo_w8a8.pt'} --out demo.onnx)", highlight=False)
    return figures


def cli(argv: list[str] | None = None) -> dict[str, float]:
    """``python -m examples.demo [--epochs N] [--out DIR]``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="training epochs of each run (default: 5)")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the demo's files (default: out/demo)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for name in ("evefx", "examples"):
        logging.getLogger(name).setLevel(logging.INFO)
    return main(epochs=args.epochs, out=args.out)


if __name__ == "__main__":
    cli()
