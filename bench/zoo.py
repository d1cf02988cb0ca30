"""Conformance zoo: every architecture family we claim, through every pass and the int8 export.

For each model: the float network is trained briefly on the embedded MNIST-5k (resized to the
model's input, grey replicated to 3 channels) so that BatchNorm statistics are settled and the
logits separate like a trained network's (ties would otherwise dominate top-1 agreement); then
each column runs on a copy and gives ``ok``, ``FAIL: reason`` or ``n/a: reason``:

* identity   ``passes: []`` computes the same as the model (allclose)
* w8a8       quantize with the spec defaults, calibrate on 8 training batches, export + parity
* w4a4_lsq   4-bit lsq weights and activations, calibrate, export + parity
* w8_pt_asym 8-bit per-tensor asymmetric weights, calibrate, export + parity
* spike_t4   LIF neurons, T=4: forward and backward, finite gradients
* prune50    50% of the channels (l1), prune_step, compact == masked (allclose), MACs before/after

Export + parity means :func:`evefx.export_onnx` on 256 held-out images: PyTorch vs the QDQ graph
(onnxruntime, optimizations off), the local integer kernels vs that graph, and the AVX2 u8s8
emulation (see :mod:`evefx.export.emulate`). The table goes to docs/zoo.md with the CPU it ran on.

Run: ``.venv/bin/python bench/zoo.py`` (all, ~20 min on 2 cores) or ``--models resnet18 mlp``
``--columns w8a8``; ``--quick`` trains fewer steps (what the test suite's subset uses).
"""
from __future__ import annotations

import argparse
import copy
import logging
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.export import calibrate, export_onnx  # noqa: E402

COLUMNS = ("identity", "w8a8", "w4a4_lsq", "w8_pt_asym", "spike_t4", "prune50", "prune50_w8a8")
QUICK_MODELS = ("seq_cnn", "user_cnn", "mlp", "resnet18", "mobilenet_v2", "shufflenet_v2", "squeezenet", "vit_small",
                "transformer_encoder")


# ----------------------------------------------------------------------------- user-style models
class SeqCNN(nn.Sequential):
    """The seed tutorial's network as users write it: nn.Sequential with nn.Flatten."""

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__(
            nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, classes),
        )


