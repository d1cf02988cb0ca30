"""The quantize pass on the demo net and on torchvision resnet18: changes, folding, idempotency,
computation preserved with quantization off, mixed precision, eve parameters, errors."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

import evefx
from evefx.errors import PlanError, QuantizationError
from evefx.graph import marked, module_of
from evefx.modules.quant_layers import QUANT_LAYER_TYPES
from evefx.modules import QuantConv2d, Quantizer, QuantLinear
from evefx.modules.quant_functions import affine_from_range
from evefx.passes.quantize import QuantizePass, quant_summary
from evefx.train import extra_losses

W8A8 = {"passes": [{"kind": "quantize"}]}
DEMO_LAYERS = ["features.0", "features.3", "features.6", "classifier.1", "classifier.3"]


def _bn_modules(gm):
    return [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)]


def test_demo_net_changes_and_graph(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch)
    # 4 activation quantizers (the logits stay float: quantize_output false) and one input
    # quantizer (features.0 reads the network input)
    assert gm.report.counts() == {"replaced": 5, "folded": 3, "inserted": 5}
    folded = [c.target for c in gm.report.changes if c.action == "folded"]
    assert folded == ["features.1", "features.4", "features.7"]
    # BN nodes are gone from the graph; the BN modules now live inside the quantized convs
    assert not any(n.op == "call_module" and isinstance(module_of(gm, n), nn.BatchNorm2d) for n in gm.graph.nodes)
    assert all(isinstance(gm.get_submodule(f"features.{i}").bn, nn.BatchNorm2d) for i in (0, 3, 6))
    assert isinstance(gm.get_submodule("classifier.1"), QuantLinear)
    assert [n.meta["evefx"]["layer"] for n in marked(gm, "quantize", role="weight")] == DEMO_LAYERS
    acts = marked(gm, "quantize", role="activation")
    assert [n.meta["evefx"]["layer"] for n in acts] == DEMO_LAYERS[:-1]
    # the activation quantizer sits after conv -> relu (BN folded away)
    first = acts[0]
    assert first.args[0].target == "features.2" and first.args[0].args[0].target == "features.0"
    assert all(n.meta["evefx"]["spec_path"] == "passes[0]" for n in acts)
    out = gm(mnist_batch)
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_the_network_output_is_quantized_only_when_asked(demo_net, mnist_batch):
    """quantize_output: false (default) leaves the logits float, as NNCF, brevitas and onnxruntime do;
    true puts the last layer's activation quantizer back (2 bits: 4 levels for 10 logits)."""
    spec = {"passes": [{"kind": "quantize", "activation": {"bits": 2}}]}
    plain = evefx.transform(demo_net, spec, mnist_batch).eval()
    asked = evefx.transform(demo_net, {"passes": [{**spec["passes"][0], "quantize_output": True}]}, mnist_batch).eval()
    layers = [[n.meta["evefx"]["layer"] for n in marked(g, "quantize", role="activation")] for g in (plain, asked)]
    assert layers == [DEMO_LAYERS[:-1], DEMO_LAYERS]
    assert plain(mnist_batch).unique().numel() > 4 * 4  # float logits
    assert all(row.unique().numel() <= 4 for row in asked(mnist_batch))  # on a 2-bit grid
    # a layer returned through a flatten is the output too; one whose value also feeds a layer is not last
    seq = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Flatten())
    gm = evefx.transform(seq, {"passes": [{"kind": "quantize"}]}, torch.rand(2, 6))
    assert [n.meta["evefx"]["layer"] for n in marked(gm, "quantize", role="activation")] == ["0"]


def test_quantization_off_equals_original_eval_and_train(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch)
    quantized = gm(mnist_batch)
    assert not torch.allclose(quantized, demo_net(mnist_batch), atol=1e-6)
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch), atol=1e-5)
    ref = copy.deepcopy(demo_net).train()
    gm.train()
    assert torch.allclose(gm(mnist_batch), ref(mnist_batch), atol=1e-5)
    assert torch.allclose(gm.get_submodule("features.0").bn.running_mean, ref.features[1].running_mean, atol=1e-6)
    evefx.set_mode(gm, quantized=True)
    assert all(q.enabled for q in gm.modules() if isinstance(q, Quantizer))


