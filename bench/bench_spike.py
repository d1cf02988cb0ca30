"""Training-step cost of evefx's spiking DemoNet against spikingjelly and snntorch, in one run.

The same network (``examples/models.py`` DemoNet: 3 conv-BN-LIF blocks, Linear-LIF, Linear),
LIF neurons (tau 2, threshold 1, hard reset to 0), ATan surrogate (alpha 2), the image repeated
at every step (direct encoding), the output averaged over T, batch 64 of 1x28x28, Adam, CPU with
2 threads. One step = zero_grad + forward + cross-entropy + backward + Adam step.

* evefx: ``evefx.transform(DemoNet(), spec)``: layers run once on the time-folded batch
  ``[T*B, ...]``, each neuron runs its recurrence in one fused autograd function; with direct
  encoding the first conv -> bn (same input every step) runs once on ``[B, ...]``.
* evefx_nohoist: the same, with the first conv -> bn run on ``[T*B, ...]`` like the others.
* spikingjelly (installed version): ``layer.*`` modules with ``step_mode='m'`` and
  ``neuron.LIFNode(step_mode='m')``; with a built-in surrogate its CPU path is a registered fused
  LIF op (the newest spikingjelly has no ``backend='torch'`` switch any more).
* snntorch: ``snn.Leaky`` (beta = 1 - 1/tau, reset to zero) with the usual per-step loop over the
  network (its LIF does not scale the input by 1/tau; the cost is what is compared).

Timing: the models run in interleaved rounds; the median step is reported. Memory: bytes of the
tensors autograd keeps between forward and backward (unique storages, counted with
``torch.autograd.graph.saved_tensors_hooks``): the activation memory of a training step, which
is what grows with T. Peak process memory on CPU is dominated by the allocator and not comparable.

Run (2-core CPU dev machine figures are in docs/spiking.md):
    .venv/bin/python bench/bench_spike.py            # T = 4, 8, 16, 32
    .venv/bin/python bench/bench_spike.py --quick    # smoke test
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
import evefx  # noqa: E402
from examples.models import DemoNet  # noqa: E402


def spec(T: int) -> dict:
    return {"passes": [{"kind": "spike", "timesteps": T, "encoder": "direct",
                        "neuron": {"type": "lif", "tau": 2.0, "threshold": 1.0, "reset": 0.0, "neuron_wise": False,
                                   "surrogate": {"name": "atan", "alpha": 2.0}}}]}


def evefx_net(base: nn.Module, T: int, hoist: bool = True) -> nn.Module:
    if hoist:
        return evefx.transform(base, spec(T), torch.zeros(1, 1, 28, 28))
    # the same pass with the time-invariant prefix (conv -> bn before the first neurons) run T times
    from evefx.passes import Sequential
    from evefx.passes.spike import SpikePass
    from evefx.pipeline import EveModule
    from evefx.trace import trace

    gm = trace(copy.deepcopy(base), cls=EveModule)
    gm = Sequential([SpikePass(evefx.load_spec(spec(T)).passes[0], "passes[0]", hoist=False)])(gm).graph_module
    gm.recompile()
    return gm


class SJNet(nn.Module):
    """DemoNet in spikingjelly's multi-step layers; input [B, ...] -> repeated -> mean over T."""

    def __init__(self, base: DemoNet, T: int):
        super().__init__()
        from spikingjelly.activation_based import layer, neuron, surrogate

        def lif():
            return neuron.LIFNode(tau=2.0, v_threshold=1.0, v_reset=0.0, surrogate_function=surrogate.ATan(alpha=2.0),
                                  step_mode="m")

        f, c = base.features, base.classifier
        blocks = []
        for i in (0, 3, 6):
            conv = layer.Conv2d(f[i].in_channels, f[i].out_channels, 3, stride=2, padding=1, step_mode="m")
            bn = layer.BatchNorm2d(f[i].out_channels, step_mode="m")
            conv.load_state_dict(f[i].state_dict())
            bn.load_state_dict(f[i + 1].state_dict())
            blocks += [conv, bn, lif()]
        fc1 = layer.Linear(256, 16, step_mode="m")
        fc2 = layer.Linear(16, 10, step_mode="m")
        fc1.load_state_dict(c[1].state_dict())
        fc2.load_state_dict(c[3].state_dict())
        self.net = nn.Sequential(*blocks, layer.Flatten(step_mode="m"), fc1, lif(), fc2)
        self.T = T

    def forward(self, x):
        from spikingjelly.activation_based import functional

        functional.reset_net(self.net)
        return self.net(x.unsqueeze(0).repeat(self.T, *([1] * x.dim()))).mean(0)


