import torch
from torch import fx, nn

from slimgraph.ir import Graph
from slimgraph.zoo.models import DigitsCNN
from tests.passes.helpers import max_rel_err, module_types, run_pass


def constant_subgraph_graph(rand: bool = False) -> Graph:
    """x @ relu(w.t() * scale) with w, scale stored: what ONNX initializer math looks like."""
    root = nn.Module()
    root.register_buffer("w", torch.randn(4, 6))
    root.register_buffer("scale", torch.tensor(2.0))
    g = fx.Graph()
    x = g.placeholder("x")
    w, scale = g.get_attr("w"), g.get_attr("scale")
    if rand:
        wt = g.call_method("t", (g.call_function(torch.rand_like, (w,)),))
    else:
        wt = g.call_function(torch.relu, (g.call_function(torch.mul, (g.call_method("t", (w,)), scale)),))
    out = g.call_function(torch.matmul, (x, wt))
    g.output(out)
    return Graph(fx.GraphModule(root, g), (torch.randn(2, 6),))


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x):
        unused = self.conv(x) * 3  # noqa: F841 - dead on purpose
        y = self.ident(self.drop(self.conv(x))).contiguous()
        y = torch.nn.functional.dropout(y, 0.1, training=False)
        return y.mean((2, 3))


def test_cleanup_removes_noops_and_dead_code():
    x = torch.randn(2, 3, 8, 8)
    g = Graph.from_torch(Noisy(), (x,))
    res = run_pass("cleanup", g)
    assert res.changed
    assert module_types(res.graph) == ["Conv2d"]
    targets = {str(n.target) for n in res.graph.nodes}
    assert "contiguous" in targets and not any("dropout" in t for t in targets)
    assert max_rel_err(g, res.graph, x) == 0.0


class Shuffle(nn.Module):
    """ShuffleNet v2's channel shuffle: the view after the transpose needs the contiguous."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        return y


def test_cleanup_keeps_contiguous_before_view():
    x = torch.randn(2, 4, 5, 5)
    g = Graph.from_torch(Shuffle(), (x,))
    res = run_pass("cleanup", g)
    assert not res.changed
    assert "contiguous" in {str(n.target) for n in res.graph.nodes}
    res.graph.verify()


def test_cleanup_keeps_impure_dead_nodes_and_reports_them():
    class SideEffect(nn.Module):
        def forward(self, x):
            torch._assert(x.shape[0] > 0, "non-empty")  # impure: kept
            return x + 1

    g = Graph.from_torch(SideEffect(), (torch.randn(2, 3),))
    res = run_pass("cleanup", g)
    assert not res.changed
    assert any("side effects" in s.reason for s in res.skipped)


def test_const_fold_folds_constant_subgraphs_exactly():
    g = constant_subgraph_graph()
    res = run_pass("const-fold", g)
    assert res.changed and res.stats["nodes_folded"] == 1
    ops = [n.op for n in res.graph.nodes]
    assert ops == ["placeholder", "get_attr", "call_function", "output"]
    assert max_rel_err(g, res.graph, torch.randn(3, 6)) == 0.0


def test_const_fold_declines_random_ops():
    g = constant_subgraph_graph(rand=True)
    res = run_pass("const-fold", g)
    assert not res.changed and "random" in res.skipped[0].reason


def test_idempotent():
    for spec, g in (("cleanup", Graph.from_torch(Noisy(), (torch.randn(1, 3, 8, 8),))),
                    ("const-fold", constant_subgraph_graph())):
        once = run_pass(spec, g)
        twice = run_pass(spec, once.graph)
        assert once.changed and not twice.changed


def test_no_change_on_a_clean_model():
    g = Graph.from_torch(DigitsCNN(), (torch.randn(1, 1, 16, 16),))
    res = run_pass("cleanup", g)
    assert res.changed  # DigitsCNN has a Dropout
    assert not run_pass("const-fold", g).changed