def test_eight_bit_model_is_close_to_float(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch)
    # eval mode: the ranges calibrate on this first batch (a train step would also move BN statistics)
    ref = demo_net(mnist_batch).detach()
    err = (gm(mnist_batch) - ref).abs().max().detach()
    assert float(err) < 0.05 * float(ref.abs().max())


def test_idempotent_and_nothing_to_do(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch)
    again = evefx.transform(gm, W8A8, mnist_batch)
    assert not again.report.modified and again.report.changes == ()
    assert torch.equal(again(mnist_batch), gm(mnist_batch))
    result = QuantizePass(evefx.load_spec(W8A8).passes[0], "passes[0]")(gm)
    assert not result.modified and result.changes == ()


def test_selection_matching_nothing_is_an_error(demo_net):
    spec = {"passes": [{"kind": "quantize", "select": {"names": ["nope.*"]}}]}
    with pytest.raises(PlanError, match=r"passes\[0\]\.select\.names: 'nope\.\*' matches no layer"):
        evefx.transform(demo_net, spec)


def test_weight_only_and_activation_only(demo_net, mnist_batch):
    w_only = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "activation": None}]}, mnist_batch)
    assert w_only.report.counts() == {"replaced": 5, "folded": 3}
    assert not any(isinstance(m, Quantizer) for n, m in w_only.named_children())
    a_only = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "weight": None}]}, mnist_batch)
    assert a_only.report.counts() == {"inserted": 5}
    assert len(_bn_modules(a_only)) == 3 and not any(isinstance(m, QuantConv2d) for m in a_only.modules())
    # the activation quantizer goes after conv -> bn -> relu
    first = marked(a_only, "quantize", role="activation")[0]
    assert first.args[0].target == "features.2" and first.args[0].args[0].target == "features.1"


def test_fold_bn_false_keeps_batchnorm(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "fold_bn": False}]}, mnist_batch)
    assert "folded" not in gm.report.counts()
    assert gm.get_submodule("features.0").bn is None
    assert any(n.target == "features.1" for n in gm.graph.nodes)
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch), atol=1e-6)


def test_train_int32_bias_is_on_by_default_and_settable_per_layer(demo_net, mnist_batch):
    default = evefx.transform(demo_net, {"passes": [{"kind": "quantize"}]}, mnist_batch)
    layers = [m for m in default.modules() if isinstance(m, QUANT_LAYER_TYPES)]
    assert len(layers) == 5 and all(m.train_int32_bias for m in layers)
    spec = {"passes": [{"kind": "quantize", "train_int32_bias": False,
                        "overrides": [{"names": ["features.0"], "train_int32_bias": True}]}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    assert {n: m.train_int32_bias for n, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES)} == {
        "features.0": True, "features.3": False, "features.6": False, "classifier.1": False, "classifier.3": False}
    assert evefx.load_spec(gm.spec.model_dump(mode="json")).passes[0].train_int32_bias is False


def _bn_stats(gm) -> dict[str, bool]:
    return {n: m.bn_running_stats for n, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES) and m.bn is not None}