class SnnTorchNet(nn.Module):
    """DemoNet with snntorch Leaky neurons, stepped in a Python loop over T."""

    def __init__(self, base: DemoNet, T: int):
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate

        b = copy.deepcopy(base)
        self.convs = nn.ModuleList([nn.Sequential(b.features[i], b.features[i + 1]) for i in (0, 3, 6)])
        self.fc1, self.fc2 = b.classifier[1], b.classifier[3]
        self.lifs = nn.ModuleList([snn.Leaky(beta=0.5, threshold=1.0, spike_grad=surrogate.atan(alpha=2.0),
                                             reset_mechanism="zero") for _ in range(4)])
        self.T = T

    def forward(self, x):
        mems = [lif.init_leaky() for lif in self.lifs]
        out = 0
        for _ in range(self.T):
            h = x
            for i, conv in enumerate(self.convs):
                h, mems[i] = self.lifs[i](conv(h), mems[i])
            h, mems[3] = self.lifs[3](self.fc1(h.flatten(1)), mems[3])
            out = out + self.fc2(h)
        return out / self.T


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return time.perf_counter() - start

    return step


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after one forward (unique storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def bench(T: int, rounds: int, steps: int, batch: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    base = DemoNet().train()
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    models: dict[str, nn.Module] = {"evefx": evefx_net(base, T).train(),
                                    "evefx_nohoist": evefx_net(base, T, hoist=False).train()}
    try:
        models["spikingjelly"] = SJNet(base, T).train()
    except ImportError:
        warnings.warn("spikingjelly is not installed; skipped")
    try:
        models["snntorch"] = SnnTorchNet(base, T).train()
    except ImportError:
        warnings.warn("snntorch is not installed; skipped")
    with torch.no_grad():  # same start: the same outputs for evefx and spikingjelly
        if "spikingjelly" in models:
            diff = (models["evefx"](x) - models["spikingjelly"](x)).abs().max().item()
            if diff > 1e-4:
                warnings.warn(f"evefx and spikingjelly disagree by {diff:.2e} at T={T}")
    fns = {name: step_fn(m, x, y) for name, m in models.items()}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name] += [fn() for _ in range(steps)]
    return {name: {"ms": 1e3 * statistics.median(t), "saved_mb": saved_bytes(models[name], x) / 2**20}
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round at T=4 and 8 (smoke test)")
    parser.add_argument("--timesteps", type=int, nargs="*", default=[4, 8, 16, 32])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Ts = [4, 8] if args.quick else args.timesteps
    rounds, steps = (2, 3) if args.quick else (5, 6)
    print(f"training step, spiking DemoNet (LIF, ATan), batch {args.batch}, 1x28x28, CPU {args.threads} threads; "
          f"median of {rounds * steps} steps; ms per step, MB kept for backward, ratio = time / spikingjelly's")
    names = ["evefx", "evefx_nohoist", "spikingjelly", "snntorch"]
    print(f"{'T':>3} " + " ".join(f"{n + ' ms':>18}" for n in names) + " " + " ".join(f"{n + ' MB':>17}" for n in names)
          + f" {'evefx/sj':>9} {'nohoist/sj':>11} {'evefx/snntorch':>15}")
    nan = {"ms": float("nan"), "saved_mb": float("nan")}
    for T in Ts:
        r = bench(T, rounds, steps, args.batch)
        row = [r.get(n, nan) for n in names]
        sj, sn = r.get("spikingjelly", nan), r.get("snntorch", nan)
        print(f"{T:>3} " + " ".join(f"{v['ms']:>18.2f}" for v in row) + " " + " ".join(f"{v['saved_mb']:>17.2f}" for v in row)
              + f" {r['evefx']['ms'] / sj['ms']:>8.2f}x {r['evefx_nohoist']['ms'] / sj['ms']:>10.2f}x"
              f" {r['evefx']['ms'] / sn['ms']:>14.2f}x", flush=True)


if __name__ == "__main__":
    main()
