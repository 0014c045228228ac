"""The channel_groups analysis: coupling, index mappings and blocking, on seeded fixtures."""

import torch
from torch import nn

from slimgraph.ir import Graph
from slimgraph.ir.analysis import AnalysisManager, Channels
from tests.passes.prune_fixtures import build


def groups(graph):
    return AnalysisManager().get(Channels, graph)


def group_with(cg, producer):
    (g,) = [g for g in cg.groups if producer in {p.node for p in g.producers}]
    return g


def test_residual_couples_every_add_operand_and_the_downsample():
    cg = groups(build("residual"))
    g = group_with(cg, "block1_conv2")
    assert {p.node for p in g.producers} == {"block1_conv2", "block1_downsample_0", "block2_conv2"}
    assert {p.node for p in g.consumers} == {"block2_conv1", "head"}
    assert g.size == 16 and g.blocked is None
    assert group_with(cg, "stem_0").size == 8  # the downsample decouples the stem
    assert {d["kind"] for _, _, d in cg.graph.edges(data=True)} >= {"identity"}


def test_concat_offsets_map_inputs_into_the_output():
    cg = groups(build("concat"))
    for producer, offset, n in (("b1_0", 0, 4), ("b2_0", 4, 6), ("b3_0", 10, 2)):
        g = group_with(cg, producer)
        assert g.size == n
        assert g.spaces["cat"] == tuple((offset + i,) for i in range(n))
        # the dense concat places the first concat at offset 0 of the second
        assert g.spaces["cat_1"] == tuple((offset + i,) for i in range(n))
    g = group_with(cg, "dense_0")
    assert g.spaces["cat_1"] == tuple((12 + i,) for i in range(4))
    assert {d["offset"] for _, _, d in cg.graph.edges(data=True) if d["kind"] == "index"} == {0, 4, 10, 12}


def test_grouped_conv_units_are_whole_groups():
    cg = groups(build("grouped"))
    g = group_with(cg, "g_0")
    assert "a_0" in {p.node for p in g.producers} and g.size == 4
    assert g.spaces["a_0"] == tuple(tuple(range(4 * k, 4 * k + 4)) for k in range(4))
    assert any(d["kind"] == "group" and d["groups"] == 4 for _, _, d in cg.graph.edges(data=True))


def test_depthwise_is_one_to_one_and_multiplier_maps_one_to_two():
    cg = groups(build("depthwise"))
    g = group_with(cg, "dw1_0")
    assert {p.node for p in g.producers} == {"a_0", "dw1_0"} and g.size == 8
    assert g.spaces["dw1_0"] == tuple((i,) for i in range(8))
    g = group_with(cg, "dw2_0")
    assert g.size == 12 and g.spaces["dw2_0"][3] == (6, 7) and g.spaces["pw1_0"][3] == (3,)


def test_se_scale_is_coupled_with_the_features_it_scales():
    cg = groups(build("se"))
    g = group_with(cg, "a_0")
    assert {p.node for p in g.producers} == {"a_0", "fc2"}
    assert {p.node for p in g.consumers} == {"fc1", "b_0"}
    assert group_with(cg, "fc1").size == 4


def test_flatten_maps_each_channel_to_hw_linear_columns():
    cg = groups(build("flatten"))
    g = group_with(cg, "b_0")
    (port,) = [p for p in g.consumers if p.node == "fc1"]
    assert port.units[1] == tuple(range(16, 32))
    assert any(d["kind"] == "expand" and d["factor"] == 16 for _, _, d in cg.graph.edges(data=True))


def test_split_chunk_and_slice_offsets():
    cg = groups(build("split"))
    a = [g for g in cg.groups if "a_0" in {p.node for p in g.producers}]
    assert sorted(g.size for g in a) == [8, 8]  # chunk halves are independent groups
    b = [g for g in cg.groups if "b_0" in {p.node for p in g.producers}]
    assert sorted(g.size for g in b) == [4, 8]
    cg = groups(build("slice"))
    (read,) = [g for g in cg.groups if any(p.node == "b" for p in g.consumers)]
    assert read.spaces["a_0"] == tuple((4 + i,) for i in range(12))


def test_transposed_conv_and_grouped_transposed():
    cg = groups(build("decoder"))
    assert group_with(cg, "enc_0").size == 16
    g = group_with(cg, "up2")
    assert {p.node for p in g.producers} == {"up1", "up2"} and g.size == 2  # 2 conv groups


def test_graph_input_and_output_block_with_reasons():
    cg = groups(build("chain"))
    assert "graph input" in cg.groups[0].blocked
    (head,) = [g for g in cg.groups if "head" in {p.node for p in g.producers}]
    assert "graph output" in head.blocked and "output" in head.blocked
    assert {b.op for b in cg.blocks} == {"placeholder", "output"}


class Roll(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(self.b(torch.roll(self.a(x), 1, dims=1)))


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return self.b(x)


def test_unknown_ops_block_their_groups_and_are_named():
    cg = groups(Graph.from_torch(Roll(), (torch.randn(1, 3, 10, 10),)))
    (roll,) = [b for b in cg.blocks if b.op == "roll"]
    assert roll.node == "roll" and "not understood" in roll.reason and roll.groups
    assert "roll" in group_with(cg, "a").blocked
    assert group_with(cg, "b").blocked is None  # past the roll, b's own channels are fine
    cg = groups(Graph.from_torch(Shuffle(), (torch.randn(1, 3, 6, 6),)))
    g = group_with(cg, "a")
    assert g.blocked and "view" in g.blocked and any(b.op == ".view()" for b in cg.blocks)


def test_shared_module_couples_its_call_sites():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.s, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(16, 2, 1)

        def forward(self, x):
            return self.c(torch.cat([self.s(self.a(x)), self.s(self.b(x))], 1))

    cg = groups(Graph.from_torch(Twice(), (torch.randn(1, 3, 4, 4),)))
    assert {p.node for p in group_with(cg, "a").producers} == {"a", "b"}
