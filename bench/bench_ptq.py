"""Post-training quantization: evefx's calibrators and corrections against onnxruntime's
``quantize_static`` and torch.ao's PTQ, on the same float models and calibration images, in one run.

Float models (trained here on the embedded MNIST-5k training split, 4,000 images; Adam, lr 1e-3,
batch 128, ``--epochs`` epochs, seed 0; scored on the 1,000 held-out images):

* ``demo``: the seed tutorial's network (``examples.models:DemoNet``);
* ``resnet``: a small ResNet (stem conv + BN + ReLU, two basic blocks with identity / strided 1x1
  shortcuts, global pooling, linear);
* ``mbv2``: a small MobileNetV2-style network (inverted residual blocks: 1x1 expand, 3x3 depthwise,
  1x1 project, residual when shapes allow; ReLU instead of ReLU6, as Nagel et al. 2019 do for
  equalization).

Calibration: the first ``--calib`` training images (512), in batches of 64, for every row.

Rows (accuracy in percent; every quantized row's ONNX file is scored with onnxruntime, the evefx
rows also in PyTorch):

* ``ort {MinMax, Entropy, Percentile} S8S8``: ``quantize_static`` QDQ, per-channel int8 weights,
  int8 activations; ``ort MinMax U8S8``: uint8 activations;
* ``torch.ao x86``: ``prepare_fx``/``convert_fx`` with the x86 qconfig at W8A8 (scored in PyTorch);
* ``evefx <method> [+bc] [+eq] [+ada] <W/A>``: ``evefx.transform`` + ``evefx.post_training_quantize``
  with that calibration method, bias correction, cross-layer equalization and AdaRound, then
  ``evefx.export_onnx`` (parity with PyTorch is checked and reported; onnxruntime's u8s8 kernels on
  AVX2 machines without VNNI saturate with full 8-bit weight codes, DESIGN.md).

A last table: per-layer sensitivity of ``demo`` at W8A8 (weights lowered to 4 and 2 bits one layer
at a time), the Spearman rank correlation between the drop the weight SQNR predicts (lower SQNR,
larger drop) and the measured drop at 2 bits, and the accuracy of ``to_overrides(3.0)`` against
uniform 3-bit weights.

Run:
    .venv/bin/python bench/bench_ptq.py                 # everything (minutes)
    .venv/bin/python bench/bench_ptq.py --quick         # 5 epochs, 128 calibration images, fewer rows
    .venv/bin/python bench/bench_ptq.py --models demo --out out/ptq.json
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/

import evefx  # noqa: E402
from evefx.data import loaders, mnist5k  # noqa: E402
from evefx.errors import ExportError  # noqa: E402
from evefx.export import export_onnx, onnx_accuracy  # noqa: E402
from evefx.train import evaluate, fit  # noqa: E402

console = Console()


# ------------------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16, 2)
        self.layer2 = BasicBlock(16, 32, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.layer2(self.layer1(self.stem(x))))))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.residual else y


class SmallMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = InvertedResidual(16, 16, 1)
        self.block2 = InvertedResidual(16, 24, 2)
        self.block3 = InvertedResidual(24, 24, 1)
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(self.flatten(self.pool(x)))


def make_model(name: str) -> nn.Module:
    from examples.models import DemoNet

    torch.manual_seed(0)
    return {"demo": DemoNet, "resnet": SmallResNet, "mbv2": SmallMobileNetV2}[name]()


# -------------------------------------------------------------------------------------- specs
W8 = {"bits": 8, "granularity": "per_channel"}
W8T = {"bits": 8, "granularity": "per_tensor"}
W4 = {"bits": 4, "granularity": "per_channel"}
A8 = {"bits": 8, "symmetric": False, "signed": False}
A4 = {"bits": 4, "symmetric": False, "signed": False}


def evefx_rows(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """(label, quantize section) of every evefx row."""
    ada = {"iterations": 100 if quick else 1000, "samples": 128 if quick else 256}
    rows = [(f"evefx {m} W8A8", {"weight": W8, "activation": A8, "calibration": {"method": m}})
            for m in (("minmax", "entropy") if quick else ("minmax", "percentile", "mse", "entropy"))]
    rows += [
        ("evefx mse +bc W8A8", {"weight": W8, "activation": A8, "calibration": {"method": "mse"}, "bias_correction": True}),
        ("evefx minmax W8(tensor)A8", {"weight": W8T, "activation": A8}),
        ("evefx minmax +eq W8(tensor)A8", {"weight": W8T, "activation": A8, "equalize": True}),
        ("evefx mse W4A8", {"weight": W4, "activation": A8, "calibration": {"method": "mse", "weight_method": "mse"}}),
        ("evefx mse +ada +bc W4A8", {"weight": W4, "activation": A8, "calibration": {"method": "mse", "weight_method": "mse"},
                                     "adaround": ada, "bias_correction": True}),
        ("evefx mse +ada W4A4", {"weight": W4, "activation": A4, "calibration": {"method": "mse", "weight_method": "mse"},
                                 "adaround": ada}),
    ]
    if not quick:
        rows.insert(-2, ("evefx mse +eq +bc W4A8", {"weight": W4, "activation": A8, "equalize": True, "bias_correction": True,
                                                     "calibration": {"method": "mse", "weight_method": "mse"}}))
    return rows


# --------------------------------------------------------------------------------- baselines
class _Reader:
    def __init__(self, name: str, batches: list[torch.Tensor]):
        self.items = iter([{name: x.numpy()} for x in batches])

    def get_next(self):
        return next(self.items, None)


def ort_static(fp32: Path, out: Path, batches: list[torch.Tensor], method: str, activation: str) -> float:
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    start = time.perf_counter()
    quantize_static(str(pre), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return time.perf_counter() - start


def torch_ao(model: nn.Module, batches: list[torch.Tensor], test: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    import copy

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    m = copy.deepcopy(model).eval()
    start = time.perf_counter()
    prepared = prepare_fx(m, get_default_qconfig_mapping("x86"), (batches[0][:1],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    q = convert_fx(prepared)
    seconds = time.perf_counter() - start
    return evaluate(q, test)["accuracy"], seconds


# ------------------------------------------------------------------------------------- runner
def run_model(name: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    train, test = loaders(batch_size=128, seed=0)
    test_batches = [(x, y) for x, y in test]
    model = make_model(name)
    t = time.perf_counter()
    fit(model, train, epochs=args.epochs, lr=1e-3, seed=0, progress=False)
    model.eval()
    train_s = time.perf_counter() - t
    x_cal = mnist5k("train").tensors[0][: args.calib]
    calib = [x_cal[i:i + 64] for i in range(0, len(x_cal), 64)]
    rows: list[dict[str, Any]] = []
    float_acc = evaluate(model, test_batches)["accuracy"]
    rows.append({"model": name, "row": "float", "torch": float_acc, "onnx": None, "seconds": train_s, "parity": "-"})
    console.log(f"{name}: float {float_acc:.2f}% after {train_s:.0f} s of training")
    fp32 = tmp / f"{name}.fp32.onnx"
    export_onnx(model, x_cal[:1], fp32, check=False)
    ort_cfgs = [("MinMax", "QInt8"), ("Entropy", "QInt8"), ("Percentile", "QInt8"), ("MinMax", "QUInt8")]
    if args.quick:
        ort_cfgs = [("MinMax", "QInt8"), ("Entropy", "QInt8")]
    for method, act in ort_cfgs:
        out = tmp / f"{name}.ort.{method}.{act}.onnx"
        try:
            secs = ort_static(fp32, out, calib, method, act)
            acc = onnx_accuracy(out, test_batches)
        except Exception as e:  # a baseline failing is a result, not a crash
            console.log(f"{name}: ort {method} {act} failed: {e}")
            secs, acc = float("nan"), None
        label = f"ort {method} {'S8S8' if act == 'QInt8' else 'U8S8'}"
        rows.append({"model": name, "row": label, "torch": None, "onnx": acc, "seconds": secs, "parity": "-"})
        console.log(f"{name}: {label} {acc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            acc, secs = torch_ao(model, calib, test_batches)
        rows.append({"model": name, "row": "torch.ao x86 W8A8", "torch": acc, "onnx": None, "seconds": secs, "parity": "-"})
    except Exception as e:
        console.log(f"{name}: torch.ao failed: {e}")
    for label, section in evefx_rows(args.quick):
        try:
            rows.append(evefx_row(name, label, section, model, calib, test_batches, x_cal, tmp))
        except Exception as e:  # one failing row must not lose the others
            console.log(f"{name}: {label} failed: {type(e).__name__}: {e}")
            rows.append({"model": name, "row": label, "torch": None, "onnx": None, "seconds": float("nan"),
                         "parity": f"error: {type(e).__name__}"})
    if name == "demo" and not args.no_sensitivity:
        try:
            rows.append(sensitivity_row(model, calib, test_batches, x_cal))
        except Exception as e:
            console.log(f"sensitivity failed: {type(e).__name__}: {e}")
    return rows


def evefx_row(name: str, label: str, section: dict[str, Any], model: nn.Module, calib: list[torch.Tensor],
              test_batches: list[Any], x_cal: torch.Tensor, tmp: Path) -> dict[str, Any]:
    gm = evefx.transform(model, {"passes": [{"kind": "quantize", **section}]}, x_cal[:1])
    t = time.perf_counter()
    evefx.post_training_quantize(gm, calib, progress=False)
    secs = time.perf_counter() - t
    torch_acc = evaluate(gm, test_batches)["accuracy"]
    out = tmp / f"{name}.{label.replace(' ', '_').replace('+', '').replace('(', '').replace(')', '')}.onnx"
    parity = "passed"
    try:
        export_onnx(gm, x_cal[:1], out, real_inputs=calib[0])
    except ExportError as e:
        parity = "FAILED: " + str(e).split(";")[0].split(": ", 1)[-1][:60]
        export_onnx(gm, x_cal[:1], out, check=False)
    onnx_acc = onnx_accuracy(out, test_batches)
    console.log(f"{name}: {label} torch {torch_acc:.2f} onnx {onnx_acc:.2f} ({secs:.1f} s, parity {parity})")
    return {"model": name, "row": label, "torch": torch_acc, "onnx": onnx_acc, "seconds": secs, "parity": parity}


def _spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)).astype(float), np.argsort(np.argsort(b)).astype(float)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def sensitivity_row(model: nn.Module, calib: list[torch.Tensor], test: list[Any], x_cal: torch.Tensor) -> dict[str, Any]:
    gm = evefx.transform(model, {"passes": [{"kind": "quantize", "weight": W8, "activation": A8}]}, x_cal[:1])
    evefx.calibrate(gm, calib, progress=False)
    t = time.perf_counter()
    report = evefx.sensitivity(gm, lambda m: evaluate(m, test)["accuracy"], bits=(4, 3, 2), inputs=calib[0])
    secs = time.perf_counter() - t
    console.print(report)
    drops = [report.drop(layer, 2) for layer in report.layers]
    predicted = [-next(r.weight_sqnr for r in report.rows if r.layer == layer and r.bits == 2) for layer in report.layers]
    rho = _spearman(predicted, drops)
    overrides = report.to_overrides(3.0)

    def accuracy_of(section: dict[str, Any]) -> float:
        g = evefx.transform(model, {"passes": [{"kind": "quantize", "activation": A8, **section}]}, x_cal[:1])
        evefx.calibrate(g, calib, progress=False)
        return evaluate(g, test)["accuracy"]

    mixed = accuracy_of({"weight": W8, "overrides": list(overrides)})
    knap = accuracy_of({"weight": W8, "overrides": list(report.to_overrides(3.0, method="knapsack"))})
    uniform = accuracy_of({"weight": {"bits": 3, "granularity": "per_channel"}})
    alloc = report.allocate(3.0)
    console.log(f"sensitivity: spearman(SQNR, drop@2) = {rho:.2f}; to_overrides(3.0) {alloc} -> {mixed:.2f}% vs uniform W3 {uniform:.2f}%")
    return {"model": "demo", "row": "sensitivity", "spearman_sqnr_drop2": rho, "mixed_3bit": mixed, "knapsack_3bit": knap, "uniform_3bit": uniform,
            "allocation": alloc, "seconds": secs}


def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        name = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())
    except OSError:
        name = platform.processor()
    return f"{name}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["demo", "resnet", "mbv2"], choices=["demo", "resnet", "mbv2"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--calib", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="5 epochs, 128 calibration images, fewer rows")
    p.add_argument("--no-sensitivity", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="write the rows here (JSON)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: small ops do not wait on each other)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:  # one epoch (32 steps) left the float networks at 16-44 %: too weak to compare calibrators
        args.epochs, args.calib = 5, 128
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    console.log(machine())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += run_model(name, args, Path(tmp))
    table = Table(title=f"post-training quantization on MNIST-5k ({args.calib} calibration images, {args.epochs} epochs)")
    for col in ("model", "row", "PyTorch %", "onnxruntime %", "vs float", "seconds", "parity"):
        table.add_column(col, justify="left" if col in ("model", "row", "parity") else "right")
    floats = {r["model"]: r["torch"] for r in rows if r["row"] == "float"}
    for r in rows:
        if r["row"] == "sensitivity":
            continue
        best = r["onnx"] if r["onnx"] is not None else r["torch"]
        delta = "" if r["row"] == "float" or best is None else f"{best - floats[r['model']]:+.2f}"
        table.add_row(r["model"], r["row"], "-" if r["torch"] is None else f"{r['torch']:.2f}",
                      "-" if r["onnx"] is None else f"{r['onnx']:.2f}", delta, f"{r['seconds']:.2f}", r["parity"])
    console.print(table)
    for r in rows:
        if r["row"] == "sensitivity":
            console.print(f"sensitivity (demo): Spearman(-weight SQNR, drop @2 bits) = {r['spearman_sqnr_drop2']:.2f}; "
                          f"to_overrides(3.0 avg bits) greedy {r['mixed_3bit']:.2f}% / knapsack {r['knapsack_3bit']:.2f}% vs uniform 3-bit "
                          f"weights {r['uniform_3bit']:.2f}%")
    console.print(f"machine: {machine()}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