def test_bn_statistics_auto_freezes_a_trained_network_at_low_bits_only_and_never_a_fresh_one(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize"}]}
    fresh = evefx.transform(demo_net, spec, mnist_batch)
    assert _bn_stats(fresh) == {"features.0": False, "features.3": False, "features.6": False}
    fresh.get_submodule("features.3").weight_quantizer.set_bits(2)
    assert not fresh.get_submodule("features.3").bn_running_stats  # a fresh network's statistics mean nothing yet: batch at any bits
    trained = copy.deepcopy(demo_net).train()
    trained(torch.rand(16, 1, 28, 28))  # running statistics tracked once: a trained network
    gm = evefx.transform(trained, spec, mnist_batch)
    assert {n: m.bn_statistics for n, m in gm.named_modules() if isinstance(m, QUANT_LAYER_TYPES) and m.bn is not None} \
        == {"features.0": "auto", "features.3": "auto", "features.6": "auto"}
    assert _bn_stats(gm) == {"features.0": False, "features.3": False, "features.6": False}  # 8-bit weights: batch
    for bits, frozen in ((3, True), (2, True), (4, False)):  # read at every step: a search's bit widths count
        gm.get_submodule("features.3").weight_quantizer.set_bits(bits)
        assert gm.get_submodule("features.3").bn_running_stats is frozen
    folded = [c.detail for c in gm.report.changes if c.action == "folded"]
    assert folded == [f"BatchNorm2d folded into features.{i} (trains on running statistics, frozen, at 3 weight bits "
                      f"or fewer, batch statistics above)" for i in (0, 3, 6)]
    low = evefx.transform(trained, {"passes": [{"kind": "quantize", "weight": {"bits": 2}}]}, mnist_batch)
    assert all(_bn_stats(low).values())
    # a checkpoint saved before torch tracked batches: statistics off their initial 0 / 1 still count
    old = copy.deepcopy(trained)
    for m in old.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    assert all(_bn_stats(evefx.transform(old, {"passes": [{"kind": "quantize", "weight": {"bits": 3}}]},
                                         mnist_batch)).values())


def test_bn_statistics_written_out_and_per_layer(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "bn_statistics": "running",
                        "overrides": [{"names": ["features.3"], "bn_statistics": "batch"}]}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    assert _bn_stats(gm) == {"features.0": True, "features.3": False, "features.6": True}
    assert evefx.load_spec(gm.spec.model_dump(mode="json")).passes[0].bn_statistics == "running"
    with pytest.raises(evefx.SpecError, match="bn_statistics"):
        evefx.load_spec({"passes": [{"kind": "quantize", "bn_statistics": "frozen"}]})


def test_scale_domain_reaches_the_learned_scales_and_round_trips(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "weight": {"bits": 4, "fn": "lsq", "scale_domain": "log", "init_steps": 0},
                        "activation": {"bits": 4, "scale_domain": "log"},
                        "overrides": [{"names": ["features.3"], "weight": {"scale_domain": "linear"}},
                                      {"names": ["features.6"], "weight": {"scale_domain": "range"}}]}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    weights = {name: m.weight_quantizer for name, m in gm.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}
    assert {n for n, q in weights.items() if q.scale_domain == "linear"} == {"features.3"}
    assert {n for n, q in weights.items() if q.scale_domain == "range"} == {"features.6"}
    assert isinstance(weights["features.0"].scale_log_ratio, nn.Parameter) and isinstance(weights["features.3"].scale, nn.Parameter)
    acts = [module_of(gm, n) for n in marked(gm, "quantize", role="activation")]
    assert acts and all(q.scale_domain == "log" and "scale_log_ratio" in dict(q.named_parameters()) for q in acts)
    gm.train()(mnist_batch).sum().backward()
    assert float(weights["features.0"].scale_log_ratio.grad.abs().sum()) > 0  # the learned logarithm trains
    assert acts[0].scale_log_ratio.grad is None  # still in its init_steps (30) of range tracking
    assert evefx.load_spec(gm.spec.model_dump(mode="json")).passes[0].weight.scale_domain == "log"
    assert evefx.load_spec({"passes": [{"kind": "quantize"}]}).passes[0].activation.scale_domain == "linear"
    with pytest.raises(evefx.SpecError, match="scale_domain"):
        evefx.load_spec({"passes": [{"kind": "quantize", "activation": {"scale_domain": "exp"}}]})


def test_mixed_precision_overrides_and_summary(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "weight": {"bits": 4, "granularity": "per_channel"},
                        "overrides": [{"names": ["features.0", "classifier.*"], "weight": {"bits": 8}}]}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    rows = {r["layer"]: r for r in quant_summary(gm)}
    assert [rows[k]["w_bits"] for k in DEMO_LAYERS] == [8, 4, 4, 8, 8]
    assert [rows[k]["a_bits"] for k in DEMO_LAYERS] == [8, 8, 8, 8, None]  # the logits stay float
    # features.3: 8*4*3*3 = 288 weights at 4 bits = 144 bytes, + 8 folded biases * 4 bytes
    assert rows["features.3"] == {"layer": "features.3", "w_bits": 4, "a_bits": 8, "params": 296, "bytes": 176}
    # classifier.1: 256*16 weights at 8 bits + 16 biases
    assert rows["classifier.1"]["bytes"] == 4096 + 64
    float_rows = quant_summary(evefx.transform(demo_net, {"passes": []}, mnist_batch))
    assert all(r["w_bits"] == 32 and r["a_bits"] is None for r in float_rows)
    assert sum(r["bytes"] for r in float_rows) == 4 * sum(p.numel() for n, p in demo_net.named_parameters()
                                                          if not n.startswith(("features.1", "features.4", "features.7")))


def test_upgrade_bits_are_eve_parameters(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "upgrade_bits": True, "min_bits": 2, "max_bits": 8,
                        "weight": {"bits": 6, "granularity": "per_channel"}}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    params = evefx.eve_parameters(gm)
    assert len(params) == 9  # 5 weights, 4 activations (not the logits)
    assert {p.role for p in params} == {"weight", "activation"}
    assert all((p.low, p.high, p.integer, p.kind) == (2, 8, True, "bits") for p in params)
    assert params[0].name == "features.0.weight_quantizer.bits" and params[0].value == 6.0
    evefx.set_eve_parameter(gm, "features.0.weight_quantizer.bits", 3)
    assert int(gm.get_submodule("features.0").weight_quantizer.bits) == 3
    assert quant_summary(gm)[0]["w_bits"] == 3
    bad = {"passes": [{"kind": "quantize", "upgrade_bits": True, "max_bits": 4}]}
    with pytest.raises(QuantizationError, match=r"passes\[0\].*weight\.bits=8.*\[2, 4\]"):
        evefx.transform(demo_net, bad)


def test_nan_input_names_the_layer(demo_net):
    gm = evefx.transform(demo_net, W8A8)
    x = torch.rand(2, 1, 28, 28)
    x[0, 0, 5, 5] = float("nan")
    with pytest.raises(QuantizationError, match=r"features\.0 \(input\)"):
        gm(x)
    outputs_only = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "quantize_inputs": False}]})
    with pytest.raises(QuantizationError, match=r"features\.0 \(activation\)"):
        outputs_only(x)