class UserCNN(nn.Module):
    """A class using torch.flatten and F.relu, with a residual sum and adaptive pooling."""

    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(channels, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.block = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(x + self.block(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(torch.flatten(x, 1))


class MLP(nn.Module):
    def __init__(self, channels: int = 3, classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * 32 * 32, 128), nn.ReLU(),
                                 nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.net(x)


class EncoderNet(nn.Module):
    """Patches -> nn.TransformerEncoder -> mean -> Linear."""

    def __init__(self, channels: int = 3, classes: int = 10, dim: int = 64):
        super().__init__()
        self.patch = nn.Conv2d(channels, dim, 8, stride=8)
        layer = nn.TransformerEncoderLayer(dim, 4, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.encoder(tokens).mean(1))


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        return getattr(tvm, name)(num_classes=10, **kw)
    return build


def _maxvit_64() -> nn.Module:
    """torchvision's maxvit_t configuration with 2x2 partitions: maxvit_t itself fixes 7x7 windows,
    which need a 224x224 input (every stage's map a multiple of 7), too slow to train here."""
    from torchvision.models.maxvit import MaxVit

    return MaxVit(input_size=(64, 64), stem_channels=64, partition_size=2, block_channels=[64, 128, 256, 512],
                  block_layers=[2, 2, 5, 2], head_dim=32, stochastic_depth_prob=0.2, num_classes=10)


def _resnet_small(groups: int = 1, width: int = 64) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, groups=groups, width_per_group=width)
    return build


def _vgg_small() -> nn.Module:
    from torchvision.models.vgg import VGG, cfgs, make_layers

    model = VGG(make_layers(cfgs["A"], batch_norm=True), num_classes=10, init_weights=True)
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Sequential(nn.Linear(512, 128), nn.ReLU(True), nn.Linear(128, 10))
    return model


def _densenet_small() -> nn.Module:
    from torchvision.models.densenet import DenseNet

    return DenseNet(growth_rate=12, block_config=(2, 2, 2), num_init_features=16, num_classes=10)


def _vit_small() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256,
                             num_classes=10)


@dataclass(frozen=True)
class Entry:
    build: Callable[[], nn.Module]
    shape: tuple[int, int, int]
    note: str = ""


MODELS: dict[str, Entry] = {
    "seq_cnn": Entry(SeqCNN, (3, 32, 32), "nn.Sequential with nn.Flatten"),
    "user_cnn": Entry(UserCNN, (3, 32, 32), "torch.flatten, F.relu, residual, adaptive pool"),
    "mlp": Entry(MLP, (3, 32, 32), "Flatten + 3 Linear"),
    "transformer_encoder": Entry(EncoderNet, (3, 32, 32), "nn.TransformerEncoder, 2 layers"),
    "resnet18": Entry(_tv("resnet18"), (3, 32, 32)),
    "resnext_small": Entry(_resnet_small(groups=32, width=4), (3, 32, 32), "ResNeXt Bottleneck [1,1,1,1], 32x4d"),
    "wide_resnet_small": Entry(_resnet_small(width=128), (3, 32, 32), "Wide ResNet Bottleneck [1,1,1,1], width 128"),
    "mobilenet_v2": Entry(_tv("mobilenet_v2"), (3, 32, 32)),
    "mobilenet_v3_small": Entry(_tv("mobilenet_v3_small"), (3, 32, 32)),
    "efficientnet_b0": Entry(_tv("efficientnet_b0"), (3, 32, 32)),
    "regnet_y_400mf": Entry(_tv("regnet_y_400mf"), (3, 32, 32)),
    "shufflenet_v2": Entry(_tv("shufflenet_v2_x0_5"), (3, 32, 32)),
    "squeezenet": Entry(_tv("squeezenet1_1"), (3, 32, 32)),
    "mnasnet": Entry(_tv("mnasnet0_5"), (3, 32, 32)),
    "densenet_small": Entry(_densenet_small, (3, 32, 32), "DenseNet growth 12, blocks (2,2,2)"),
    "googlenet": Entry(_tv("googlenet", aux_logits=False, init_weights=True), (3, 32, 32)),
    "inception_v3": Entry(_tv("inception_v3", aux_logits=False, init_weights=True), (3, 75, 75)),
    "vgg11_bn_small": Entry(_vgg_small, (3, 32, 32), "VGG-A features, 512-128-10 classifier"),
    "convnext_tiny": Entry(_tv("convnext_tiny"), (3, 32, 32)),
    "vit_small": Entry(_vit_small, (3, 32, 32), "image 32, patch 4, 4 layers, 4 heads, dim 128"),
    "swin_t": Entry(_tv("swin_t"), (3, 32, 32)),
    "maxvit_t": Entry(_maxvit_64, (3, 64, 64), "maxvit_t's blocks and widths, 2x2 windows/grid at 64x64"),
}


# ----------------------------------------------------------------------------- data and training
def _data(shape: tuple[int, int, int], split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from evefx.data import mnist5k

    ds = mnist5k(split)
    x, y = ds.tensors[0][:n], ds.tensors[1][:n]
    x = F.interpolate(x, size=shape[1:], mode="bilinear", align_corners=False)
    return (x.repeat(1, shape[0], 1, 1) - 0.13) / 0.31, y


def train_float(name: str, steps: int, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model trained ``steps`` Adam steps (batch 32, lr 1e-3) and its data: ``calib`` batches
    (training split) and ``x_test``/``y_test`` (256 held-out images)."""
    entry = MODELS[name]
    torch.manual_seed(seed)
    model = entry.build()
    x_train, y_train = _data(entry.shape, "train", 32 * max(steps, 8))
    x_test, y_test = _data(entry.shape, "test", 256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x_train.shape[0], (32,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, {"calib": x_train[:256], "x_test": x_test, "y_test": y_test}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- columns
def _spec(name: str, passes: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema_version": 1, "trace": {"input_shape": [1, *MODELS[name].shape]}, "passes": passes}


QUANT = {
    "w8a8": {"kind": "quantize", "select": {"types": ["Conv2d", "Linear"]}},
    "w4a4_lsq": {"kind": "quantize", "select": {"types": ["Conv2d", "Linear"]},
                 "weight": {"bits": 4, "fn": "lsq", "granularity": "per_channel", "tracker": "global"},
                 "activation": {"bits": 4, "fn": "lsq", "symmetric": False, "signed": False}},
    "w8_pt_asym": {"kind": "quantize", "select": {"types": ["Conv2d", "Linear"]},
                   "weight": {"bits": 8, "granularity": "per_tensor", "symmetric": False, "tracker": "global"}},
}


def run_column(name: str, column: str, model: nn.Module, data: dict[str, torch.Tensor], workdir: Path) -> str:
    """One cell: ``ok ...``, ``FAIL: ...`` or ``n/a: ...``."""
    x1 = data["x_test"][:1]
    if column == "identity":
        gm = evefx.transform(model, _spec(name, []), x1)
        with torch.no_grad():
            same = torch.allclose(gm(data["x_test"][:16]), model(data["x_test"][:16]), atol=1e-5, rtol=1e-4)
        return "ok" if same else "FAIL: outputs differ"
    if column in QUANT:
        gm = evefx.transform(model, _spec(name, [QUANT[column]]), x1)
        calibrate(gm, [data["calib"][i:i + 32] for i in range(0, 256, 32)])
        report = export_onnx(gm, x1, workdir / f"{name}_{column}.onnx", real_inputs=data["x_test"], kernels=False)
        p = report.parity
        acc = accuracy(gm, data["x_test"], data["y_test"])
        return f"ok (top-1 agree {p.top1_agreement:.1f}%, acc {acc:.1f})"
    if column == "spike_t4":
        spec = {"kind": "spike", "select": {"types": ["Conv2d", "Linear"]}, "exclude_last": True, "timesteps": 4,
                "encoder": "direct", "neuron": {"type": "lif"}}
        gm = evefx.transform(model, _spec(name, [spec]), x1).train()
        out = gm(data["x_test"][:4])
        out.float().sum().backward()
        grads = [p.grad for p in gm.parameters() if p.grad is not None]
        if not grads or not all(bool(torch.isfinite(g).all()) for g in grads):
            return "FAIL: no or non-finite gradients"
        return "ok"
    prune50 = {"kind": "prune", "select": {"types": ["Conv2d", "Linear"]}, "exclude_last": True, "ratio": 0.5,
               "criterion": "l1_norm"}
    if column == "prune50_w8a8":  # pruned, then quantized: the int8 file with the channels removed
        gm = evefx.transform(model, _spec(name, [prune50, QUANT["w8a8"]]), x1)
        calibrate(gm, [data["calib"][i:i + 32] for i in range(0, 256, 32)])
        evefx.prune_step(gm)
        report = export_onnx(gm, x1, workdir / f"{name}_{column}.onnx", real_inputs=data["x_test"], kernels=False)
        removed = report.rewrites.get("pruned_channels_removed", 0)
        return (f"ok (top-1 agree {report.parity.top1_agreement:.1f}%, {removed} channels removed, "
                f"{'masks as Mul' if not removed else 'compacted'})")
    if column == "prune50":
        spec = prune50
        gm = evefx.transform(model, _spec(name, [spec]), x1)
        evefx.prune_step(gm)
        small = evefx.compact(gm)
        gm.eval()
        with torch.no_grad():
            a, b = gm(data["x_test"][:8]), small.eval()(data["x_test"][:8])
        if not torch.allclose(a, b, atol=1e-4, rtol=1e-3):
            return "FAIL: compact differs from the masked model"
        before = sum(p.numel() for p in model.parameters())
        after = sum(p.numel() for p in small.parameters())
        return f"ok (params x{after / before:.2f})"
    raise ValueError(column)


def run_model(name: str, columns: tuple[str, ...], steps: int, workdir: Path) -> dict[str, str]:
    model, data = train_float(name, steps)
    row = {"float acc": f"{accuracy(model, data['x_test'], data['y_test']):.1f}"}
    for column in columns:
        try:
            row[column] = run_column(name, column, copy.deepcopy(model), data, workdir)
        except evefx.EvefxError as e:
            row[column] = "FAIL: " + str(e).splitlines()[0]
        except Exception as e:  # noqa: BLE001 - a crash is a finding: record it with its type
            logging.debug("%s/%s:\n%s", name, column, traceback.format_exc())
            row[column] = f"FAIL: {type(e).__name__}: " + (str(e).splitlines() or [""])[0]
    return row


def cpu_description() -> str:
    """CPU model and its int8-relevant flags (printed with every figure)."""
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from evefx.export.emulate import cpu_flags, local_cpu_class

    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"})
    return f"{model}; flags: {' '.join(flags) or 'none'}; class: {local_cpu_class()}"


def _short(cell: str, width: int = 90) -> str:
    cell = cell.replace("|", "/")
    return cell if len(cell) <= width else cell[: width - 1] + "…"


def markdown(rows: dict[str, dict[str, str]], columns: tuple[str, ...], header: str) -> str:
    names = ["float acc", *columns]
    lines = [header, "", "| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for model, row in rows.items():
        lines.append(f"| {model} | " + " | ".join(_short(row.get(c, "")) for c in names) + " |")
    passing = {c: sum(r.get(c, "").startswith("ok") for r in rows.values()) for c in columns}
    lines += ["", "Passing per column: " + ", ".join(f"{c} {n}/{len(rows)}" for c, n in passing.items())]
    return "\n".join(lines) + "\n"


def _header(steps: int, done: int, total: int) -> str:
    import onnxruntime

    partial = "" if done == total else f" Partial: {done} of {total} models measured so far."
    return (f"Measured by `python bench/zoo.py --steps {steps} --out docs/zoo.md` on {cpu_description()}; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}.{partial}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--columns", nargs="*", default=list(COLUMNS))
    ap.add_argument("--steps", type=int, default=60, help="float training steps per model (batch 32)")
    ap.add_argument("--quick", action="store_true", help="the test suite's subset, 20 steps")
    ap.add_argument("--out", default=None, help="write the markdown table here (e.g. docs/zoo.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    models = list(QUICK_MODELS) if args.quick else args.models
    steps = 20 if args.quick else args.steps
    columns = tuple(args.columns)
    print(f"CPU: {cpu_description()}", flush=True)
    rows: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            start = time.perf_counter()
            rows[name] = run_model(name, columns, steps, Path(tmp))
            print(f"{name} ({time.perf_counter() - start:.0f} s): " + "; ".join(f"{k}: {v}" for k, v in rows[name].items()),
                  flush=True)
            if args.out:  # after every model, so a long run that is stopped keeps what it measured
                Path(args.out).write_text(markdown(rows, columns, _header(steps, len(rows), len(models))))
    table = markdown(rows, columns, _header(steps, len(rows), len(models)))
    print(table)
    return 0 if all(not v.startswith("FAIL") for r in rows.values() for v in r.values()) else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
