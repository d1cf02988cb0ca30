"""Structured pruning at 50% of channels: evefx (prune pass + prune_step + compact) against torch-pruning.

For torchvision resnet18 (3x224x224) and a CIFAR-style resnet56 (3x32x32; 3 stages of 9 basic
blocks with 16/32/64 channels, 1x1-conv projection shortcuts), with l1-norm importance and scope
``layer`` and ``global``, the same run builds

* evefx: ``transform`` with ``{kind: prune, criterion: l1_norm, ratio: 0.5, scope: ...}``, one
  ``prune_step``, ``compact`` (which checks the compacted model against the masked one);
* torch-pruning: ``MetaPruner`` with ``MagnitudeImportance(p=1)``, the same ratio and scope, the
  classifier ignored (evefx's ``exclude_last``);

(with ``scope: global`` both remove half of all the channels, but they rank them differently:
torch-pruning by group-normalised weight magnitude, evefx by importance per parameter and MAC
removed), and reports parameters and MACs (both counted by ``torch_pruning.utils.count_ops_and_params``)
and the median CPU latency of one forward (batch 1, one thread, interleaved rounds) of the
unpruned, evefx-compacted and torch-pruning models, with ratios against the unpruned one.
``--zoo`` adds more torchvision architectures (concat, depthwise, squeeze-excite, shuffle) at
3x64x64, sizes only, to check that evefx's result is valid wherever torch-pruning's is.

Run:
    .venv/bin/python bench/bench_prune.py            # resnet18 + resnet56, both scopes
    .venv/bin/python bench/bench_prune.py --zoo      # and the architecture zoo
    .venv/bin/python bench/bench_prune.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
import torchvision
from torch import nn

import evefx
from evefx.channels import compact_report

log = logging.getLogger("bench_prune")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetCifar(nn.Module):
    """CIFAR ResNet of He et al. (depth 6n+2; n=9 gives resnet56), projection shortcuts."""

    def __init__(self, depth: int = 56, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def evefx_prune(model: nn.Module, x: torch.Tensor, scope: str) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    spec = {"passes": [{"kind": "prune", "criterion": "l1_norm", "ratio": 0.5, "scope": scope}]}
    gm = evefx.transform(model, spec, x)
    evefx.prune_step(gm)
    small = evefx.compact(gm)  # raises if the compacted model disagrees with the masked one
    return small.eval(), time.perf_counter() - start


def tp_prune(model: nn.Module, x: torch.Tensor, scope: str, last: nn.Module) -> tuple[nn.Module, float]:
    import torch_pruning as tp

    start = time.perf_counter()
    model = copy.deepcopy(model)
    last = dict(model.named_modules())[last]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
            global_pruning=scope == "global", ignored_layers=[last],
        )
        pruner.step()
    return model.eval(), time.perf_counter() - start


def size(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, x)
    return int(params), int(macs)


def latency(models: dict[str, nn.Module], x: torch.Tensor, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)
        for _ in range(rounds):
            for k, m in models.items():
                start = time.perf_counter()
                m(x)
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def valid(model: nn.Module, x: torch.Tensor, classes: int) -> bool:
    with torch.no_grad():
        out = model(x.expand(2, *x.shape[1:]).contiguous())
    return tuple(out.shape) == (2, classes) and bool(torch.isfinite(out).all())


def last_linear(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def run_main(quick: bool, rounds: int) -> None:
    from rich.console import Console
    from rich.table import Table

    torch.manual_seed(0)  # the same random weights in every run
    cases = [("resnet56", ResNetCifar(56 if not quick else 20), torch.randn(1, 3, 32, 32), 10),
             ("resnet18", torchvision.models.resnet18(), torch.randn(1, 3, 224 if not quick else 64, 224 if not quick else 64), 1000)]
    table = Table(title="50% of channels, l1-norm: evefx vs torch-pruning (2-core CPU dev machine)")
    for col in ("model", "scope", "method", "params", "x fewer", "MACs", "x fewer", "latency ms", "speed-up", "valid", "prune s"):
        table.add_column(col, justify="right")
    for name, model, x, classes in cases:
        torch.manual_seed(0)
        model = _randomise_bn(model)
        base_params, base_macs = size(model, x)
        for scope in ("layer", "global"):
            ev, ev_s = evefx_prune(model, x, scope)
            tpm, tp_s = tp_prune(model, x, scope, last_linear(model))
            lat = latency({"base": model, "evefx": ev, "tp": tpm}, x, rounds)
            rows = [("unpruned", model, 0.0, lat["base"]), ("evefx", ev, ev_s, lat["evefx"]), ("torch-pruning", tpm, tp_s, lat["tp"])]
            sizes = {}
            for method, m, secs, ms in rows:
                p, macs = size(m, x)
                sizes[method] = p
                table.add_row(name, scope, method, f"{p:,}", f"{base_params / p:.2f}", f"{macs / 1e6:,.1f}M",
                              f"{base_macs / macs:.2f}", f"{ms:.2f}", f"{lat['base'] / ms:.2f}",
                              "yes" if valid(m, x, classes) else "NO", f"{secs:.1f}" if secs else "")
            # evefx's own counter agrees with torch-pruning's on the compacted model
            rep = compact_report(ev)
            assert rep.params_after == sizes["evefx"], (rep.params_after, sizes["evefx"])
            print(f"{name}/{scope}: evefx params {sizes['evefx']:,} vs torch-pruning {sizes['torch-pruning']:,} "
                  f"(evefx/tp = {sizes['evefx'] / sizes['torch-pruning']:.3f})")
    Console(width=160).print(table)


def run_zoo() -> None:
    from rich.console import Console
    from rich.table import Table

    names = ["mobilenet_v2", "mobilenet_v3_small", "densenet121", "shufflenet_v2_x1_0", "efficientnet_b0",
             "regnet_x_400mf", "resnext50_32x4d", "vgg11_bn"]
    x = torch.randn(1, 3, 64, 64)
    table = Table(title="50% of channels (scope layer), torchvision zoo at 3x64x64 (2-core CPU dev machine)")
    for col in ("model", "params", "evefx", "x fewer", "torch-pruning", "x fewer", "evefx/tp params"):
        table.add_column(col, justify="right")
    for name in names:
        torch.manual_seed(0)
        model = _randomise_bn(getattr(torchvision.models, name)())
        base, _ = size(model, x)
        cells = []
        sizes = []
        for fn in (lambda: evefx_prune(model, x, "layer")[0], lambda: tp_prune(model, x, "layer", last_linear(model))[0]):
            try:
                m = fn()
                if not valid(m, x, 1000):
                    raise RuntimeError("invalid output")
                p, _ = size(m, x)
                cells += [f"{p:,}", f"{base / p:.2f}"]
                sizes.append(p)
            except Exception as e:  # a failure is a result here
                cells += [f"fails: {type(e).__name__}", ""]
                sizes.append(None)
                log.warning("%s: %s", name, e)
        ratio = f"{sizes[0] / sizes[1]:.3f}" if None not in sizes else ""
        table.add_row(name, f"{base:,}", *cells, ratio)
    Console(width=160).print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="resnet20 and resnet18 at 64x64, few rounds")
    ap.add_argument("--zoo", action="store_true", help="also prune more torchvision architectures (sizes only)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("evefx").setLevel(logging.ERROR)  # "no channel of layer X can be pruned" notes
    import torch_pruning

    print(f"torch {torch.__version__}, torch-pruning {torch_pruning.__version__}, threads {args.threads}")
    run_main(args.quick, 5 if args.quick else args.rounds)
    if args.zoo:
        run_zoo()


if __name__ == "__main__":
    main()
