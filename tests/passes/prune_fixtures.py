"""Seeded CNN fixtures for channel-group and channel-pruning tests, plus the zeroing oracle.

Each fixture builder returns (module, example input). ``EXPECTED`` lists, per fixture, the
exact (out_channels or out_features) of named modules after ``prune-channels{ratio=0.5}``.
"""

from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimgraph.ir import Graph
from slimgraph.zoo.models import BasicBlock


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Seeded weights and non-trivial batch-norm statistics."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.weight[0].numel()) ** 0.5)
            if m.bias is not None:
                m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ConvChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 8), cbr(8, 16), cbr(16, 12)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x))))


class Residual(nn.Module):
    """Stem, a ResNet basic block with a 1x1 downsample, one with the identity shortcut."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.block1, self.block2 = BasicBlock(8, 16, stride=2), BasicBlock(16, 16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(self.block2(self.block1(self.stem(x))))


class Concat(nn.Module):
    """Inception branches concatenated, then a DenseNet-style growing concat."""

    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 8)
        self.b1, self.b2, self.b3 = cbr(8, 4, 1), cbr(8, 6), cbr(8, 2, 1)
        self.dense = cbr(12, 4)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(F.max_pool2d(x, 3, 1, 1))], 1)
        x = torch.cat([x, self.dense(x)], dim=1)
        return self.head(x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.g, self.c = cbr(3, 16), cbr(16, 16, groups=4), cbr(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.c(self.g(self.a(x))))


class Depthwise(nn.Module):
    """MobileNet depthwise-separable blocks (one with a channel multiplier of 2)."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.dw1, self.pw1 = cbr(8, 8, groups=8), cbr(8, 12, 1)
        self.dw2, self.pw2 = cbr(12, 24, groups=12), cbr(24, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.pw2(self.dw2(self.pw1(self.dw1(self.a(x))))))


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.fc1, self.fc2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.b = cbr(16, 8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        x = x * s.view(s.size(0), -1, 1, 1)
        return self.head(self.b(x))


class FlattenLinear(nn.Module):
    """conv -> pool -> flatten -> linear -> linear; ``literal`` uses x.view(-1, 8*4*4)."""

    def __init__(self, literal: bool = False):
        super().__init__()
        self.literal = literal
        self.a, self.b = cbr(3, 8), cbr(8, 8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = F.max_pool2d(self.b(self.a(x)), 2)
        x = x.view(-1, 128) if self.literal else x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Decoder(nn.Module):
    """Encoder conv, then transposed convs (one grouped) back up."""

    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 16, stride=2)
        self.up1 = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.up1(self.enc(x))))
        return self.head(F.relu(self.up2(x)))


