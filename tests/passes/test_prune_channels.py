"""prune-channels: exact channel counts, the zeroed-channel oracle, ONNX, declines, options."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import Channels, Cost
from slimgraph.passes import PassManager, VerifyInstrument, parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.zoo.models import resnet18
from tests.ir.test_channels import Roll, Shuffle
from tests.passes.prune_fixtures import (
    EXPECTED,
    FIXTURES,
    build,
    channels_of,
    max_rel,
    random_graph,
    zeroed,
)


def prune(graph, spec="prune-channels{ratio=0.5}", am=None):
    (p,) = parse_pipeline(spec)
    am = am or PassContext(reference=graph)
    return p.run(graph, am), am


def batch(graph, n=3, seed=1):
    return torch.randn((n, *graph.example_inputs[0].shape[1:]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_channel_counts_and_zeroed_oracle(name):
    g = build(name)
    res, am = prune(g)
    assert res.changed
    res.graph.verify()
    got = {k: channels_of(res.graph, k) for k in EXPECTED[name]}
    assert got == EXPECTED[name]
    # the oracle: the unpruned graph with the removed channels zeroed gives the same outputs
    assert max_rel(zeroed(g, res.extra["removed"]), res.graph, batch(g)) < 1e-5
    assert am.analyses.get(Cost, res.graph).macs < am.analyses.get(Cost, g).macs
    assert am.analyses.get(Cost, res.graph).params < am.analyses.get(Cost, g).params
    assert g.run(batch(g))[0].shape == res.graph.run(batch(g))[0].shape
    for node, (before, after) in res.stats["channels"].items():
        assert after < before, node


@pytest.mark.parametrize("seed", range(5))
def test_random_graphs_exact_counts_and_oracle(seed):
    g = random_graph(seed)
    res, am = prune(g)
    cg = am.analyses.get(Channels, g)
    layers = {n.name: res.graph.gm.get_submodule(n.target) for n in res.graph.nodes if n.op == "call_module"}
    for grp in cg.prunable():
        for p in grp.producers:
            mod = layers[p.node]
            out = mod.out_features if isinstance(mod, nn.Linear) else mod.weight.shape[0]
            assert out == _expected_out(cg, p.space), p.node
    assert max_rel(zeroed(g, res.extra["removed"]), res.graph, batch(g)) < 1e-5


def _expected_out(cg, space):
    """ratio=0.5: each prunable group keeps size - size // 2 equal-sized units of ``space``."""
    total = 0
    for grp in cg.groups:
        if space in grp.spaces:
            pruned = grp.blocked is None and grp.size > 1
            keep = grp.size - grp.size // 2 if pruned else grp.size
            total += keep * len(grp.spaces[space][0])
    return total


@pytest.mark.parametrize("name", ["concat", "se", "flatten_literal", "split", "decoder", "grouped",
                                  "unet"])
def test_pruned_graph_exports_to_onnx_and_matches_onnxruntime(name, tmp_path):
    g = build(name)
    res, _ = prune(g)
    path = res.graph.to_onnx(tmp_path / f"{name}.onnx")
    x = batch(g)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    np.testing.assert_allclose(got, res.graph.run(x)[0], rtol=1e-4, atol=1e-5)
    assert path.stat().st_size < g.to_onnx(tmp_path / "orig.onnx").stat().st_size


def test_resnet18_width16_macs_and_oracle():
    g = Graph.from_torch(resnet18(num_classes=10, width=16), (torch.randn(1, 3, 32, 32),))
    res, am = prune(g)
    assert am.analyses.get(Cost, res.graph).macs < 0.35 * am.analyses.get(Cost, g).macs
    assert res.stats["channels"]["layer4_1_conv2"] == [128, 64]
    assert res.stats["in_channels"]["fc"] == [128, 64]
    assert max_rel(zeroed(g, res.extra["removed"]), res.graph, batch(g, 2)) < 1e-5


