"""Pruning through normalisation and attention: LayerNorm freezes the stream it normalises while the MLP
width prunes, GroupNorm loses whole groups, a conv stem read on the last axis after a permute, the class
token and positional embedding, heads pruned whole (q/k/v/out coupled, num_heads rewritten) or head_dim
pruned uniformly, the opaque nn.MultiheadAttention, and the errors. Every compaction is checked allclose
against the masked model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evefx
from evefx.channels import analyze, compact_report
from evefx.errors import OptionError, PruneError, SpecError
from evefx.modules.prune import ChannelPruner

from tests.channels.nets import masks_of, rand
from tests.channels.transformer_nets import (IMAGE, TOKENS, Attention, ChannelsLast, EinsumAttention, TinyViT, Tokens,
                                             randomise)


def spec(granularity="channel", **extra):
    return {"passes": [{"kind": "prune", "ratio": 0.5, "granularity": granularity, **extra}]}


def prune(model, x=TOKENS, granularity="channel"):
    """Transform, one prune step, compact; the compacted model must equal the masked one on a fresh batch."""
    gm = evefx.transform(randomise(model), spec(granularity), x)
    evefx.prune_step(gm)
    small = evefx.compact(gm)
    xs = rand(3, *x.shape[1:], seed=1)
    assert torch.allclose(small(xs), gm.eval()(xs), atol=1e-5)
    assert not any(isinstance(m, ChannelPruner) for m in small.modules())
    return gm, small


def reshape_sizes(gm):
    """The literal sizes of every reshape call, in graph order."""
    return [tuple(a for a in n.args[1:] if isinstance(a, int)) for n in gm.graph.nodes if n.target == "reshape"]


def groups_by_layer(gm):
    return {g.layers: g for g in analyze(gm).groups()}


def test_layer_norm_keeps_the_stream_whole_and_the_mlp_width_prunes():
    groups = groups_by_layer(evefx.transform(Tokens(), spec(), TOKENS))
    stream = groups[("embed", "blocks.0.attn.out_proj", "blocks.0.mlp.2", "blocks.1.attn.out_proj", "blocks.1.mlp.2")]
    assert stream.channels == 16 and stream.prunable == 0
    assert stream.frozen == (("normalised together by blocks.0.norm1 (a LayerNorm's statistics count every channel, "
                              "so removing one would change the others)"),)
    assert groups[("blocks.0.mlp.0",)].prunable == 32
    _gm, small = prune(Tokens())
    for b in ("blocks.0", "blocks.1"):
        assert small.get_submodule(f"{b}.mlp.0").out_features == 16 and small.get_submodule(f"{b}.mlp.2").in_features == 16
        assert small.get_submodule(f"{b}.norm1").normalized_shape == (16,)
    report = compact_report(small)
    assert report.params_before == 4803 and report.params_after == 2675 and report.macs_after < report.macs_before


def test_group_norm_loses_whole_groups_and_a_permuted_stem_is_read_on_the_last_axis():
    groups = groups_by_layer(evefx.transform(ChannelsLast(), spec(), IMAGE))
    # the stem's channels reach fc1 through permute(0, 2, 3, 1): prunable; fc1's go through a LayerNorm
    assert groups[("stem",)].prunable == 8 and groups[("fc1",)].prunable == 0
    assert groups[("fc2",)].channels == 2  # GroupNorm(2, 8): one class per group
    gm, small = prune(ChannelsLast(), IMAGE)
    assert small.stem.out_channels == 4 and small.fc1.in_features == 4 and small.fc1.out_features == 12
    assert (small.fc2.out_features, small.gn.num_channels, small.gn.num_groups, small.conv.in_channels) == (4, 4, 1, 4)
    mask = masks_of(gm)["fc2"]
    assert torch.equal(mask, torch.tensor([1.0] * 4 + [0.0] * 4)) or torch.equal(mask, torch.tensor([0.0] * 4 + [1.0] * 4))


def test_class_token_and_position_embedding_join_the_patch_channels_to_the_stream():
    groups = groups_by_layer(evefx.transform(TinyViT(), spec(), IMAGE))
    stream = groups[("patch", "block.attn.out_proj", "block.mlp.2")]
    assert stream.channels == 16 and stream.prunable == 0
    assert stream.frozen[0] == "parameter or constant cls_token (compaction does not slice it)"
    _gm, small = prune(TinyViT(), IMAGE)
    assert small.patch.out_channels == 16 and small.get_submodule("block.mlp.0").out_features == 16
    assert small.get_submodule("block.attn.q_proj").out_features == 8


@pytest.mark.parametrize("fused", [False, True])
def test_head_granularity_prunes_whole_heads_and_rewrites_num_heads(fused):
    groups = groups_by_layer(evefx.transform(Tokens(fused=fused), spec("head"), TOKENS))
    attn = ("blocks.0.attn.qkv",) if fused else ("blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj")
    assert groups[attn].channels == 4 and groups[attn].prunable == 4  # four heads, q/k/v coupled
    gm, small = prune(Tokens(fused=fused), granularity="head")
    masks = masks_of(gm)
    if fused:
        heads = masks["blocks.0.attn.qkv"].reshape(3, 4, 4)
        assert torch.equal(heads[0], heads[1]) and torch.equal(heads[0], heads[2])
        heads = heads[0]
        assert small.get_submodule("blocks.0.attn.qkv").out_features == 24
        assert reshape_sizes(small)[:2] == [(3, 2, 4), (-1,)]
    else:
        heads = masks["blocks.0.attn.q_proj"].reshape(4, 4)
        assert torch.equal(masks["blocks.0.attn.q_proj"], masks["blocks.0.attn.k_proj"])
        assert torch.equal(masks["blocks.0.attn.q_proj"], masks["blocks.0.attn.v_proj"])
        for p in ("q_proj", "k_proj", "v_proj"):
            assert small.get_submodule(f"blocks.0.attn.{p}").out_features == 8
        assert reshape_sizes(small)[:4] == [(2, 4)] * 3 + [(8,)]  # num_heads 4 -> 2, head_dim stays 4
    assert (heads == heads[:, :1]).all() and int(heads[:, 0].sum()) == 2  # whole heads: two of four stay
    assert small.get_submodule("blocks.0.attn." + ("proj" if fused else "out_proj")).in_features == 8


def test_channel_granularity_prunes_head_dim_uniformly_across_heads():
    groups = groups_by_layer(evefx.transform(Tokens(), spec("channel"), TOKENS))
    # q with k (their product sums over head_dim), v with the output projection
    assert groups[("blocks.0.attn.q_proj", "blocks.0.attn.k_proj")].channels == 4
    assert groups[("blocks.0.attn.v_proj",)].channels == 4
    gm, small = prune(Tokens(), granularity="channel")
    masks = masks_of(gm)
    per_head = masks["blocks.0.attn.q_proj"].reshape(4, 4)
    assert torch.equal(masks["blocks.0.attn.q_proj"], masks["blocks.0.attn.k_proj"])
    assert (per_head == per_head[:1]).all() and int(per_head[0].sum()) == 2  # the same head_dim entries in every head
    assert reshape_sizes(small)[:4] == [(4, 2)] * 3 + [(8,)]  # head_dim 4 -> 2, num_heads stays 4
    assert small.get_submodule("blocks.0.attn.out_proj").in_features == 8


@pytest.mark.parametrize(("granularity", "sizes"), [("head", (2, 4)), ("channel", (4, 2))])
def test_einsum_attention_prunes_like_matmul(granularity, sizes):
    model = nn.Sequential(nn.Linear(16, 16), EinsumAttention(), nn.Linear(16, 3))
    groups = groups_by_layer(evefx.transform(model, spec(granularity), TOKENS))
    qk = ("1.q_proj", "1.k_proj", "1.v_proj") if granularity == "head" else ("1.q_proj", "1.k_proj")
    assert groups[qk].channels == 4 and groups[qk].prunable == 4
    _gm, small = prune(nn.Sequential(nn.Linear(16, 16), EinsumAttention(), nn.Linear(16, 3)), granularity=granularity)
    assert reshape_sizes(small)[:3] == [sizes] * 3 and small.get_submodule("1.out_proj").in_features == 8


def test_a_size_computed_at_run_time_is_named():
    class Computed(Attention):
        def forward(self, x):
            b, n, c = x.shape
            q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
            return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    gm = evefx.transform(Computed(), {"passes": [{"kind": "prune", "ratio": 0.5, "exclude_last": False,
                                                   "select": {"exclude": ["out_proj"]}}]}, TOKENS)
    evefx.prune_step(gm)
    with pytest.raises(PruneError, match=r"compact cannot rewrite node 'reshape_3' \(call_method reshape\): the size of its "
                                         r"axis 2 \(16 -> 8\) is computed at run time \(getitem_2\); write it as a literal, -1"):
        evefx.compact(gm)


def test_a_scale_read_from_head_dim_at_run_time_is_explained():
    class RunTimeScale(Attention):
        def forward(self, x):
            b, n = x.shape[0], x.shape[1]
            q, k, v = (p(x).reshape(b, n, 4, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            attn = torch.softmax(q @ k.transpose(-2, -1) * q.size(-1) ** -0.5, dim=-1)
            return self.out_proj((attn @ v).transpose(1, 2).reshape(b, n, 16))

    model = nn.Sequential(nn.Linear(16, 16), RunTimeScale(), nn.Linear(16, 3))
    gm = evefx.transform(model, spec("channel"), TOKENS)
    evefx.prune_step(gm)
    with pytest.raises(PruneError, match=r"disagrees with the masked one .*computes values from tensor sizes at run time "
                                         r"\(getattr_1, getattr_2, size\).*self\.scale"):
        evefx.compact(gm)
    small = evefx.compact(_prune_heads(model))  # head granularity keeps head_dim: the same model compacts
    assert small.get_submodule("1.q_proj").out_features == 8


def _prune_heads(model):
    gm = evefx.transform(model, spec("head"), TOKENS)
    evefx.prune_step(gm)
    return gm


def test_an_unknown_attention_op_names_the_node_the_rule_and_select_exclude():
    class Fast(Attention):
        def forward(self, x):
            b, n = x.shape[0], x.shape[1]
            q, k, v = (p(x).reshape(b, n, 4, 4).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
            return self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 16))

    gm = evefx.transform(Fast(), spec(), TOKENS)
    with pytest.raises(PruneError) as e:
        evefx.prune_step(gm)
    assert str(e.value).startswith(
        "cannot prune through node 'scaled_dot_product_attention' (call_function scaled_dot_product_attention): evefx does "
        "not know how scaled_dot_product_attention maps channels. Register a rule for it, e.g. "
        "evefx.channels.register_rule(torch._C._nn.scaled_dot_product_attention, evefx.channels.rules.elementwise)")
    assert str(e.value).endswith("Add the layers feeding it to the prune section's select.exclude (e.g. select: {exclude: "
                                 "['q_proj', 'k_proj', 'v_proj']}), or keep that part opaque with trace.leaf_modules.")


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(16, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1))


def test_multihead_attention_is_decomposed_and_prunes_whole_heads():
    groups = groups_by_layer(evefx.transform(MHA(), spec("head"), TOKENS))
    assert groups[("attn.q_proj", "attn.k_proj", "attn.v_proj")].prunable == 4  # heads, q/k/v coupled
    assert groups[("embed", "attn.out_proj", "mlp.2")].prunable == 16  # no norm: the stream prunes too
    _gm, small = prune(MHA(), granularity="head")  # compact equals the masked model (checked in prune)
    assert small.get_submodule("attn.q_proj").out_features == 8 and small.get_submodule("attn.out_proj").in_features == 8


def test_multihead_attention_kept_as_a_leaf_is_opaque_and_the_rest_prunes():
    leaf = {"trace": {"leaf_modules": ["MultiheadAttention"]}, **spec()}
    groups = groups_by_layer(evefx.transform(MHA(), leaf, TOKENS))
    stream = groups[("embed", "mlp.2")]
    assert stream.prunable == 0 and stream.frozen[0].startswith("read inside attn, which evefx does not see into")
    gm = evefx.transform(randomise(MHA()), leaf, TOKENS)
    evefx.prune_step(gm)
    small = evefx.compact(gm)
    assert small.get_submodule("mlp.0").out_features == 16 and small.attn.num_heads == 4


def test_granularity_is_validated():
    with pytest.raises(SpecError, match=r"passes\[0\]\.granularity"):
        evefx.transform(Tokens(), spec("block"), TOKENS)
    with pytest.raises(OptionError, match="granularity must be 'channel' or 'head'"):
        ChannelPruner(4, granularity="block")


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3)


def _tiny_convnext():
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=3)


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    return SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=3)


@pytest.mark.parametrize(("make", "shape", "mlp"), [
    (_tiny_vit, (3, 16, 16), {"encoder.layers.encoder_layer_0.mlp.0": 16}),  # MLP 32 -> 16 (MultiheadAttention stays)
    (_tiny_convnext, (3, 16, 16), {"features.1.0.block.3": 16, "features.3.0.block.3": 32}),  # 32 -> 16, 64 -> 32
    (_tiny_swin, (3, 8, 8), {"features.1.0.mlp.0": 16, "features.3.0.mlp.0": 32}),  # 32 -> 16, 64 -> 32
])
def test_torchvision_transformers_prune_their_mlp_width_and_compact_equals_masked(make, shape, mlp):
    torch.manual_seed(0)
    _gm, small = prune(make(), torch.zeros(1, *shape))
    for name, width in mlp.items():
        assert small.get_submodule(name).out_features == width
    assert compact_report(small).params_after < compact_report(small).params_before


class TextClassifier(nn.Module):
    """Token ids, a padding mask and a defaulted option in: a text model as users write it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, tokens, pad_mask=None, temperature: float = 1.0):
        x = self.emb(tokens)
        x = x + self.attn(x, x, x, key_padding_mask=pad_mask, need_weights=False)[0]
        return self.head((x + self.mlp(x)).mean(1)) / temperature


