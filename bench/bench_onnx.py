"""int8 ONNX files from evefx against onnxruntime's own ``quantize_static``, in one run.

For torchvision resnet18 and mobilenet_v2 (random weights, 3x224x224), four files of the same
float model, timed side by side with onnxruntime on the CPU (2 intra-op threads), batch 1 and 8:

* ``fp32``: the float model (``evefx.export_onnx`` of the plain module);
* ``ort-int8``: ``onnxruntime.quantization.quantize_static`` of that file (QDQ, per channel, S8S8,
  MinMax calibration on the calibration batches), the anchor;
* ``ort-u8s8``: the same with uint8 activations (a second, x86-friendly onnxruntime file);
* ``evefx``: ``evefx.transform`` with a W8 (per channel, symmetric, int8) / A8 (per tensor,
  asymmetric, uint8) quantize section with ``quantize_inputs: true`` (the default: a quantizer
  wherever a conv/linear would read a float tensor: the model input, residual sums, the pooled
  features before the classifier, the placement of onnxruntime's ``quantize_static``), ranges
  calibrated on the same batches, exported with ``evefx.export_onnx`` (parity with PyTorch
  measured and printed);
* ``evefx-outputs``: the same with ``quantize_inputs: false`` (only conv/linear output blocks are
  quantized; the layers reading float tensors run as float convs).

Calibration data are random images (uniform in [0, 1], normalised with the ImageNet statistics);
the float model's BatchNorm statistics are first set from them (with random weights and default
statistics mobilenet_v2's activations vanish), and every file is made from that same float model.
Latency is the median over interleaved rounds (every file runs once per round, in turn).

A second part (``--demo``) trains the demo network (DemoNet on the embedded MNIST subset: 3 float
epochs, then 2 epochs of W8A8 QAT with ``examples/specs/demo.yaml``), exports it and compares the
held-out accuracy of PyTorch and onnxruntime.

A third part (``--int4``) measures packed 4-bit weights (``weight_storage: packed``, docs/export.md):

* Linear layers alone (the shapes of an MNIST MLP and of transformer blocks), batch 1 and 8: Q/DQ
  int4 + ``Gemm`` against ``MatMulNBits`` (accuracy level 0: float compute; level 4: int8 compute),
  next to fp32 and int8 QDQ, with each form's largest difference from the Q/DQ int4 graph in output
  steps: the measurement behind evefx's choice of ``MatMulNBits`` (level 0) for packed Linear layers;
* resnet18 (random weights, BatchNorm settled as above): fp32, evefx W8A8 (int8), uniform W4A8
  packed, and a mixed-precision W4/W3/W8 model (8-bit first conv and classifier, 3-bit layer4,
  4-bit elsewhere: 3.5 bits per weight on average) packed: file size, latency (also with
  onnxruntime's ``session.disable_quant_qdq``, which folds the weight dequantization into float
  weights when the session loads) and parity with PyTorch (op by op and end to end).

Run:
    .venv/bin/python bench/bench_onnx.py                  # latency and size, both models
    .venv/bin/python bench/bench_onnx.py --demo --models  # only the demo accuracy
    .venv/bin/python bench/bench_onnx.py --int4 --models  # only the packed 4-bit figures
    .venv/bin/python bench/bench_onnx.py --quick          # smoke test
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/

import evefx
from evefx.export import calibrate, check_parity, export_onnx
from evefx.export.emulate import cpu_flags
from evefx.export.parity import graph_parity
from evefx.graph import marked

SPEC = {"passes": [{"kind": "quantize",
                    "weight": {"bits": 8, "granularity": "per_channel", "symmetric": True, "signed": True,
                               "tracker": "global"},
                    "activation": {"bits": 8, "symmetric": False, "signed": False, "tracker": "global"},
                    "quantize_inputs": True}]}
# the same without input quantizers: only conv/linear output blocks are quantized
SPEC_OUTPUTS = {"passes": [{**SPEC["passes"][0], "quantize_inputs": False}]}
THREADS = 2
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, 224, 224, generator=g) - MEAN) / STD


def recalibrate_bn(model: torch.nn.Module, batches: list[torch.Tensor]) -> None:
    """Set BatchNorm statistics from the data: with random weights and default statistics the
    activations of a deep network shrink toward zero (mobilenet_v2's logits are ~1e-9), which no
    8-bit grid represents."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


class _Reader:
    def __init__(self, name: str, batches: list[torch.Tensor]):
        self.items = iter([{name: x.numpy()} for x in batches])

    def get_next(self):
        return next(self.items, None)


def ort_int8(fp32: Path, out: Path, batches: list[torch.Tensor], activation: str = "QInt8") -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    name = ort.InferenceSession(str(pre), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    quantize_static(str(pre), str(out), _Reader(name, batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def session(path: Path, fold_weights: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    if fold_weights:  # constant-fold weight DequantizeLinear nodes at load (no QDQ fusion either)
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def integer_kernels(path: Path) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        import onnx

        ops = [n.op_type for n in onnx.load(str(Path(tmp) / "opt.onnx")).graph.node]
    return sum(op.startswith("QLinear") or op in ("QGemm", "MatMulIntegerToFloat") for op in ops)


def time_files(files: dict[str, Path], batch: int, rounds: int, per_round: int,
               x: np.ndarray | None = None) -> dict[str, float]:
    """Median latency per file in ms; ``x``: the input (default: ``batch`` random 3x224x224 images)."""
    sessions = {k: session(p, fold_weights=k.endswith("(folded)")) for k, p in files.items()}
    x = images(batch, 123).numpy() if x is None else x
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(2):
            s.run(None, feeds[k])
    samples: dict[str, list[float]] = {k: [] for k in files}
    for _ in range(rounds):
        for k, s in sessions.items():
            start = time.perf_counter()
            for _ in range(per_round):
                s.run(None, feeds[k])
            samples[k].append((time.perf_counter() - start) / per_round)
    return {k: 1000 * statistics.median(v) for k, v in samples.items()}


def top1_agreement(files: dict[str, Path], ref: str, x: torch.Tensor) -> dict[str, float]:
    outs = {}
    for k, p in files.items():
        s = session(p)
        outs[k] = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    base = outs[ref].argmax(1)
    return {k: 100.0 * float((o.argmax(1) == base).mean()) for k, o in outs.items()}


def run_model(name: str, quick: bool, work: Path, console: Console) -> list[dict]:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    calib = [images(4 if quick else 8, i) for i in range(2 if quick else 8)]
    recalibrate_bn(model, calib)
    example = images(1, 99)
    files: dict[str, Path] = {}
    files["fp32"] = work / f"{name}_fp32.onnx"
    export_onnx(model, example, files["fp32"], check=False, kernels=False)
    files["ort-int8"] = work / f"{name}_ort_int8.onnx"
    ort_int8(files["fp32"], files["ort-int8"], calib)
    files["ort-u8s8"] = work / f"{name}_ort_u8s8.onnx"
    ort_int8(files["fp32"], files["ort-u8s8"], calib, "QUInt8")

    real = images(8 if quick else 32, 7)
    modules = {}
    for key, spec in (("evefx-outputs", SPEC_OUTPUTS), ("evefx", SPEC)):
        gm = evefx.transform(model, spec, example)
        calibrate(gm, calib)
        files[key] = work / f"{name}_{key.replace('-', '_')}.onnx"
        # check=False: parity is measured below and reported (a random-weight network amplifies the
        # one-step differences of ties, see the README), not enforced
        export_onnx(gm, example, files[key], check=False, kernels=False)
        modules[key] = gm
    for key, module in modules.items():
        par = check_parity(module, str(files[key]), [real])
        inputs = len(marked(module, "quantize", role="input"))
        console.print(f"{name} {key}: parity with PyTorch on {par.samples} images: {100 * par.within_tolerance:.1f}% of "
                      f"the logits within one output step, max {par.max_steps:.1f} steps, top-1 agreement "
                      f"{par.top1_agreement:.1f}% ({inputs} input quantizers)")

    agree = top1_agreement(files, "fp32", images(32, 5))
    kernels = {k: integer_kernels(p) for k, p in files.items()}
    rows = []
    for batch in (1, 8):
        rounds, per_round = (3, 2) if quick else ((15, 5) if batch == 1 else (11, 2))
        lat = time_files(files, batch, rounds, per_round)
        for k, p in files.items():
            rows.append({"model": name, "batch": batch, "file": k, "ms": lat[k], "bytes": p.stat().st_size,
                         "kernels": kernels[k], "top1_vs_fp32": agree[k], "lat_fp32": lat["fp32"],
                         "lat_ort": lat["ort-int8"], "size_fp32": files["fp32"].stat().st_size})
    return rows


def demo_accuracy(console: Console, work: Path) -> None:
    from evefx.data import loaders
    from evefx.export import onnx_accuracy
    from evefx.train import evaluate, fit, seed_everything
    from examples.models import DemoNet

    seed_everything(0)
    train, test = loaders(batch_size=128, seed=0)
    model = DemoNet()
    fit(model, train, test, epochs=3, lr=1e-3, progress=False)
    qat = evefx.transform(model, Path(__file__).parent.parent / "examples/specs/demo.yaml", torch.zeros(1, 1, 28, 28))
    fit(qat, train, test, epochs=2, lr=5e-4, progress=False)
    qat.eval()
    x_real = torch.cat([x for x, _ in test])
    report = export_onnx(qat, torch.zeros(1, 1, 28, 28), work / "demo.onnx", real_inputs=x_real)
    acc_torch = evaluate(qat, test)["accuracy"]
    acc_onnx = onnx_accuracy(work / "demo.onnx", test)
    console.print(report.table())
    console.print(f"DemoNet W8A8 QAT, held-out split ({len(x_real)} images): PyTorch {acc_torch:.2f}%  "
                  f"onnxruntime {acc_onnx:.2f}%  difference {abs(acc_torch - acc_onnx):.2f} points")


def cpu_line() -> str:
    """The CPU model and the flags that decide which integer kernels onnxruntime runs."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    flags = cpu_flags()
    return f"{model}, {os.cpu_count()} cores; " + " ".join(f"{f}{'+' if f in flags else '-'}" for f in wanted)


def _linear_file(path: Path, k: int, n: int, form: str, seed: int = 0) -> None:
    """One Linear layer between uint8 activation Q/DQ pairs, its 4-bit weights stored as ``form``:
    fp32, int8 (QDQ), int4 (Q/DQ INT4 + Gemm), nbits0 / nbits4 (MatMulNBits, accuracy level 0 / 4)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from evefx.export.packed import int4_tensor, matmulnbits_weights

    rng = np.random.default_rng(seed)
    codes = rng.integers(-8, 8, size=(n, k))
    scale = (rng.random(n) * 0.01 + 0.01).astype(np.float32)
    bias = (rng.standard_normal(n) * 0.1).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    opsets = [helper.make_opsetid("", 21)]
    if form == "fp32":
        nodes = [helper.make_node("Gemm", ["x", "wf", "b"], ["y"], transB=1)]
        inits.append(numpy_helper.from_array((codes * scale[:, None]).astype(np.float32), "wf"))
    elif form in ("int8", "int4"):
        w = numpy_helper.from_array(codes.astype(np.int8), "w") if form == "int8" else int4_tensor(codes, True, "w")
        z = numpy_helper.from_array(np.zeros(n, np.int8), "z") if form == "int8" else int4_tensor(np.zeros(n), True, "z")
        inits += [w, numpy_helper.from_array(scale, "s"), z]
        nodes += [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=0),
                  helper.make_node("Gemm", ["xd", "wf", "b"], ["y"], transB=1)]
    else:
        b, _, block = matmulnbits_weights(codes, np.zeros(n), True)
        inits += [numpy_helper.from_array(b, "w"), numpy_helper.from_array(np.repeat(scale, b.shape[1]), "s")]
        nodes.append(helper.make_node("MatMulNBits", ["xd", "w", "s", "", "", "b"], ["y"], domain="com.microsoft", K=k,
                                      N=n, bits=4, block_size=block, accuracy_level=int(form[-1])))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    nodes += [helper.make_node("QuantizeLinear", ["y", "xs", "xz"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "xs", "xz"], ["out"])]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def linear_forms(console: Console, work: Path, quick: bool) -> None:
    """Latency of the forms of one packed Linear layer, and their difference from the Q/DQ int4 graph."""
    from evefx.export.parity import ort_session

    forms = ("fp32", "int8", "int4", "nbits0", "nbits4")
    table = Table(title=f"One Linear layer, 4-bit weights: median latency in microseconds ({THREADS} threads); "
                        f"in brackets the largest difference from the Q/DQ int4 graph, in output steps (256 inputs)")
    for col in ("K x N", "batch", *forms):
        table.add_column(col, justify="right")
    shapes = [(784, 256), (1024, 1024)] if quick else [(512, 10), (784, 256), (1024, 1024), (4096, 1024)]
    for k, n in shapes:
        paths = {f: work / f"linear_{k}_{n}_{f}.onnx" for f in forms}
        for f, p in paths.items():
            _linear_file(p, k, n, f)
        x = (np.random.default_rng(1).standard_normal((256, k)) * 2).astype(np.float32)
        ref = ort_session(str(paths["int4"]), optimize=False).run(None, {"x": x})[0]
        steps = {f: float(np.abs(session(p).run(None, {"x": x})[0] - ref).max()) / 0.05 for f, p in paths.items()}
        for batch in (1, 8):
            xb = {"x": x[:batch]}
            lat = {}
            for f, p in paths.items():
                s = session(p)
                s.run(None, xb)
                times = []
                for _ in range(20 if quick else 100):
                    start = time.perf_counter()
                    s.run(None, xb)
                    times.append(time.perf_counter() - start)
                lat[f] = 1e6 * statistics.median(times)
            table.add_row(f"{k} x {n}", str(batch), *(f"{lat[f]:.0f} [{steps[f]:.0f}]" for f in forms))
    console.print(table)


def mixed_overrides() -> list[dict]:
    """The mixed-precision resnet18: 8-bit stem and classifier, 3-bit layer4, 4 bits elsewhere."""
    return [{"names": ["conv1", "fc"], "weight": {"bits": 8}}, {"names": ["layer4.*"], "weight": {"bits": 3}}]


def run_int4(quick: bool, work: Path, console: Console) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    calib = [images(4 if quick else 8, i) for i in range(2 if quick else 8)]
    recalibrate_bn(model, calib)
    example = images(1, 99)
    w4 = {"passes": [{**SPEC["passes"][0], "weight": {**SPEC["passes"][0]["weight"], "bits": 4},
                      "weight_storage": "packed"}]}
    mixed = {"passes": [{**w4["passes"][0], "overrides": mixed_overrides()}]}
    files: dict[str, Path] = {"fp32": work / "r18_fp32.onnx"}
    export_onnx(model, example, files["fp32"], check=False, kernels=False)
    real = images(8 if quick else 32, 7)
    for key, spec in (("evefx int8", SPEC), ("W4A8 packed", w4), ("mixed packed", mixed)):
        gm = evefx.transform(model, spec, example)
        calibrate(gm, calib)
        files[key] = work / f"r18_{key.replace(' ', '_')}.onnx"
        report = export_onnx(gm, example, files[key], check=False, kernels=False)
        if key != "evefx int8":
            graph = graph_parity(gm, str(files[key]), [real])
            e2e = check_parity(gm, str(files[key]), [real])
            bits = {n: b["weight"] for n, b in report.bits.items() if b.get("weight")}
            params = {n: gm.get_submodule(n).weight.numel() for n in bits}
            avg = sum(bits[n] * params[n] for n in bits) / sum(params.values())
            forms = sorted({w["form"] for w in report.weights.values()})
            console.print(f"resnet18 {key}: {avg:.2f} bits per weight on average, weights stored as {', '.join(forms)}; "
                          f"op by op (graph vs PyTorch): {'passed' if graph.passed else 'FAILED'}, max {graph.max_steps:.2f} "
                          f"steps; end to end on {e2e.samples} images: {100 * e2e.within_tolerance:.1f}% of the logits within "
                          f"one step, max {e2e.max_steps:.1f} steps, top-1 agreement {e2e.top1_agreement:.1f}%")
            files[f"{key} (folded)"] = files[key]
    table = Table(title=f"resnet18, packed 4-bit weights, onnxruntime {ort.__version__}, {THREADS} threads (median latency)")
    for col in ("batch", "file", "ms", "latency / fp32", "latency / int8", "MB", "size / fp32"):
        table.add_column(col, justify="right")
    fp32_size = files["fp32"].stat().st_size
    for batch in (1, 8):
        rounds, per_round = (3, 1) if quick else ((9, 3) if batch == 1 else (7, 1))
        lat = time_files(files, batch, rounds, per_round)
        for k, p in files.items():
            size = p.stat().st_size
            table.add_row(str(batch), k, f"{lat[k]:.2f}", f"{lat[k] / lat['fp32']:.2f}", f"{lat[k] / lat['evefx int8']:.2f}",
                          f"{size / 1e6:.2f}", f"{size / fp32_size:.3f}")
    console.print(table)
    console.print("(folded): the same file, run with session.disable_quant_qdq=1: onnxruntime dequantizes the weights "
                  "once when the session loads and runs float kernels")


def run_searched(run_dir: Path, work: Path, console: Console, epochs: int = 2) -> None:
    """The searched mixed-precision DemoNet as the user deploys it: ``run_dir/best.yaml`` (what
    ``evefx search`` wrote) with the weights it configured (``run_dir/best.pt``), fine-tuned
    ``epochs`` on the training images, then exported with int8 weight codes, with packed storage
    (<= 4-bit layers as INT4/UINT4 or MatMulNBits) and as fp32 (the float network the search
    started from): size, latency, parity and held-out accuracy in onnxruntime."""
    from evefx.data import loaders
    from evefx.export import onnx_accuracy
    from evefx.spec import load_spec
    from evefx.train import evaluate, fit
    from examples.models import DemoNet

    spec = load_spec(run_dir / "best.yaml").model_dump(mode="json", exclude_none=True)
    spec.pop("search", None)
    example = torch.zeros(1, 1, 28, 28)
    train, test = loaders(batch_size=128, seed=0)
    gm = evefx.transform(DemoNet(), spec, example)
    gm.load_state_dict(torch.load(run_dir / "best.pt"))
    fit(gm, train, None, epochs=epochs, lr=1e-3, seed=0, progress=False)
    gm.eval()
    x_real = torch.cat([x for x, _ in test])
    packed = {**spec, "passes": [{**p, "weight_storage": "packed"} if p["kind"] == "quantize" else p for p in spec["passes"]]}
    gm_packed = evefx.transform(DemoNet(), packed, example)
    gm_packed.load_state_dict(gm.state_dict())
    gm_packed.eval()
    files = {"int8 codes": work / "searched_int8.onnx", "packed": work / "searched_packed.onnx"}
    reports = {k: export_onnx(m, example, files[k], real_inputs=x_real) for k, m in (("int8 codes", gm), ("packed", gm_packed))}
    float_net = DemoNet()
    float_net.load_state_dict({k: v for k, v in gm.state_dict().items() if k in float_net.state_dict()}, strict=False)
    files["fp32 (same layers)"] = work / "searched_fp32.onnx"
    export_onnx(float_net.eval(), example, files["fp32 (same layers)"], check=False, kernels=False)
    bits = {n: b["weight"] for n, b in reports["packed"].bits.items() if b.get("weight")}
    params = {n: gm.get_submodule(n).weight.numel() for n in bits}
    avg = sum(bits[n] * params[n] for n in bits) / sum(params.values())
    forms = sorted({w["form"] for w in reports["packed"].weights.values()})
    console.print(f"searched DemoNet ({run_dir / 'best.yaml'}): weight bits {bits}, {avg:.2f} bits per weight on average; "
                  f"packed weights stored as {', '.join(forms)}")
    acc_torch = evaluate(gm, test)["accuracy"]
    for k, r in reports.items():
        console.print(f"  {k}: checks {'passed' if r.passed else 'FAILED ' + ', '.join(r.failing)} ({r.parity.samples} held-out "
                      f"images, {100 * r.parity.within_tolerance:.1f}% of the logits within one step, top-1 agreement "
                      f"{r.parity.top1_agreement:.1f}%), weight bytes {sum(w['bytes'] for w in r.weights.values())}; "
                      f"accuracy PyTorch {acc_torch:.2f}%, onnxruntime {onnx_accuracy(files[k], test):.2f}%")
    fp32_size = files["fp32 (same layers)"].stat().st_size
    table = Table(title=f"searched DemoNet, onnxruntime {ort.__version__}, {THREADS} threads (median latency)")
    for col in ("batch", "file", "ms", "latency / int8 codes", "bytes", "size / fp32"):
        table.add_column(col, justify="right")
    for batch in (1, 8):
        lat = time_files(files, batch, 9, 20, x_real[:batch].numpy())
        for k, p in files.items():
            table.add_row(str(batch), k, f"{lat[k]:.3f}", f"{lat[k] / lat['int8 codes']:.2f}", str(p.stat().st_size),
                          f"{p.stat().st_size / fp32_size:.3f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--demo", action="store_true", help="also train and export the demo network")
    parser.add_argument("--int4", action="store_true", help="also measure packed 4-bit weights (Linear forms, resnet18)")
    parser.add_argument("--searched", type=Path, metavar="RUN_DIR",
                        help="also deploy the searched DemoNet of an `evefx search` run folder (best.yaml, start.pt)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    console = Console(width=150)
    console.print(f"CPU: {cpu_line()}")
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.demo:
            demo_accuracy(console, Path(tmp))
        if args.int4:
            linear_forms(console, Path(tmp), args.quick)
            run_int4(args.quick, Path(tmp), console)
        if args.searched:
            run_searched(args.searched, Path(tmp), console)
        for name in args.models:
            rows += run_model(name, args.quick, Path(tmp), console)
    if not rows:
        return
    table = Table(title=f"ONNX int8 on CPU, onnxruntime {ort.__version__}, {THREADS} threads (median latency)")
    for col in ("model", "batch", "file", "ms", "speedup vs fp32", "latency / ort-int8", "MB", "size / fp32",
                "integer kernels", "top-1 = fp32"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], str(r["batch"]), r["file"], f"{r['ms']:.2f}", f"{r['lat_fp32'] / r['ms']:.2f}",
                      f"{r['ms'] / r['lat_ort']:.2f}", f"{r['bytes'] / 1e6:.2f}", f"{r['bytes'] / r['size_fp32']:.3f}",
                      str(r["kernels"]), f"{r['top1_vs_fp32']:.0f}%")
    console.print(table)


if __name__ == "__main__":
    main()
