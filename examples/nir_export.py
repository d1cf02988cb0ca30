"""The seed network (DemoNet) as LIF T=8 and IF T=8, exported to NIR and run by norse.

For each neuron type: train briefly on the embedded MNIST split (4,000 train / 1,000 test; the
recipe of ``examples/spiking.py``: Adam lr 5e-3, batch 64, threshold 0.5, hard reset to 0,
tau 2, per-channel thresholds, direct encoding, mean decoding), export with
``evefx.export_nir``, then load the file with norse's NIR importer (``norse.torch.from_nir``,
code evefx did not write) and run the held-out split through it, one sample at a time (NIR
shapes have no batch dimension), for T steps. Reported per network: NIR nodes, file size,
spike agreement with evefx per layer (fraction of equal neuron-steps), the largest output
difference, and held-out accuracy by evefx, by norse and by ``evefx.import_nir`` of the file.

Run:
    .venv/bin/python examples/nir_export.py                  # 3 epochs, the whole held-out split
    .venv/bin/python examples/nir_export.py --quick          # smoke test (a few steps, 16 samples)
Writes ``<out>/nir_export.json`` and the two ``.nir`` files.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
import evefx  # noqa: E402
from evefx.data import loaders  # noqa: E402
from evefx.export.nir import export_nir, import_nir, spike_traces  # noqa: E402
from evefx.train import evaluate, fit, seed_everything  # noqa: E402
from examples.models import DemoNet  # noqa: E402

T = 8
NEURON = {"threshold": 0.5, "reset": 0.0, "tau": 2.0, "neuron_wise": True, "surrogate": {"name": "atan", "alpha": 2.0, "relative": False}}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spec(kind: str) -> dict:
    return {"passes": [{"kind": "spike", "select": {"types": ["Conv2d", "Linear"]}, "exclude_last": True,
                        "timesteps": T, "encoder": "direct", "decoder": "mean", "neuron": {"type": kind, **NEURON}}]}


def run_norse(graph, dt: float, test, gm, limit: int) -> dict:
    """The held-out split through norse's import of the file, compared with evefx layer by layer."""
    import nir
    import norse.torch as norse
    from norse.torch.module.iaf import IAFCell
    from norse.torch.module.lif_box import LIFBoxCell

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = norse.from_nir(graph, dt=dt, ignore_warnings=True)
    current: dict[str, torch.Tensor] = {}
    for name, m in net.named_modules():
        if isinstance(m, (LIFBoxCell, IAFCell)):
            m.register_forward_hook(lambda _m, _i, o, name=name: current.__setitem__(name, o[0].detach()))
    neurons = [k for k, v in graph.nodes.items() if isinstance(v, (nir.LIF, nir.IF))]
    equal = {k: 0 for k in neurons}
    total = {k: 0 for k in neurons}
    correct = {"evefx": 0, "norse": 0, "import_nir": 0}
    same_prediction, max_diff, seen = 0, 0.0, 0
    back = import_nir(graph)
    start = time.perf_counter()
    for x, y in test:
        x, y = x[: limit - seen], y[: limit - seen]
        if not len(x):
            break
        steps = x.unsqueeze(0).expand(T, *x.shape)
        ours = spike_traces(gm, steps)
        theirs_out = []
        with torch.no_grad():
            for b in range(len(x)):
                state, outs, layer_steps = None, [], {k: [] for k in neurons}
                for t in range(T):
                    out, state = net(x[b], state)
                    outs.append(out)
                    for k in neurons:
                        layer_steps[k].append(current[k.replace(".", "_")])
                for k in neurons:
                    mine = ours[k][:, b]
                    equal[k] += int((torch.stack(layer_steps[k]) == mine).sum())
                    total[k] += mine.numel()
                theirs_out.append(torch.stack(outs))
        theirs = torch.stack(theirs_out, 1)  # [T, B, 10]
        max_diff = max(max_diff, float((theirs - ours["output"]).abs().max()))
        pred_evefx = ours["output"].mean(0).argmax(1)
        pred_norse = theirs.mean(0).argmax(1)
        pred_back = spike_traces(back, steps)["output"].mean(0).argmax(1)
        correct["evefx"] += int((pred_evefx == y).sum())
        correct["norse"] += int((pred_norse == y).sum())
        correct["import_nir"] += int((pred_back == y).sum())
        same_prediction += int((pred_evefx == pred_norse).sum())
        seen += len(x)
    return {"samples": seen, "seconds": time.perf_counter() - start,
            "agreement": {k: equal[k] / max(total[k], 1) for k in neurons},
            "neuron_steps": {k: total[k] for k in neurons},
            "accuracy": {k: v / max(seen, 1) for k, v in correct.items()},
            "same_prediction": same_prediction / max(seen, 1), "max_output_diff": max_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit", type=int, default=1000, help="held-out samples run by norse")
    ap.add_argument("--dt", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("out/nir"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    max_steps = 3 if args.quick else None
    limit = 16 if args.quick else args.limit
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=220)
    console.print(f"CPU: {cpu_model()} ({args.threads} torch threads); torch {torch.__version__}")
    results = []
    for kind in ("lif", "if"):
        seed_everything(0)
        train, test = loaders(batch_size=64, seed=0)
        gm = evefx.transform(DemoNet(), spec(kind), torch.zeros(1, 1, 28, 28))
        t0 = time.perf_counter()
        fit(gm, train, None, epochs=args.epochs, lr=5e-3, seed=0, progress=False, max_steps=max_steps)
        train_s = time.perf_counter() - t0
        gm.eval()
        acc = evaluate(gm, test)["accuracy"]
        path = args.out / f"demonet_{kind}_T{T}.nir"
        report = export_nir(gm, path, torch.zeros(1, 1, 28, 28), dt=args.dt)
        console.print(report.table())
        row = {"network": f"DemoNet {kind.upper()} T={T}", "epochs": args.epochs, "train_seconds": train_s,
               "evefx_accuracy_full_split": acc, "nodes": len(report.graph.nodes), "edges": len(report.graph.edges),
               "node_types": report.node_types(), "file_bytes": report.size_bytes, "dt": args.dt,
               **run_norse(report.graph, args.dt, test, gm, limit)}
        results.append(row)
    table = Table(title=f"NIR export of the seed network, run by norse (CPU: {cpu_model()})")
    for col in ("network", "NIR nodes", "file", "spike agreement per neuron layer", "max |out diff|",
                "acc evefx", "acc norse", "acc import_nir", "same prediction"):
        table.add_column(col)
    for r in results:
        agree = " / ".join(f"{v:.6f}" for v in r["agreement"].values())
        table.add_row(r["network"], str(r["nodes"]), f"{r['file_bytes'] / 1024:.1f} KiB", agree,
                      f"{r['max_output_diff']:.2e}", f"{r['accuracy']['evefx']:.4f}", f"{r['accuracy']['norse']:.4f}",
                      f"{r['accuracy']['import_nir']:.4f}", f"{r['same_prediction']:.4f}")
    console.print(table)
    (args.out / "nir_export.json").write_text(json.dumps({"cpu": cpu_model(), "threads": args.threads,
                                                          "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
