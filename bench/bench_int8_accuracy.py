"""int8 files against PyTorch after W8A8 QAT: accuracy, top-1 agreement, and what other CPUs compute.

For the demo network and the seed tutorial's network written as users write it (``nn.Sequential``
with ``nn.Flatten``): float training (Adam 1e-3, batch 128, ``--epochs``), then W8A8 QAT with the
spec defaults (``target: portable``) for ``--qat-epochs``, on the embedded MNIST-5k training split;
export with parity on the 1,000 held-out images. Per seed: PyTorch and onnxruntime accuracy, top-1
agreement, the op-by-op graph check, and the AVX2 u8s8 emulation (saturated pairs), printed with
the CPU it ran on. The same files are right on the other CPU class when the emulation finds no
saturation: that is the figure a VNNI machine cannot measure directly.

Run: ``.venv/bin/python bench/bench_int8_accuracy.py --seeds 3``
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from bench.zoo import cpu_description  # noqa: E402
from evefx.data import mnist5k  # noqa: E402
from evefx.export import export_onnx, onnx_accuracy  # noqa: E402
from examples.models import DemoNet  # noqa: E402


def seed_cnn() -> nn.Module:
    """The seed tutorial's network (convs 4/8/16, linear 16) as nn.Sequential with nn.Flatten."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 10),
    )


MODELS = {"demo_net": DemoNet, "seed_cnn": seed_cnn}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=g).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def run(name: str, seed: int, epochs: int, qat_epochs: int, work: Path) -> dict[str, float]:
    x, y = mnist5k("train").tensors
    xt, yt = mnist5k("test").tensors
    torch.manual_seed(seed)
    model = train(MODELS[name](), x, y, epochs, seed)
    gm = evefx.transform(model, {"schema_version": 1, "passes": [{"kind": "quantize"}]}, x[:1])
    train(gm, x, y, qat_epochs, seed + 100)
    report = export_onnx(gm, x[:1], work / f"{name}_{seed}.onnx", real_inputs=xt, kernels=False)
    loader = [(xt[i:i + 256], yt[i:i + 256]) for i in range(0, xt.shape[0], 256)]
    return {
        "float": accuracy(model, xt, yt),
        "pytorch": accuracy(gm, xt, yt),
        "onnx": onnx_accuracy(report.path, loader),
        "agree": report.parity.top1_agreement or 0.0,
        "graph_ok": float(report.graph.passed),
        "saturated_pairs": float(sum(r.pairs_saturated for r in report.avx2_u8s8)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"CPU: {cpu_description()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows = [run(name, s, args.epochs, args.qat_epochs, Path(tmp)) for s in range(args.seeds)]
            for s, r in enumerate(rows):
                print(f"{name} seed {s}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)

            def ms(key: str) -> str:
                vals = [r[key] for r in rows]
                return f"{statistics.mean(vals):.2f} +- {statistics.pstdev(vals):.2f}"

            gap = max(abs(r["pytorch"] - r["onnx"]) for r in rows)
            print(f"{name}: float {ms('float')}, W8A8 PyTorch {ms('pytorch')}, onnxruntime {ms('onnx')} "
                  f"(largest gap {gap:.2f} points), top-1 agreement {ms('agree')}%, graph check passed "
                  f"{int(sum(r['graph_ok'] for r in rows))}/{len(rows)}, AVX2 saturated pairs "
                  f"{int(sum(r['saturated_pairs'] for r in rows))}", flush=True)


if __name__ == "__main__":
    main()