def test_unknown_op_blocks_its_groups_and_others_are_still_pruned():
    g = Graph.from_torch(Roll(), (torch.randn(1, 3, 10, 10),))
    res, _ = prune(g)
    assert res.changed
    assert any("roll" in s.reason for s in res.skipped)
    assert res.graph.gm.a.out_channels == 8  # blocked by the roll
    assert res.graph.gm.b.out_channels == 4  # after it: pruned
    assert max_rel(zeroed(g, res.extra["removed"]), res.graph, batch(g)) < 1e-5


def test_fully_blocked_model_is_unchanged_with_reasons():
    g = Graph.from_torch(Shuffle(), (torch.randn(1, 3, 6, 6),))
    res, _ = prune(g)
    assert not res.changed and res.graph is g
    reasons = " ".join(s.reason for s in res.skipped)
    assert "view" in reasons and "graph output" in reasons and "graph input" in reasons


@pytest.mark.parametrize("spec", [
    "prune-channels{ratio=1.0}", "prune-channels{ratio=-0.1}", "prune-channels{ratio=0.5,criterion=magic}",
    "prune-channels{ratio=0.5,min_channels=0}", "prune-channels", "prune-channels{ratio=0.5,target_macs=0.5}",
    "prune-channels{target_macs=0}", "prune-channels{ratio=0.5,round_to=0}",
])
def test_config_errors(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_ratio_zero_changes_nothing_and_min_channels_is_respected():
    g = build("chain")
    res, _ = prune(g, "prune-channels{ratio=0.0}")
    assert not res.changed
    res, _ = prune(g, "prune-channels{ratio=0.9,min_channels=4}")
    assert channels_of(res.graph, "a.0") == 4 and channels_of(res.graph, "b.0") == 4
    again, _ = prune(res.graph, "prune-channels{ratio=0.9,min_channels=4}")
    assert any("min_channels" in s.reason for s in again.skipped)
    assert channels_of(again.graph, "a.0") == 4 and channels_of(again.graph, "c.0") == 4


def test_round_to_and_exclude():
    g = build("chain")
    res, _ = prune(g, "prune-channels{ratio=0.7,round_to=4}")
    assert [channels_of(res.graph, k) for k in ("a.0", "b.0", "c.0")] == [4, 8, 4]
    res, _ = prune(g, "prune-channels{ratio=0.5,exclude='b_*'}")
    # an excluded layer is left alone entirely: its in-channels too (a's group is skipped)
    assert [channels_of(res.graph, k) for k in ("a.0", "b.0", "c.0")] == [8, 16, 6]
    assert any("excluded" in s.reason and "b_0" in s.reason for s in res.skipped)
    res, _ = prune(g, "prune-channels{ratio=0.5,exclude=c.0}")  # module target globs work too
    assert channels_of(res.graph, "c.0") == 12


def test_l1_and_bn_scale_keep_the_important_channels():
    g = build("chain")
    with torch.no_grad():
        g.gm.get_submodule("a.0").weight[[1, 5, 6, 7]] *= 100.0  # big filters
        g.gm.get_submodule("b.1").weight[[0, 3, 9, 12, 13, 14, 15, 2]] = 10.0  # big gammas
    res, _ = prune(g, "prune-channels{ratio=0.5,criterion=l1}")
    assert res.extra["removed"]["a_0"]["out"] == [0, 2, 3, 4]
    res, _ = prune(g, "prune-channels{ratio=0.5,criterion=bn_scale}")
    assert res.extra["removed"]["b_0"]["out"] == [1, 4, 5, 6, 7, 8, 10, 11]


def test_bn_scale_declines_groups_without_batch_norm():
    res, _ = prune(build("flatten"), "prune-channels{ratio=0.5,criterion=bn_scale}")
    assert any("no batch norm" in s.reason and "fc1" in s.node for s in res.skipped)
    assert "fc1" not in res.stats["channels"]


def test_taylor_and_reconstruction_beat_l1_on_fidelity():
    g = build("residual")
    x = batch(g, 8)
    err = {}
    for crit in ("l1", "taylor", "reconstruction"):
        res, _ = prune(g, f"prune-channels{{ratio=0.5,criterion={crit}}}")
        assert channels_of(res.graph, "block2.conv1") == 8
        ref, got = g.run(x)[0], res.graph.run(x)[0]
        err[crit] = float(np.linalg.norm(ref - got) / np.linalg.norm(ref))
    assert err["reconstruction"] < err["l1"]
    assert res.extra["refit"] and all(r["rel_err_after"] <= r["rel_err_before"] for r in res.extra["refit"].values())
    assert err["taylor"] < 1.5 * err["l1"]  # a data-driven ranking, not a disaster


def test_taylor_uses_labels_when_given():
    g = build("flatten")
    batches = [(batch(g, 8, seed=s),) for s in range(2)]
    labels = [torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    res, _ = prune(g, "prune-channels{ratio=0.5,criterion=taylor}",
                   PassContext(batches, labels=labels, reference=g))
    assert res.changed and channels_of(res.graph, "fc1") == 16


def test_target_macs_is_met_and_reports_sensitivity():
    g = build("residual")
    res, am = prune(g, "prune-channels{target_macs=0.6}")
    before, after = am.analyses.get(Cost, g).macs, am.analyses.get(Cost, res.graph).macs
    assert after <= 0.6 * before
    sens = res.extra["target_plan"]
    assert sens["macs_after"] == after and sens["groups"]
    for rows in sens["groups"].values():
        assert [r["keep"] for r in rows] == sorted((r["keep"] for r in rows), reverse=True)
        assert all(r["macs"] < before for r in rows)
    # the chart's curves: per group, pruned fraction rising, rel-L2 > 0 once anything is pruned
    curves = res.sensitivity.curves
    assert len(curves) == len(sens["groups"]) and res.sensitivity.x
    for pts in curves.values():
        xs = [x for x, _ in pts]
        assert xs == sorted(xs) and 0 < xs[0] and xs[-1] < 1
        assert all(y >= 0 for _, y in pts)


def test_through_the_pass_manager():
    g = build("concat")
    out, (record,) = PassManager(parse_pipeline("prune-channels{ratio=0.25}"), [VerifyInstrument()]).run(g)
    assert record.changed and record.stats["macs_after"] < record.stats["macs_before"]
    assert record.stats["channels"]["b2_0"] == [6, 5]
    assert "removed" in record.extra and "removed" in record.to_dict()


@pytest.mark.parametrize("spec", ["prune-channels{ratio=0.5}", "prune-channels{target_macs=0.6}"])
def test_running_it_twice_changes_nothing_more(spec):
    g = build("residual")
    first, am = prune(g, spec)
    assert first.changed
    second, _ = prune(first.graph, spec, PassContext(reference=first.graph))
    assert not second.changed and second.graph is first.graph
    assert "already pruned" in second.skipped[0].reason
    # a different setting is a new request and does prune further
    third, _ = prune(first.graph, "prune-channels{ratio=0.25}", PassContext(reference=first.graph))
    assert third.changed


class SameDict(nn.Module):
    """A consumer conv with padding="same" and a forward that returns a dict (both found by
    the fuzzer: the reconstruction criterion unfolded with a string padding, taylor indexed
    the dict)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding="same")
        self.b = nn.Conv2d(8, 8, 3, padding="same", dilation=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return {"logits": self.head(torch.relu(self.b(torch.relu(self.a(x))))), "aux": x.mean()}


@pytest.mark.parametrize("criterion", ["reconstruction", "taylor", "l1"])
def test_same_padding_consumer_and_dict_output(criterion):
    torch.manual_seed(0)
    g = Graph.from_torch(SameDict().eval(), (torch.randn(1, 3, 8, 8),))
    res, _ = prune(g, f"prune-channels{{ratio=0.5,criterion={criterion}}}")
    assert res.changed
    res.graph.verify()
    if criterion == "reconstruction":  # the next layer is refit: closer to the original than l1
        l1, _ = prune(g, "prune-channels{ratio=0.5,criterion=l1}")
        assert max_rel(g, res.graph, batch(g)) < max_rel(g, l1.graph, batch(g))
    else:
        assert max_rel(zeroed(g, res.extra["removed"]), res.graph, batch(g)) < 1e-5