def test_training_steps_reach_every_learned_scale(demo_net, mnist_batch):
    # init_steps 0: learned from the first step (the warm-up's straight-through steps leave .grad None)
    spec = {"passes": [{"kind": "quantize", "weight": {"fn": "lsq", "granularity": "per_channel", "init_steps": 0},
                        "activation": {"fn": "llsq", "signed": False, "init_steps": 0}}]}
    gm = evefx.transform(demo_net, spec, mnist_batch).train()
    scales = [m.scale for m in gm.modules() if isinstance(m, Quantizer)]
    assert len(scales) == 10 and all(isinstance(s, nn.Parameter) for s in scales)  # 5 weights, 4 activations, 1 input
    ids = {id(p) for p in gm.parameters()}
    assert all(id(s) in ids for s in scales)
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(gm(mnist_batch), y) + extra_losses(gm)
        loss.backward()
        assert all(s.grad is not None for s in scales)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_state_dict_round_trip(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch).train()
    gm(mnist_batch)
    fresh = evefx.transform(demo_net, W8A8, mnist_batch)
    fresh.load_state_dict(gm.state_dict())
    gm.eval(), fresh.eval()
    assert torch.equal(fresh(mnist_batch), gm(mnist_batch))


def test_resnet18():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 64, 64)
    gm = evefx.transform(model, W8A8, x)
    counts = gm.report.counts()
    # 20 activation quantizers (not after fc: the logits stay float); 9 input quantizers: conv1
    # (network input), the conv1 of the 7 blocks that read a ReLU of a residual sum (shared with the
    # downsample conv where there is one), fc
    assert counts == {"replaced": 21, "folded": 20, "inserted": 29}
    assert not any(n.op == "call_module" and isinstance(module_of(gm, n), nn.BatchNorm2d) for n in gm.graph.nodes)
    # the quantizer of conv2 of a residual block sits after its BN (folded), before the addition
    node = next(n for n in marked(gm, "quantize", role="activation") if n.meta["evefx"]["layer"] == "layer1.0.conv2")
    assert node.args[0].target == "layer1.0.conv2" and any("add" in str(u.target) for u in node.users)
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(x), model(x), atol=1e-4)
    evefx.set_mode(gm, quantized=True)  # uninitialised quantizers calibrate on this first eval batch
    ref = model(x).detach()
    assert float((gm(x) - ref).abs().max().detach()) < 0.2 * float(ref.abs().max())
    again = evefx.transform(gm, W8A8, x)
    assert not again.report.modified
    # 8-bit weights take one byte each, every layer keeps a 32-bit bias (folded from BN or the fc's own)
    expected = sum(m.weight.numel() + 4 * m.weight.shape[0] for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    assert sum(r["bytes"] for r in quant_summary(gm)) == expected


# ------------------------------------------------------------------ quantize_inputs
def test_network_input_gets_an_input_quantizer(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, W8A8, mnist_batch)
    (node,) = marked(gm, "quantize", role="input")
    assert node.meta["evefx"]["layer"] == "features.0" and node.args[0].op == "placeholder"
    assert [u.target for u in node.users] == ["features.0"]
    q = module_of(gm, node)
    # the activation settings (asymmetric, unsigned), per tensor; inputs in [0, 1]: zero point 0
    assert (q.symmetric, q.signed, q.num_channels, int(q.bits)) == (False, False, None, 8)
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(mnist_batch), demo_net(mnist_batch), atol=1e-5)
    evefx.set_mode(gm, quantized=True)
    gm.train()(mnist_batch)
    scale, zp, *_ = q.qparams()
    assert int(zp) == 0 and math.isclose(float(scale), float(mnist_batch.max()) / 255, rel_tol=1e-5)
    off = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "quantize_inputs": False}]}, mnist_batch)
    assert marked(off, "quantize", role="input") == []


