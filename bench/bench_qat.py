"""QAT cost of evefx's quantize pass against the float model and torch.ao, in one run.

(a) training-step time of torchvision resnet18 (batch 16, 3x112x112, SGD): float, evefx
    W8 per-channel / A8 (``round``, the quantize section's defaults), torch.ao ``prepare_qat_fx``
    with the default x86 QAT qconfig, and evefx with ``lsq`` on both sides; the models are timed
    in interleaved rounds and the median step is reported.
(b) time to build the QAT model of resnet50: ``evefx.transform`` vs ``prepare_qat_fx``.

Run:
    .venv/bin/python bench/bench_qat.py            # full
    .venv/bin/python bench/bench_qat.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torchvision
from torch import nn

import evefx

SPEC = {"passes": [{"kind": "quantize",
                    "weight": {"bits": 8, "granularity": "per_channel", "tracker": "global"},
                    "activation": {"bits": 8, "symmetric": False, "signed": False, "tracker": "average"}}]}
# the same with learned step sizes on both sides (not a target: for the record)
SPEC_LSQ = {"passes": [{"kind": "quantize",
                        "weight": {"bits": 8, "fn": "lsq", "granularity": "per_channel"},
                        "activation": {"bits": 8, "fn": "lsq", "symmetric": False, "signed": False}}]}


def torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (example,))


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def bench_step(rounds: int, steps: int, batch: int, size: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None).train()
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 1000, (batch,))
    models = {
        "float": copy.deepcopy(base),
        "evefx W8A8": evefx.transform(base, SPEC, x[:1]).train(),
        "torch.ao QAT": torch_ao_qat(copy.deepcopy(base), x[:1]).train(),
        "evefx W8A8 lsq": evefx.transform(base, SPEC_LSQ, x[:1]).train(),
    }
    steps_of = {name: step_fn(m, x, y) for name, m in models.items()}
    for fn in steps_of.values():  # warm-up: allocator, observers' first batch
        for _ in range(2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in steps_of.items():
            times[name] += [fn() for _ in range(steps)]
    return {name: statistics.median(t) for name, t in times.items()}


def bench_transform(repeats: int) -> dict[str, float]:
    x = torch.rand(1, 3, 224, 224)
    out: dict[str, list[float]] = {"evefx.transform": [], "evefx.transform (no example input)": [], "torch.ao prepare_qat_fx": []}
    for _ in range(repeats):
        for name in out:
            torch.manual_seed(0)
            model = torchvision.models.resnet50(weights=None).train()
            start = time.perf_counter()
            if name == "evefx.transform":
                evefx.transform(model, SPEC, x)
            elif name.startswith("evefx"):
                evefx.transform(model, SPEC)
            else:
                torch_ao_qat(model, x)
            out[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, for a smoke test")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, steps, repeats = (1, 2, 1) if args.quick else (5, 4, 3)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    step = bench_step(rounds, steps, batch=16, size=112)
    print("\n(a) resnet18 QAT training step, batch 16, 3x112x112 (median seconds)")
    for name, t in step.items():
        print(f"  {name:<16} {t * 1000:8.1f} ms   x{t / step['float']:.2f} float")
    ratio_ao = step["evefx W8A8"] / step["torch.ao QAT"]
    print(f"  evefx / torch.ao = {ratio_ao:.2f}   (target: evefx <= 1.3x float and < torch.ao)")

    tr = bench_transform(repeats)
    print("\n(b) building the QAT model of resnet50 (best of runs, seconds)")
    for name, t in tr.items():
        print(f"  {name:<36} {t:7.3f} s   x{t / tr['torch.ao prepare_qat_fx']:.2f} torch.ao")


if __name__ == "__main__":
    main()
