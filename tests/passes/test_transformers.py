"""Transformers and channels-last models through the passes: the channel axis from the layer,
decomposed attention (allclose vs nn.MultiheadAttention), spiking and W8A8 export of tiny ViT,
nn.TransformerEncoder, ConvNeXt-like and Swin-like blocks."""
from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evefx
from evefx.errors import ExportError, OptionError, ShapeError
from evefx.export import calibrate
from evefx.graph import marked, module_of
from evefx.modules.attention import DecomposedMultiheadAttention
from evefx.modules.neurons import LIFNeuron
from evefx.modules import Quantizer

SPIKE = {"kind": "spike", "timesteps": 4, "encoder": "direct", "select": {"types": ["Linear", "Conv2d"]}}
W8A8 = {"kind": "quantize", "select": {"types": ["Conv2d", "Linear"]}}


# ----------------------------------------------------------------------------- tiny models
class TokenMLP(nn.Module):
    """Linear layers on a token sequence [B, N, C]: features on the last dim."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.fc2(F.relu(self.fc1(x))).mean(1))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, permute to channels-last, LayerNorm, Linear, GELU, Linear, back."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1, self.act, self.pw2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


class EncoderNet(nn.Module):
    """Patches -> nn.TransformerEncoder -> mean -> Linear (masks optional)."""

    def __init__(self, dim: int = 16, batch_first: bool = True, norm_first: bool = False):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, 3)

    def forward(self, x, mask=None, padding=None):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        if not self.batch_first:
            tokens = tokens.transpose(0, 1)
        out = self.encoder(tokens, mask=mask, src_key_padding_mask=padding)
        return self.head(out.mean(1 if self.batch_first else 0))


def tiny_vit() -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=3).eval()
    nn.init.normal_(vit.heads.head.weight, std=0.2)  # torchvision starts the head at zero: every output 0
    return vit


def tiny_swin_block() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformerBlock

    class SwinNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 16, 4, stride=4)
            self.block = SwinTransformerBlock(16, 2, [2, 2], [1, 1], stochastic_depth_prob=0.0)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.block(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))

    return SwinNet()


# ----------------------------------------------------------------------------- the channel axis
def test_neuron_channels_last_after_linear_on_tokens():
    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(2, 5, 8)
    gm = evefx.transform(model, {"passes": [SPIKE]}, x)
    neurons = marked(gm, "spike", role="neuron")
    assert [n.meta["evefx"]["layer"] for n in neurons] == ["fc1", "fc2"]
    assert [n.meta["evefx"]["channel_axis"] for n in neurons] == [-1, -1]
    first = module_of(gm, neurons[0])
    assert first.channels == 16 and first.channel_axis == -1 and first.threshold.shape == (16,)
    # per-channel thresholds act along the last dim: raise one channel's threshold and only it goes quiet
    gm.eval()(x)  # the first batch sets the data-dependent thresholds (threshold: null)
    with torch.no_grad():
        first.threshold[3] = 1e6
    evefx.reset(gm)
    gm(x)
    rates = first.channel_firing_rates()
    assert rates.shape == (16,) and rates[3] == 0 and rates.sum() > 0
    # non-spiking mode: each neuron is a LeakyReLU on the layer's output (fc2 had no activation)
    evefx.set_mode(gm, spiking=False)
    hidden = F.leaky_relu(model.fc2(F.leaky_relu(model.fc1(x), 0.01)), 0.01)
    assert torch.allclose(gm(x), model.head(hidden.mean(1)), atol=1e-6)


def test_neuron_channels_last_block_and_conv_axis():
    torch.manual_seed(0)
    model = ChannelsLastBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    gm = evefx.transform(model, {"passes": [SPIKE]}, x)
    axes = {n.meta["evefx"]["layer"]: n.meta["evefx"]["channel_axis"] for n in marked(gm, "spike", role="neuron")}
    assert axes == {"stem": 1, "dw": 1, "pw1": -1, "pw2": -1}
    out = gm.train()(x)
    out.sum().backward()
    assert gm.pw1.weight.grad is not None and torch.isfinite(gm.pw1.weight.grad).all()


def test_neuron_rejects_wrong_axis_with_the_fix():
    neuron = LIFNeuron(timesteps=1, channels=16, neuron_wise=True)  # channel_axis=1 (a conv's)
    with pytest.raises(ShapeError, match=r"channels are dim 1\); build it with channels=5 or the channel_axis"):
        neuron(torch.randn(2, 5, 16))
    assert LIFNeuron(timesteps=1, channels=16, neuron_wise=True, channel_axis=-1)(torch.randn(2, 5, 16)).shape == (2, 5, 16)
    with pytest.raises(OptionError, match="channel_axis cannot be 0"):
        LIFNeuron(channel_axis=0)


def test_plan_checks_the_axis_against_the_shapes():
    class Odd(nn.Linear):  # a Linear whose output puts its features first: evefx cannot find its channels
        def forward(self, x):
            return super().forward(x).transpose(0, -1)

    model = nn.Sequential(nn.Linear(4, 6), Odd(6, 5), nn.ReLU())
    leaf = {"trace": {"leaf_modules": ["Odd"]}}
    with pytest.raises(ShapeError, match=r"passes\[0\]: layer 1 \(Odd\) has 5 output channels, which evefx expects on "
                                         r"dim -1 of its output, but its output has shape \(5, 2\); add '1' to select.exclude"):
        evefx.transform(model, {"passes": [{"kind": "spike", "exclude_last": False}], **leaf}, torch.randn(2, 4))
    gm = evefx.transform(model, {"passes": [{"kind": "spike", "exclude_last": False, "select": {"exclude": ["1"]}}],
                                 **leaf}, torch.randn(2, 4))
    assert [n.meta["evefx"]["layer"] for n in marked(gm, "spike", role="neuron")] == ["0"]


def test_per_channel_activation_quantizer_axis_and_export(tmp_path):
    torch.manual_seed(0)
    model = TokenMLP().eval()
    x = torch.randn(16, 5, 8)
    section = {**W8A8, "activation": {"bits": 8, "granularity": "per_channel", "symmetric": False, "signed": False}}
    gm = evefx.transform(model, {"passes": [section]}, x[:1])
    act = {n.meta["evefx"]["layer"]: module_of(gm, n) for n in marked(gm, "quantize", role="activation")}
    assert all(isinstance(q, Quantizer) and q.ch_axis == -1 for q in act.values())
    assert act["fc1"].num_channels == 16
    calibrate(gm, [x])
    lo, hi = act["fc1"].qparams()[:2]
    assert lo.shape == (16,)
    report = evefx.export_onnx(gm, x[:1], tmp_path / "m.onnx", real_inputs=x, kernels=False)
    assert report.passed
    axes = {a.i for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "QuantizeLinear"
            for a in n.attribute if a.name == "axis"}
    assert axes == {-1}


def test_nir_export_refuses_a_linear_on_tokens_with_the_reason(tmp_path):
    gm = evefx.transform(TokenMLP(), {"passes": [SPIKE]}, torch.randn(1, 5, 8))
    gm.eval()(torch.randn(4, 5, 8))  # sets the data-dependent thresholds
    with pytest.raises(ExportError, match=r"NIR export: fc1 \(Linear\) reads \(5, 8\) per sample .* NIR's Affine maps one "
                                          r"vector"):
        evefx.export_nir(gm.eval(), tmp_path / "m.nir", dt=1e-3)


# ----------------------------------------------------------------------------- decomposed attention
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_decomposed_attention_equals_multihead_attention(batch_first, kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    dec = DecomposedMultiheadAttention.from_float(mha).eval()
    B, L, S = 3, 4, 5
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    q, k, v = torch.randn(shape(L, 8)), torch.randn(shape(S, kdim or 8)), torch.randn(shape(S, kdim or 8))
    causal = torch.ones(L, S, dtype=torch.bool).triu(1)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, -2:] = True
    float_mask = torch.randn(B * 2, L, S)
    cases = [{}, {"attn_mask": causal}, {"key_padding_mask": padding}, {"attn_mask": float_mask},
             {"attn_mask": causal, "key_padding_mask": padding}, {"need_weights": False},
             {"average_attn_weights": False, "key_padding_mask": padding}]
    for kwargs in cases:
        want, want_w = mha(q, k, v, **kwargs)
        got, got_w = dec(q, k, v, **kwargs)
        assert torch.allclose(got, want, atol=1e-6), kwargs
        assert (got_w is None) == (want_w is None) and (got_w is None or torch.allclose(got_w, want_w, atol=1e-6))


def test_decomposed_attention_state_dict_mapping():
    mha = nn.MultiheadAttention(8, 2)
    dec = DecomposedMultiheadAttention.from_float(mha)
    assert torch.equal(dec.k_proj.weight, mha.in_proj_weight[8:16]) and torch.equal(dec.v_proj.bias, mha.in_proj_bias[16:])
    assert sorted(dec.state_dict()) == sorted(f"{p}_proj.{t}" for p in ("q", "k", "v", "out") for t in ("weight", "bias"))
    with pytest.raises(OptionError, match="add_bias_kv"):
        DecomposedMultiheadAttention.from_float(nn.MultiheadAttention(8, 2, add_bias_kv=True))


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_transformer_encoder_traces_through_and_preserves_computation(batch_first, norm_first):
    torch.manual_seed(0)
    model = EncoderNet(batch_first=batch_first, norm_first=norm_first).eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    gm = evefx.transform(model, {"passes": []}, x)
    layers = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "encoder.layers.0.self_attn.q_proj" in layers and "encoder.layers.1.linear2" in layers
    assert not any(isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoder)) for m in gm.modules())
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[0, :3] = True
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    # the user's model is untouched (same classes, same state)
    assert type(model.encoder) is nn.TransformerEncoder and type(model.encoder.layers[0].self_attn) is nn.MultiheadAttention
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # masks given as inputs reach every layer (a model traced with them as inputs)
    traced_with_mask = evefx.transform(model, {"passes": []}, (x, None, padding))
    model.train()  # the reference path (no nested-tensor fast path) to compare against
    with torch.no_grad():
        assert torch.allclose(traced_with_mask(x, None, padding), model(x, None, padding), atol=1e-5)


def test_select_exclude_last_and_report_on_a_vit():
    model = tiny_vit()
    section = {**W8A8, "select": {"names": ["*.self_attention.*"], "exclude": ["*.out_proj"]}}
    gm = evefx.transform(model, {"passes": [section]}, torch.randn(1, 3, 16, 16))
    weights = [n.meta["evefx"]["layer"] for n in marked(gm, "quantize", role="weight")]
    assert weights == [f"encoder.layers.encoder_layer_{i}.self_attention.{p}_proj" for i in (0, 1) for p in "qkv"]
    replaced = [c for c in gm.report.changes if c.action == "replaced"]
    assert [c.layer for c in replaced] == weights and all("Linear -> QuantLinear" in c.detail for c in replaced)
    # exclude_last leaves the classifier (heads.head) analog; everything else before it spikes
    gm = evefx.transform(model, {"passes": [SPIKE]}, torch.randn(1, 3, 16, 16))
    layers = [n.meta["evefx"]["layer"] for n in marked(gm, "spike", role="neuron")]
    assert layers[0] == "conv_proj" and layers[-1] == "encoder.layers.encoder_layer_1.mlp.3" and len(layers) == 13


def test_leaf_modules_keep_attention_opaque():
    model = EncoderNet().eval()
    gm = evefx.transform(model, {"passes": [], "trace": {"leaf_modules": ["TransformerEncoder"]}}, torch.randn(1, 3, 16, 16))
    assert isinstance(gm.get_submodule("encoder"), nn.TransformerEncoder)
    assert not any(isinstance(m, DecomposedMultiheadAttention) for m in gm.modules())


# ----------------------------------------------------------------------------- spike and quantize
@pytest.mark.parametrize("build,shape", [(tiny_vit, (3, 16, 16)), (EncoderNet, (3, 16, 16)),
                                         (ChannelsLastBlock, (3, 8, 8)), (tiny_swin_block, (3, 16, 16))])
def test_spike_t4_forward_backward(build, shape):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, *shape)
    gm = evefx.transform(model, {"passes": [SPIKE]}, x[:1]).train()
    out = gm(x)
    assert out.shape == model(x).shape
    out.sum().backward()
    grads = [p.grad for p in gm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    neurons = marked(gm, "spike", role="neuron")
    linear_neurons = [n for n in neurons if isinstance(gm.get_submodule(n.meta["evefx"]["layer"]), nn.Linear)]
    assert linear_neurons and all(module_of(gm, n).channel_axis == -1 for n in linear_neurons)
    assert not marked(gm, "spike", layer="head", role="neuron")  # exclude_last: the classifier stays analog


@pytest.mark.parametrize("build", [tiny_vit, EncoderNet])
def test_w8a8_attention_projections_export_int8_with_parity(build, tmp_path):
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(64, 3, 16, 16)
    gm = evefx.transform(model, {"passes": [W8A8]}, x[:1])
    weights = {n.meta["evefx"]["layer"] for n in marked(gm, "quantize", role="weight")}
    attention = {w.rsplit(".", 1)[0] for w in weights if w.endswith(".q_proj")}
    assert len(attention) == 2  # both encoder layers, each with its four projections weight-quantized
    assert {f"{a}.{p}_proj" for a in attention for p in ("q", "k", "v", "out")} <= weights
    calibrate(gm, [x[i:i + 16] for i in range(0, 64, 16)])
    report = evefx.export_onnx(gm, x[:1], tmp_path / "m.onnx", real_inputs=x)
    assert report.passed
    assert report.kernels.get("MatMulIntegerToFloat", 0) + report.kernels.get("QLinearMatMul", 0) >= 8
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    producer = {o: n for n in graph.node for o in n.output}

    def source(name):  # through the Transpose of a dequantized weight
        n = producer.get(name)
        return source(n.input[0]) if n is not None and n.op_type == "Transpose" else n

    projections = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and "_proj" in n.name]
    assert len(projections) == 8
    for n in projections:
        assert [getattr(source(i), "op_type", None) for i in n.input[:2]] == ["DequantizeLinear"] * 2, n.name
    # LayerNorm and softmax stay float ops between the Q/DQ pairs
    assert {"LayerNormalization", "Softmax"} <= {n.op_type for n in graph.node}