def test_symmetric_unsigned_input_quantizer_is_signed_unless_after_relu():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    spec = {"passes": [{"kind": "quantize", "activation": {"bits": 8, "symmetric": True, "signed": False}}]}
    gm = evefx.transform(model, spec, torch.rand(1, 3, 32, 32))
    by_layer = {n.meta["evefx"]["layer"]: module_of(gm, n) for n in marked(gm, "quantize", role="input")}
    assert by_layer["conv1"].signed  # the network input may be negative
    assert not by_layer["layer1.1.conv1"].signed  # the ReLU after a residual sum is not


def test_resnet18_input_quantizers_sit_on_the_input_edges_only():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.rand(2, 3, 64, 64)
    gm = evefx.transform(model, W8A8, x)
    inputs = {n.meta["evefx"]["layer"]: n for n in marked(gm, "quantize", role="input")}
    assert sorted(inputs) == sorted(["conv1", "fc"] + [f"layer{i}.{j}.conv1" for i in (1, 2, 3, 4) for j in (0, 1)
                                                         if (i, j) != (1, 0)])  # layer1.0 reads the max-pool
    # a block with a downsample: both convs read one shared input quantizer
    shared = inputs["layer2.0.conv1"]
    assert sorted(str(u.target) for u in shared.users) == ["layer2.0.conv1", "layer2.0.downsample.0"]
    # a block without one: its residual sum still reads the float block input
    q = inputs["layer2.1.conv1"]
    others = [u for u in q.args[0].users if u is not q]
    assert [u.op for u in others] == ["call_function"] and "add" in str(others[0].target)
    # the classifier reads the quantized pooled features (after flatten)
    assert "flatten" in str(inputs["fc"].args[0].target) or "flatten" in inputs["fc"].args[0].name
    evefx.set_mode(gm, quantized=False)
    assert torch.allclose(gm(x), model(x), atol=1e-4)


def test_transform_of_a_trained_llsq_model(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "weight": {"fn": "llsq", "bits": 4},
                        "activation": {"fn": "llsq", "bits": 4, "symmetric": False, "signed": False}}]}
    gm = evefx.transform(demo_net, spec, mnist_batch).train()
    loss = gm(mnist_batch).sum() + extra_losses(gm)  # the llsq regularisers now hold autograd graphs
    loss.backward()
    clone = copy.deepcopy(gm)
    again = evefx.transform(gm, spec, mnist_batch)
    assert not again.report.modified
    gm.eval(), clone.eval(), again.eval()
    assert torch.equal(clone(mnist_batch), gm(mnist_batch)) and torch.equal(again(mnist_batch), gm(mnist_batch))


