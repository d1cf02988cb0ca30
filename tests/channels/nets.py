"""Small hand-built models for the channel tests: residual, concat, shuffle, squeeze-excite, grouped and
pre-activation dense graphs, and helpers that prune, compact and read masks."""
from __future__ import annotations

import torch
from torch import nn

import evefx
from evefx.graph import marked
from evefx.modules.prune import ChannelPruner

PRUNE = {"passes": [{"kind": "prune", "ratio": 0.5}]}
X28 = torch.zeros(1, 1, 28, 28)
X16 = torch.zeros(1, 3, 16, 16)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def cbr(cin, cout, k=3, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout), nn.ReLU())


def randomise_bn(model, seed=0):
    """Non-trivial BatchNorm statistics, so that a wrong channel slice shows up in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class ResLike(nn.Module):
    """Stem and two residual blocks: the stem and both blocks' second convs share channels."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b2 = nn.Sequential(cbr(8, 8), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.b1(x))
        x = torch.relu(self.b2(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseLike(nn.Module):
    """DenseNet-style concatenations (post-activation), and a head that views with a literal size."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 4)
        self.l1 = cbr(4, 4)
        self.l2 = cbr(8, 4)
        self.head = cbr(12, 6, k=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = self.stem(x)
        a = self.l1(s)
        b = self.l2(torch.cat([s, a], 1))
        h = self.head(torch.cat([s, a, b], dim=1)).mean((2, 3))
        return self.fc(h.view(h.size(0), 6))


class ShuffleLike(nn.Module):
    """ShuffleNetV2 unit: channel split, 1x1 -> depthwise 3x3 -> 1x1 branch, concat, channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.branch = nn.Sequential(
            cbr(4, 4, k=1),
            nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.BatchNorm2d(4),
            cbr(4, 4, k=1),
        )
        self.head = cbr(8, 16, k=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat((x1, self.branch(x2)), dim=1)
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)
        return self.fc(self.head(x).mean([2, 3]))


class SELike(nn.Module):
    """Squeeze-and-excitation: the expand conv's channels are multiplied into the trunk's."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        s = torch.sigmoid(self.expand(torch.relu(self.reduce(nn.functional.adaptive_avg_pool2d(x, 1)))))
        return self.fc((x * s).mean((2, 3)))


def prune_and_compact(model, spec=PRUNE, x=X16):
    model = randomise_bn(model)
    gm = evefx.transform(model, spec, x)
    evefx.prune_step(gm)
    small = evefx.compact(gm)
    xs = rand(3, *x.shape[1:], seed=1)
    gm.eval()
    assert torch.allclose(small(xs), gm(xs), atol=1e-5)
    assert not any(isinstance(m, ChannelPruner) for m in small.modules())
    return gm, small


def masks_of(gm):
    return {n.meta["evefx"]["layer"]: gm.get_submodule(str(n.target)).mask.clone() for n in marked(gm, "prune")}


class FireNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.conv2 = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(2, 3)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, -1.0, 2.0, -0.5]).view(4, 1, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.conv(x))).mean((2, 3)))


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        with torch.no_grad():
            for f, v in enumerate([1.0, 1.0, 1.0, 5.0]):
                self.c1.weight[f].fill_(v)
            for f in range(8):
                self.c2.weight[f].fill_(f + 1.0)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class GroupedLike(nn.Module):
    """ResNeXt-style grouped conv (in = out, 2 groups of 4), then a grouped conv that widens (4 -> 8 per group)."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.grouped = cbr(8, 8, groups=2)
        self.widen = cbr(8, 16, groups=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.widen(self.grouped(self.stem(x))).mean((2, 3)))


class PreActDense(nn.Module):
    """DenseNet's order: concat -> BatchNorm -> ReLU -> conv. A removed channel reaches the conv as
    the constant relu(BatchNorm(0)), which a 1x1 conv without padding takes into its bias."""

    def __init__(self, k: int = 1):
        super().__init__()
        self.stem = cbr(3, 4)
        self.grow = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 6, k, padding=k // 2, bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(self.norm(torch.cat([s, self.grow(s)], 1)))
        return self.fc(self.conv(h).mean((2, 3)))
