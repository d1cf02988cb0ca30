"""Where learned quantization steps end after a short fine-tune of a realistic network, by ``scale_domain``.

Adam moves every parameter by about its learning rate per step whatever the gradient. A learned
per-channel weight step of a real network is about 1e-3, so at lr 1e-3 a step trained as itself
(``scale_domain: linear``) doubles or sinks to its floor within a few steps, while one trained as
its logarithm (``log``, an option) moves about 0.1% per step, and so does one trained as its
logarithm relative to the tracked range's step (``range``, an option), which also follows the
range. The anchor is the grid the tracked range gives (what ``round`` and PTQ use): this prints,
side by side for each domain, the learned steps as a multiple of that grid's step and the share
held at the floor (1/8 of it).

Network: torchvision ``mobilenet_v3_small`` (random weights, 10 classes), every conv/linear at 8 bits
with lsq weights and activations; 60 steps of Adam 1e-3 on random 64x64 images and labels (the
learned steps train after their 30 ``init_steps``). One torch thread; about 40 s.

Run:
    .venv/bin/python bench/bench_learned_steps.py
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evefx  # noqa: E402
from evefx.modules import Quantizer  # noqa: E402
from evefx.modules.quant_functions import affine_from_range  # noqa: E402
from bench.bench_recipes import cpu  # noqa: E402

STEPS, BATCH, SIZE = 60, 8, 64


def learned_steps(domain: str) -> dict[str, tuple[list[float], list[bool]]]:
    """Per role (weight / activation): each learned step over its range's step, and whether it is at the floor."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    spec = {"trace": {"input_shape": [2, 3, SIZE, SIZE]}, "passes": [{
        "kind": "quantize", "weight": {"bits": 8, "fn": "lsq", "scale_domain": domain},
        "activation": {"bits": 8, "scale_domain": domain}}]}
    gm = evefx.transform(model, spec).train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(BATCH, 3, SIZE, SIZE, generator=data), torch.randint(0, 10, (BATCH,), generator=data)
        loss = torch.nn.functional.cross_entropy(gm(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out: dict[str, tuple[list[float], list[bool]]] = {"weight": ([], []), "activation": ([], [])}
    for name, q in gm.named_modules():
        if isinstance(q, Quantizer) and q.learnable_scale and bool(q.initialized):
            floor = q._scale_floor()
            step = q.qparams()[0]  # floored: what the next forward and the export use
            grid = affine_from_range(q.range_min, q.range_max, *q.quant_range(), q.symmetric, q.signed)[0]
            ratios, floored = out["weight" if name.endswith("weight_quantizer") else "activation"]
            ratios += (step / grid).flatten().tolist()
            floored += (step <= floor * 1.0001).flatten().tolist()
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(f"machine: {cpu()}; torch {torch.__version__}, 1 thread")
    print(f"mobilenet_v3_small, W8A8 lsq, {STEPS} Adam steps at lr 1e-3: learned step / the range's step")
    print(f"{'scale_domain':<13}{'role':<12}{'steps':>7}{'median':>9}{'p90':>9}{'max':>9}{'at floor':>10}")
    for domain in ("linear", "log", "range"):
        for role, (ratios, floored) in learned_steps(domain).items():
            r = sorted(ratios)
            print(f"{domain:<13}{role:<12}{len(r):>7}{statistics.median(r):>8.2f}x{r[int(0.9 * len(r))]:>8.2f}x"
                  f"{r[-1]:>8.1f}x{100 * sum(floored) / len(r):>9.1f}%")


if __name__ == "__main__":
    main()
