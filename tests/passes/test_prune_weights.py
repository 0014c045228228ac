"""prune-weights: exact counts, method semantics, masks in the IR, declines, idempotence."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimgraph.errors import PassConfigError
from slimgraph.ir.analysis import Cost
from slimgraph.ir.graph import Graph
from slimgraph.passes import PassManager, VerifyInstrument, parse_pipeline
from slimgraph.passes.context import PassContext
from slimgraph.passes.masks import apply_masks, get_mask, masked_modules
from slimgraph.passes.prune_weights import NOTE, PruneWeights, obs_prune


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.relu(self.pw(torch.relu(self.dw(x))))
        return self.fc(x.mean(dim=(2, 3)))


LAYERS = ("conv", "dw", "pw", "fc")


def _graph(seed: int = 0) -> Graph:
    torch.manual_seed(seed)
    return Graph.from_torch(SmallCNN(), (torch.randn(1, 3, 8, 8),))


def _am(graph: Graph, n: int = 3, **kw) -> PassContext:
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, *graph.example_inputs[0].shape[1:], generator=gen),) for _ in range(n)]
    return PassContext(calib, reference=graph, **kw)


def _run(spec: str, graph: Graph, am: PassContext | None = None):
    return parse_pipeline(spec)[0].run(graph, am or _am(graph))


def _mod(graph: Graph, name: str) -> nn.Module:
    return graph.gm.get_submodule(name)


def _linear(d_in: int, d_out: int, bias: bool = True, weight: torch.Tensor | None = None) -> Graph:
    """A one-Linear graph (wrapped in Sequential so that fx keeps the module)."""
    g = Graph.from_torch(nn.Sequential(nn.Linear(d_in, d_out, bias=bias)), (torch.randn(1, d_in),))
    if weight is not None:
        with torch.no_grad():
            _mod(g, "0").weight.copy_(weight)
    return g


# ------------------------------------------------------------------------ exact counts
@pytest.mark.parametrize("method", ["magnitude", "obd", "obs"])
def test_layer_scope_prunes_exact_count_per_layer(method):
    g = _graph()
    res = _run(f"prune-weights{{method={method},sparsity=0.5}}", g)
    assert res.changed and not res.skipped
    for name in LAYERS:
        mod = _mod(res.graph, name)
        n = mod.weight.numel()
        mask = get_mask(mod)
        assert int((~mask).sum()) == round(0.5 * n)
        assert torch.all(mod.weight[~mask] == 0)
        assert res.stats["layer_sparsity"][name] == pytest.approx(round(0.5 * n) / n)


@pytest.mark.parametrize("method", ["magnitude", "obd", "obs"])
def test_global_scope_prunes_exact_total(method):
    g = _graph()
    res = _run(f"prune-weights{{method={method},sparsity=0.6,scope=global}}", g)
    total = sum(_mod(g, n).weight.numel() for n in LAYERS)
    pruned = sum(int((~get_mask(_mod(res.graph, n))).sum()) for n in LAYERS)
    assert pruned == round(0.6 * total)
    assert res.stats["sparsity"] == pytest.approx(pruned / total, abs=1e-6)
    assert len(set(res.stats["layer_sparsity"].values())) > 1  # global: layers differ


def test_magnitude_prunes_the_smallest_weights_and_leaves_input_alone():
    g = _graph()
    before = {n: _mod(g, n).weight.detach().clone() for n in LAYERS}
    res = _run("prune-weights{sparsity=0.7}", g)
    for name in LAYERS:
        mask = get_mask(_mod(res.graph, name))
        mag = before[name].abs()
        assert mag[~mask].max() <= mag[mask].min()
        assert torch.equal(_mod(g, name).weight, before[name])  # input graph untouched
        assert get_mask(_mod(g, name)) is None
        assert torch.equal(_mod(res.graph, name).weight[mask], before[name][mask])


def test_global_magnitude_uses_one_threshold():
    g = _graph()
    res = _run("prune-weights{sparsity=0.5,scope=global}", g)
    kept = torch.cat([_mod(g, n).weight.abs()[get_mask(_mod(res.graph, n))] for n in LAYERS])
    gone = torch.cat([_mod(g, n).weight.abs()[~get_mask(_mod(res.graph, n))] for n in LAYERS])
    assert gone.max() <= kept.min()


def test_cap_keeps_weights_in_every_layer_and_is_reported():
    g = _graph()
    res = _run("prune-weights{sparsity=0.999}", g)
    for name in LAYERS:
        assert get_mask(_mod(res.graph, name)).sum() >= 1
    assert set(res.stats["capped"]) == set(LAYERS)
    assert all(v < 1 for v in res.stats["capped"].values())


# ------------------------------------------------------------------------ OBD / OBS
def test_obd_with_identity_like_hessian_equals_magnitude():
    torch.manual_seed(3)
    g = _linear(16, 12)
    am = PassContext([(3.0 * torch.eye(16),)], reference=g)  # X X^T / n = 9/16 * I
    obd = _run("prune-weights{method=obd,sparsity=0.6}", g, am).graph
    mag = _run("prune-weights{method=magnitude,sparsity=0.6}", g, am).graph
    assert torch.equal(get_mask(_mod(obd, "0")), get_mask(_mod(mag, "0")))


def test_obd_prefers_weights_on_quiet_inputs():
    g = _linear(4, 1, bias=False, weight=torch.tensor([[1.0, 1.0, 0.5, 0.5]]))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 1, 1, 1])
    res = _run("prune-weights{method=obd,sparsity=0.25}", g, PassContext([(x,)]))
    assert get_mask(_mod(res.graph, "0")).tolist() == [[False, True, True, True]]  # magnitude: col 2 or 3


def _correlated_inputs(d: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=gen) / d**0.5 + torch.eye(d)
    return torch.randn(n, d, generator=gen) @ mix  # strongly correlated columns


def test_obs_compensation_lowers_reconstruction_error():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=gen, dtype=torch.float64)
    x = _correlated_inputs(40, 400).double()
    h = 2 * x.T @ x / len(x)
    h += 0.01 * h.diagonal().mean() * torch.eye(40, dtype=torch.float64)
    keep = torch.ones_like(w, dtype=torch.bool)
    k = round(0.5 * w.numel())

    def err(w2):
        return ((x @ (w2 - w).T) ** 2).mean().item()

    w_comp, m_comp = obs_prune(w, h, keep, k, compensate=True, block=16)
    w_plain, m_plain = obs_prune(w, h, keep, k, compensate=False, block=16)
    assert int((~m_comp).sum()) == int((~m_plain).sum()) == k
    assert torch.all(w_comp[~m_comp] == 0)
    assert err(w_comp) < 0.8 * err(w_plain)
    # Same mask, no update, is worse too: the update is what lowers the error.
    assert err(w_comp) < err(w * m_comp)


def test_obs_pass_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    g = _linear(32, 16, bias=False)
    x = _correlated_inputs(32, 256)
    am = PassContext([(x[:128],), (x[128:],)])
    ref = g.gm(x).detach()
    errs = {m: ((_run(f"prune-weights{{method={m},sparsity=0.5}}", g, am).graph.gm(x) - ref) ** 2)
            .mean().item() for m in ("magnitude", "obd", "obs")}
    assert errs["obs"] < errs["obd"] and errs["obs"] < errs["magnitude"]


def test_obs_prunes_weights_on_dead_inputs_first():
    g = _linear(8, 4, bias=False)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0.0  # an input that is always zero (e.g. a dead ReLU channel)
    res = _run("prune-weights{method=obs,sparsity=0.125}", g, PassContext([(x,)]))
    mask = get_mask(_mod(res.graph, "0"))
    assert not mask[:, 2].any() and int((~mask).sum()) == 4
    torch.testing.assert_close(res.graph.gm(x), g.gm(x))  # free: outputs unchanged


@pytest.mark.slow
# ------------------------------------------------------------------------ DNS
def test_dns_splices_back_a_wrongly_pruned_connection():
    true_w = torch.tensor([[1.0, 0.9, 0.8, 0.7], [0.75, 0.85, 0.95, 0.0]])
    start = true_w.clone()
    start[0, 0] = 0.01  # important but small at the start: magnitude pruning removes it
    start[1, 3] = 0.05
    teacher = _linear(4, 2, bias=False, weight=true_w)
    student = _linear(4, 2, bias=False, weight=start)
    gen = torch.Generator().manual_seed(0)
    am = PassContext([(torch.randn(32, 4, generator=gen),) for _ in range(4)], reference=teacher)
    one_shot = get_mask(_mod(_run("prune-weights{sparsity=0.25}", student, am).graph, "0"))
    assert not one_shot[0, 0]
    res = _run("prune-weights{method=dns,sparsity=0.25,retrain_steps=200,lr=0.02}", student, am)
    mask = get_mask(_mod(res.graph, "0"))
    assert mask[0, 0] and not mask[1, 3]
    assert int((~mask).sum()) == 2
    assert res.stats["dns_revived"] >= 1


# ------------------------------------------------------------------------ masks in the IR
def test_masks_survive_training_deepcopy_and_export():
    g = _graph()
    res = _run("prune-weights{method=obs,sparsity=0.6}", g)
    gm = copy.deepcopy(res.graph.gm)
    assert set(masked_modules(gm)) == set(LAYERS)
    assert all(get_mask(m).slimgraph_bits == 0 for m in masked_modules(gm).values())
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    loss = gm(torch.randn(4, 3, 8, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    assert any(torch.any(m.weight[~get_mask(m)] != 0) for m in masked_modules(gm).values())
    assert apply_masks(gm) == len(LAYERS)
    for m in masked_modules(gm).values():
        assert torch.all(m.weight[~get_mask(m)] == 0)
    x = res.graph.example_inputs[0]
    ep = torch.export.export(res.graph.gm, (x,))
    exported = dict(ep.named_parameters())
    assert torch.all(exported["fc.weight"][~res.graph.gm.fc.weight_mask] == 0)
    torch.testing.assert_close(ep.module()(x), res.graph.gm(x))
    res.graph.verify()


def test_stats_report_sizes_note_and_effective_macs():
    g = _graph()
    am = _am(g)
    res = _run("prune-weights{sparsity=0.8}", g, am)
    st = res.stats
    assert st["note"] == NOTE
    assert st["sparse_weight_bytes"] < st["dense_weight_bytes"]
    assert st["csr_weight_bytes"] < st["dense_weight_bytes"]
    dense_macs = am.analyses.get(Cost, g).macs
    assert am.analyses.get(Cost, res.graph).macs == dense_macs  # the cost analysis stays dense
    assert st["macs_effective"] < dense_macs
    assert am.analyses.get(Cost, res.graph).weight_bytes == am.analyses.get(Cost, g).weight_bytes


@pytest.mark.slow
def test_through_pass_manager_with_retraining_and_dsd():
    g = _graph()
    passes = parse_pipeline("prune-weights{sparsity=0.5,iterations=2,retrain_steps=3}")
    out, records = PassManager(passes, [VerifyInstrument()]).run(g, _am(g))
    assert records[0].changed and records[0].stats["schedule"][-1] == 0.5
    assert records[0].stats["layer_sparsity"]["fc"] == 0.5
    assert records[0].stats["training_loss"] == "mse-to-reference"
    for m in masked_modules(out.gm).values():
        assert torch.all(m.weight[~get_mask(m)] == 0)
    dsd = _run("prune-weights{sparsity=0.5,retrain_steps=3,dsd=true}", g)
    assert not masked_modules(dsd.graph.gm) and dsd.stats["sparsity"] == 0


@pytest.mark.slow
def test_labels_switch_training_to_cross_entropy():
    g = _graph()
    am = _am(g, n=2, labels=[torch.randint(0, 10, (16,)) for _ in range(2)])
    res = _run("prune-weights{sparsity=0.5,retrain_steps=2}", g, am)
    assert res.stats["training_loss"] == "cross-entropy"


# ------------------------------------------------------------------------ declines
def test_declines_large_obs_layers_and_small_layers():
    g = _graph()
    res = _run("prune-weights{method=obs,sparsity=0.5,obs_max_dim=20,min_params=100}", g)
    reasons = {s.node: s.reason for s in res.skipped}
    assert set(reasons) == {"conv", "dw"}
    assert "input dimension 27 > obs_max_dim=20" in reasons["conv"]  # 3 * 3 * 3
    assert "72 weights < min_params=100" in reasons["dw"]
    assert get_mask(_mod(res.graph, "conv")) is None and get_mask(_mod(res.graph, "dw")) is None
    assert set(res.stats["layer_sparsity"]) == {"pw", "fc"}


def test_obd_declines_layers_it_cannot_unfold():
    g = Graph.from_torch(nn.Sequential(nn.Conv3d(1, 2, 3), nn.Flatten(), nn.Linear(2, 3)),
                         (torch.randn(1, 1, 3, 3, 3),))
    res = _run("prune-weights{method=obd,sparsity=0.5}", g)
    assert [s.node for s in res.skipped] == ["_0"] and "Conv3d" in res.skipped[0].reason
    mag = _run("prune-weights{method=magnitude,sparsity=0.5}", g)
    assert not mag.skipped and get_mask(mag.graph.gm.get_submodule("0")) is not None


def test_layers_glob_selects_layers():
    res = _run("prune-weights{sparsity=0.5,layers=fc}", _graph())
    assert set(masked_modules(res.graph.gm)) == {"fc"}


# ------------------------------------------------------------------------ idempotence
@pytest.mark.parametrize("spec", [
    "prune-weights{sparsity=0.5}",
    "prune-weights{sparsity=0.7,scope=global}",
    "prune-weights{method=obs,sparsity=0.6,scope=global}",
    "prune-weights{method=obd,sparsity=0.6,iterations=2,retrain_steps=2}",
    "prune-weights{method=dns,sparsity=0.5,retrain_steps=3}",
])
def test_second_run_changes_nothing(spec):
    g = _graph()
    am = _am(g)
    first = _run(spec, g, am)
    second = _run(spec, first.graph, am)
    assert first.changed and not second.changed and second.graph is first.graph
    assert second.stats["sparsity"] == first.stats["sparsity"]


def test_higher_sparsity_extends_existing_mask():
    g = _graph()
    first = _run("prune-weights{sparsity=0.4}", g).graph
    second = _run("prune-weights{method=obd,sparsity=0.7}", first).graph
    for name in LAYERS:
        m1, m2 = get_mask(_mod(first, name)), get_mask(_mod(second, name))
        assert not torch.any(m2 & ~m1)  # pruned weights stay pruned


# ------------------------------------------------------------------------ config
@pytest.mark.parametrize("spec", [
    "prune-weights{sparsity=1.5}", "prune-weights{sparsity=1.0}", "prune-weights{sparsity=-0.1}",
    "prune-weights{method=random}", "prune-weights{scope=net}", "prune-weights{iterations=0}",
    "prune-weights{method=dns}", "prune-weights{dsd=true}", "prune-weights{lr=0}",
    "prune-weights{min_params=-1}", "prune-weights{bogus=1}",
])
def test_config_errors(spec):
    with pytest.raises(PassConfigError):
        parse_pipeline(spec)


def test_pass_is_not_exact_and_spec_round_trips():
    p = PruneWeights(method="obs", sparsity=0.7)
    assert not p.exact and p.spec() == "prune-weights{method=obs,sparsity=0.7}"
    assert parse_pipeline(p.spec())[0] == p


def test_sensitivity_chart_has_one_rising_curve_per_layer():
    g = _graph()
    res = _run("prune-weights{sparsity=0.5}", g)
    curves = res.sensitivity.curves
    assert set(curves) == set(masked_modules(res.graph.gm))
    for pts in curves.values():
        assert [x for x, _ in pts] == [0.25, 0.5, 0.75, 0.9, 0.95]
        assert pts[-1][1] >= pts[0][1] > 0  # pruning more of a layer costs more fidelity
    assert res.sensitivity.x.startswith("sparsity")
    # probing left the input graph's weights alone
    assert all(get_mask(m) is None for _, m in g.gm.named_modules())
    assert not _run("prune-weights{sparsity=0.5,sensitivity=false}", g).extra