def test_mixed_precision_lsq_activations_survive_lower_bits():
    """examples/specs/mixed_precision.yaml (lsq asymmetric unsigned activations): QAT on a subset of the
    MNIST split, then every activation quantizer at 3 bits without retraining."""
    from torch.utils.data import DataLoader, Subset

    from evefx.data import mnist5k
    from evefx.train import evaluate, fit, seed_everything
    from examples.models import DemoNet

    seed_everything(0)
    train = DataLoader(Subset(mnist5k("train"), range(4000)), batch_size=50, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    test = DataLoader(Subset(mnist5k("test"), range(500)), batch_size=500)
    gm = evefx.transform(DemoNet(), "examples/specs/mixed_precision.yaml", torch.zeros(1, 1, 28, 28))
    fit(gm, train, None, epochs=1, lr=3e-3, progress=False)
    before = evaluate(gm, test)["accuracy"]
    acts = [module_of(gm, n) for n in marked(gm, "quantize", role="activation")]
    hidden = acts[:-1]  # after a ReLU; the last one quantizes the logits
    assert all(int(q.zero_point) == 0 for q in hidden)  # after a ReLU: zero point 0
    for q in hidden:
        q.set_bits(3)
    after = evaluate(gm, test)["accuracy"]
    # the grid of a zero point left mid-range lost ~8 points here; the fix loses less than 1
    # (3-bit logits, 8 levels for 10 classes, cost ~4 points on their own: not what this checks)
    assert before > 75 and after > before - 2


def test_keep_first_last_sets_exactly_the_edge_layers_bits(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "weight": {"bits": 2}, "activation": {"bits": 2, "signed": False, "symmetric": False},
                        "keep_first_last": 8}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    rows = {r["layer"]: (r["w_bits"], r["a_bits"]) for r in quant_summary(gm)}
    # first: weights 8 (its output feeds the next layer: 2); last: weights 8, its input (the hidden
    # layer's activation quantizer) 8, its output float (quantize_output false)
    assert rows == {"features.0": (8, 2), "features.3": (2, 2), "features.6": (2, 2), "classifier.1": (2, 8),
                    "classifier.3": (8, None)}
    inputs = [module_of(gm, n) for n in marked(gm, "quantize", role="input")]
    assert [int(q.bits) for q in inputs] == [8]  # the image input of features.0
    modified = [c for c in gm.report.changes if c.action == "modified"]
    assert [c.target for c in modified] == ["classifier_1_act_quant"]
    plain = evefx.transform(demo_net, {"passes": [{**spec["passes"][0], "keep_first_last": None}]}, mnist_batch)
    assert {(r["w_bits"], r["a_bits"]) for r in quant_summary(plain)} == {(2, 2), (2, None)}


def test_progressive_and_init_steps_reach_the_quantizers(demo_net, mnist_batch):
    spec = {"passes": [{"kind": "quantize", "weight": {"bits": 2, "fn": "lsq", "init_steps": 7},
                        "activation": {"bits": 2, "signed": False, "progressive": {"start_bits": 8, "steps": 4}}}]}
    gm = evefx.transform(demo_net, spec, mnist_batch)
    w = gm.get_submodule("features.3").weight_quantizer
    a = module_of(gm, marked(gm, "quantize", layer="features.3", role="activation")[0])
    assert (w.init_steps, w.bits_schedule, int(w.bits)) == (7, None, 2)
    assert (a.bits_schedule, int(a.bits)) == (((0, 8), (2, 4), (4, 2)), 8)


def test_default_step_is_learned_and_starts_as_rounds(demo_net, mnist_batch):
    gm = evefx.transform(demo_net, {"passes": [{"kind": "quantize", "activation": {"bits": 2}}]}, mnist_batch)
    acts = [module_of(gm, n) for n in marked(gm, "quantize", role="activation")]
    assert len(acts) == 4 and all(q.fn == "lsq" and isinstance(q.scale, nn.Parameter) for q in acts)
    assert all(m.weight_quantizer.fn == "round" for m in gm.modules() if isinstance(m, (QuantConv2d, QuantLinear)))
    # until it trains (eval, PTQ) a learned step follows the tracked range: the same grid as round
    rounded = {"passes": [{"kind": "quantize", "weight": {"fn": "round"}, "activation": {"bits": 2, "fn": "round"}}]}
    gr = evefx.transform(demo_net, rounded, mnist_batch)
    torch.testing.assert_close(gm.eval()(mnist_batch), gr.eval()(mnist_batch), rtol=0, atol=0)
    # for init_steps (30) training forwards its step is the tracked range's; then the least-squares step
    gm.train()
    q = acts[1]

    def range_step():
        return affine_from_range(q.range_min, q.range_max, *q.quant_range(), q.symmetric, q.signed)[0]

    with torch.no_grad():
        for _ in range(8):  # calibration as bench/zoo.py does it: training forwards, no optimizer
            gm.train()(mnist_batch), gr.train()(mnist_batch)
        torch.testing.assert_close(gm.eval()(mnist_batch), gr.eval()(mnist_batch), rtol=0, atol=0)
        gm.train()
        for _ in range(22):
            gm(mnist_batch)
        assert torch.equal(q.scale, range_step())
        gm(mnist_batch)
        assert not torch.allclose(q.scale, range_step(), rtol=0.05)