def test_a_text_model_with_embedding_padding_mask_and_defaulted_option_prunes_and_compacts():
    # Embedding and the decomposed attention's mask had no rule, and compact asked for a shape of `temperature`
    tokens = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    gm = evefx.transform(randomise(TextClassifier()), spec("head"), (tokens, mask))
    groups = groups_by_layer(gm)
    assert groups[("attn.q_proj", "attn.k_proj", "attn.v_proj")].prunable == 4
    assert groups[("mlp.0",)].prunable == 32
    stream = groups[("attn.out_proj", "mlp.2")]  # the residual stream the embedding starts
    assert stream.prunable == 0 and stream.frozen[0] == "embedding emb (compaction does not slice its table)"
    evefx.prune_step(gm)
    small = evefx.compact(gm)
    assert small.get_submodule("mlp.0").out_features == 16 and small.get_submodule("attn.q_proj").out_features == 8
    other = torch.randint(0, 30, (3, 6), generator=torch.Generator().manual_seed(1))
    other_mask = torch.tensor([[False] * 6, [False] * 5 + [True], [False] * 2 + [True] * 4])
    assert torch.allclose(small(other, other_mask), gm.eval()(other, other_mask), atol=1e-5)
    assert torch.allclose(small(other, other_mask, 2.0), gm(other, other_mask) / 2.0, atol=1e-5)