class SplitChunk(nn.Module):
    """chunk -> two paths -> cat, a split with sizes, and a channel slice x[:, 4:]."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.p = cbr(8, 8)
        self.b = cbr(16, 12)
        self.q = nn.Conv2d(4, 6, 1)
        self.r = nn.Conv2d(8, 6, 1)
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        x = self.a(x)
        u, v = torch.chunk(x, 2, dim=1)
        x = self.b(torch.cat([self.p(u), F.relu(v)], 1))
        s, t = x.split([4, 8], 1)
        x = torch.cat([self.q(s), self.r(t)], 1)
        return self.head(x)


class Slice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.b(self.a(x)[:, 4:])


class UNet(nn.Module):
    """Down (strided conv), up (F.interpolate = ONNX Resize, and nn.Upsample), skip concat."""

    def __init__(self):
        super().__init__()
        self.enc = cbr(3, 8)
        self.down = cbr(8, 16, stride=2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = cbr(24, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e = self.enc(x)
        d = self.down(e)
        u = F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False)
        x = self.dec(torch.cat([e, u + self.up(d)], 1))
        return self.head(x)


class PReLUNet(nn.Module):
    """Per-channel PReLU slopes follow their channels; a shared slope is element-wise."""

    def __init__(self):
        super().__init__()
        self.a, self.pa = nn.Conv2d(3, 8, 3, padding=1), nn.PReLU(8)
        self.b, self.pb = nn.Conv2d(8, 16, 3, padding=1), nn.PReLU()
        self.head = nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.pa.weight.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.head(self.pb(self.b(self.pa(self.a(x)))))


FIXTURES = {
    "chain": (ConvChain, (1, 3, 8, 8)),
    "residual": (Residual, (1, 3, 8, 8)),
    "concat": (Concat, (1, 3, 8, 8)),
    "grouped": (Grouped, (1, 3, 8, 8)),
    "depthwise": (Depthwise, (1, 3, 8, 8)),
    "se": (SqueezeExcite, (1, 3, 8, 8)),
    "flatten": (FlattenLinear, (1, 3, 8, 8)),
    "flatten_literal": (lambda: FlattenLinear(literal=True), (1, 3, 8, 8)),
    "decoder": (Decoder, (1, 3, 8, 8)),
    "split": (SplitChunk, (1, 3, 8, 8)),
    "slice": (Slice, (1, 3, 8, 8)),
    "unet": (UNet, (1, 3, 8, 8)),
    "prelu": (PReLUNet, (1, 3, 8, 8)),
}

# Out-channels (conv) / out-features (linear) after prune-channels{ratio=0.5}; heads feeding the
# graph output keep theirs. Grouped convs keep whole groups.
EXPECTED = {
    "chain": {"a.0": 4, "b.0": 8, "c.0": 6, "head": 4, "head.in": 6},
    "residual": {"stem.0": 4, "block1.conv1": 8, "block1.conv2": 8, "block1.downsample.0": 8,
                 "block2.conv1": 8, "block2.conv2": 8, "head.in": 8},
    "concat": {"stem.0": 4, "b1.0": 2, "b2.0": 3, "b3.0": 1, "dense.0": 2, "dense.0.in": 6,
               "head.in": 8},
    "grouped": {"a.0": 8, "g.0": 8, "g.0.groups": 2, "c.0": 4, "head.in": 4},
    "depthwise": {"a.0": 4, "dw1.0": 4, "dw1.0.groups": 4, "pw1.0": 6, "dw2.0": 12,
                  "dw2.0.groups": 6, "pw2.0": 4, "head.in": 4},
    "se": {"a.0": 8, "fc1": 2, "fc2": 8, "b.0": 4, "head.in": 4},
    "flatten": {"a.0": 4, "b.0": 4, "fc1": 16, "fc1.in": 64, "fc2": 5},
    "flatten_literal": {"a.0": 4, "b.0": 4, "fc1": 16, "fc1.in": 64, "fc2": 5},
    "decoder": {"enc.0": 8, "up1": 4, "up2": 4, "up2.groups": 1, "head.in": 4},
    "split": {"a.0": 8, "p.0": 4, "b.0": 6, "q": 3, "r": 3, "head.in": 6},
    "slice": {"a.0": 8, "b.in": 6},
    "prelu": {"a": 4, "pa": 4, "b": 8, "head.in": 8},
    "unet": {"enc.0": 4, "down.0": 8, "dec.0": 4, "dec.0.in": 12, "head.in": 4},  # a.0: 4 unread channels (2 kept) + 12 read (6 kept)
}


def build(name: str, seed: int = 0) -> Graph:
    ctor, shape = FIXTURES[name]
    torch.manual_seed(seed)
    model = _init(ctor(), seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return Graph.from_torch(model, (x,), name=name)


def channels_of(graph: Graph, key: str) -> int:
    """``"mod"`` -> out channels/features, ``"mod.in"`` -> in, ``"mod.groups"`` -> groups."""
    path, _, what = key.rpartition(".")
    if what not in ("in", "groups"):
        path, what = key, "out"
    mod = graph.gm.get_submodule(path.replace(".", "_")) if _flat(graph, path) else graph.gm.get_submodule(path)
    if what == "groups":
        return mod.groups
    if isinstance(mod, nn.Linear):
        return mod.in_features if what == "in" else mod.out_features
    if isinstance(mod, nn.PReLU):
        return mod.num_parameters
    w = mod.weight
    if isinstance(mod, nn.modules.conv._ConvTransposeNd):
        return w.shape[0] if what == "in" else w.shape[1] * mod.groups
    return w.shape[1] * mod.groups if what == "in" else w.shape[0]


def _flat(graph: Graph, path: str) -> bool:
    try:
        graph.gm.get_submodule(path)
        return False
    except AttributeError:
        return True


def zeroed(graph: Graph, removed: dict[str, dict[str, list[int]]]) -> Graph:
    """The oracle: a copy of the UNPRUNED graph whose removed channels output exactly zero.

    Producers (conv, conv-transpose, linear; grouped ones too) get zero filters and bias at the
    removed out-channels; batch norms get zero beta and running mean there, so BN(0) = 0.
    Everything between a producer and its consumers maps 0 to 0 (ReLU, pooling, add, concat,
    x * s), so the consumers see zeros exactly where the pruned graph has no channel.
    """
    out = graph.copy()
    targets = {n.name: n.target for n in out.nodes if n.op == "call_module"}
    with torch.no_grad():
        for node, entry in removed.items():
            if "out" not in entry or node not in targets:
                continue
            mod, idx = out.gm.get_submodule(targets[node]), torch.tensor(entry["out"])
            if isinstance(mod, nn.PReLU):  # PReLU(0) = 0 already
                continue
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.bias[idx] = 0.0
                mod.running_mean[idx] = 0.0
            elif isinstance(mod, nn.modules.conv._ConvTransposeNd):
                g = mod.groups
                w = mod.weight.view(g, mod.weight.shape[0] // g, mod.weight.shape[1], -1)
                per = mod.weight.shape[1]
                for i in idx.tolist():
                    w[i // per, :, i % per] = 0.0
            else:
                mod.weight[idx] = 0.0
            if not isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.bias is not None:
                mod.bias[idx] = 0.0
    return out


def max_rel(a: Graph, b: Graph, x: torch.Tensor) -> float:
    ra, rb = a.run(x), b.run(x)
    return max(float(np.abs(p - q).max() / (np.abs(p).max() + 1e-12)) for p, q in zip(ra, rb, strict=True))


# ------------------------------------------------------------------------- random graphs
class RandomNet(nn.Module):
    """A seeded composition of the pieces above: plain, residual, concat, grouped, depthwise,
    squeeze-excite and split stages with random widths (multiples of 4)."""

    KINDS = ("plain", "residual", "concat", "grouped", "depthwise", "se", "split")

    def __init__(self, seed: int, n_stages: int = 4):
        super().__init__()
        rng = random.Random(seed)
        c = rng.choice((8, 12, 16))
        self.stem = cbr(3, c)
        self.kinds, self.stages = [], nn.ModuleList()
        for _ in range(n_stages):
            kind = rng.choice(self.KINDS)
            stage, c = self._stage(kind, c, rng)
            self.kinds.append(kind)
            self.stages.append(stage)
        self.head = nn.Conv2d(c, 4, 1)

    @staticmethod
    def _stage(kind, c, rng):
        w = rng.choice((8, 12, 16))
        if kind == "plain":
            return nn.ModuleDict({"a": cbr(c, w)}), w
        if kind == "residual":
            return nn.ModuleDict({"a": cbr(c, c), "b": cbr(c, c)}), c
        if kind == "concat":
            return nn.ModuleDict({"a": cbr(c, 4), "b": cbr(c, w)}), 4 + w
        if kind == "grouped":
            return nn.ModuleDict({"a": cbr(c, 16), "g": cbr(16, 16, groups=4)}), 16
        if kind == "depthwise":
            return nn.ModuleDict({"dw": cbr(c, c, groups=c), "pw": cbr(c, w, 1)}), w
        if kind == "se":
            return nn.ModuleDict({"fc1": nn.Linear(c, 4), "fc2": nn.Linear(4, c)}), c
        return nn.ModuleDict({"a": cbr(c, 8), "p": cbr(4, 4)}), 8

    def forward(self, x):
        x = self.stem(x)
        for kind, st in zip(self.kinds, self.stages, strict=True):
            if kind == "plain":
                x = st["a"](x)
            elif kind == "residual":
                x = F.relu(x + st["b"](st["a"](x)))
            elif kind == "concat":
                x = torch.cat([st["a"](x), st["b"](x)], 1)
            elif kind == "grouped":
                x = st["g"](st["a"](x))
            elif kind == "depthwise":
                x = st["pw"](st["dw"](x))
            elif kind == "se":
                s = torch.sigmoid(st["fc2"](F.relu(st["fc1"](F.adaptive_avg_pool2d(x, 1).flatten(1)))))
                x = x * s.view(-1, s.shape[1], 1, 1)
            else:
                u, v = st["a"](x).chunk(2, dim=1)
                x = torch.cat([st["p"](u), v], 1)
        return self.head(x)


def random_graph(seed: int) -> Graph:
    torch.manual_seed(seed)
    model = _init(RandomNet(seed), seed)
    x = torch.randn((1, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    return Graph.from_torch(model, (x,), name=f"random{seed}")
