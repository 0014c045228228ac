"""The pass toolkit: capture, sensitivity, budget allocation, training; and a complete
data-driven example pass written with it in well under 100 lines."""

import contextlib
import functools
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch import nn

from slimgraph.ir import Graph
from slimgraph.passes import Pass, PassManager, PassResult, VerifyInstrument
from slimgraph.passes.context import PassContext
from slimgraph.passes.toolkit import (
    FidelityProbe,
    Hooks,
    Minibatches,
    Objective,
    Option,
    allocate_marginal,
    allocate_threshold,
    capture,
    measure,
    patches,
    stream,
    train,
)
from slimgraph.zoo.models import DigitsCNN


# ------------------------------------------------------------------ the example pass (44 lines)
@contextlib.contextmanager
def rounded(module: nn.Module, bits: int, keep: bool = False):
    """``module``'s weights rounded to ``bits`` (symmetric, per tensor) while inside."""
    w = module.weight
    saved = w.detach().clone()
    step = saved.abs().max() / (2 ** (bits - 1) - 1)
    with torch.no_grad():
        w.copy_(torch.round(saved / step) * step)
    try:
        yield
    finally:
        if not keep:
            with torch.no_grad():
                w.copy_(saved)


@dataclass(frozen=True)
class RoundWeights(Pass):
    """Per-layer weight bit-widths under a bit budget (a toolkit example, not a real quantizer)."""

    name: ClassVar[str] = "round-weights"
    exact: ClassVar[bool] = False
    budget: float = 0.25  # share of the float32 weight bits to keep
    choices: tuple[int, ...] = (2, 4, 8)

    def run(self, graph, ctx):
        out = graph.copy()
        layers = {n.name: out.gm.get_submodule(n.target) for n in out.nodes if n.op == "call_module"
                  and isinstance(out.gm.get_submodule(n.target), nn.Conv2d | nn.Linear)}
        probe = FidelityProbe(graph, ctx)
        sens = measure({name: [(b, m.weight.numel() * b, b, functools.partial(rounded, m, b))
                               for b in self.choices] for name, m in layers.items()},
                       lambda: probe.score(out.gm), x_label="bits", y_label="cosine")
        full = {name: m.weight.numel() * 32 for name, m in layers.items()}
        alloc = allocate_threshold(sens.options, full, sum(full.values()),
                                   self.budget * sum(full.values()))
        bits = {}
        for name, option in alloc.choice.items():
            if option is not None:
                with rounded(layers[name], option.setting, keep=True):
                    bits[name] = option.setting
        return PassResult(out, changed=bool(bits), stats={"bits": bits, "budget_met": alloc.met},
                          sensitivity=sens.report())


def test_example_pass_meets_its_budget_and_reports_sensitivity():
    torch.manual_seed(0)
    g = Graph.from_torch(DigitsCNN().eval(), (torch.randn(1, 1, 16, 16),))
    ctx = PassContext(calibration=[(torch.randn(16, 1, 16, 16),)], reference=g)
    out, (rec,) = PassManager([RoundWeights()], [VerifyInstrument()]).run(g, ctx)
    bits = rec.stats["bits"]
    assert rec.changed and rec.stats["budget_met"]
    sizes = {n.name: out.gm.get_submodule(n.target).weight.numel() for n in out.nodes
             if n.name in bits}
    total = sum(m.weight.numel() for m in g.gm.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    kept = sum(sizes[n] * b for n, b in bits.items()) + (total - sum(sizes.values())) * 32
    assert kept <= 0.25 * total * 32
    for name, b in bits.items():  # the weights really take at most 2^b - 1 values
        w = out.gm.get_submodule(next(n.target for n in out.nodes if n.name == name)).weight
        assert len(torch.unique(w)) <= 2 ** b - 1
    assert set(rec.sensitivity.curves) == {n.name for n in g.nodes if n.op == "call_module"
                                       and isinstance(g.gm.get_submodule(n.target), nn.Conv2d | nn.Linear)}
    assert all(len(points) == 3 for points in rec.sensitivity.curves.values())


# ------------------------------------------------------------------ capture
class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_capture_outputs_inputs_and_the_memory_bound():
    g = Graph.from_torch(Tiny().eval(), (torch.randn(1, 2, 6, 6),))
    batches = [(torch.randn(2, 2, 6, 6),), (torch.randn(3, 2, 6, 6),)]
    got = capture(g.gm, batches, ["a", "b"])
    assert got["a"].shape == (5, 3, 6, 6) and got["b"].shape == (5, 4, 2, 2)
    ins = capture(g.gm, batches, ["b"], inputs=True)["b"]  # what b sees: relu(a(x))
    torch.testing.assert_close(ins, torch.relu(got["a"]))
    small = capture(g.gm, batches, ["a"], max_bytes=1)  # bound reached after the first batch
    assert small["a"].shape[0] == 2
    seen = []
    stream(g.gm, batches, ["a"], lambda name, x, i: seen.append((name, i, x.shape[0])))
    assert seen == [("a", 0, 2), ("a", 1, 3)]


def test_patches_are_im2col_rows():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 7, 7)
    rows = patches(conv, x)
    y = (rows @ conv.weight.reshape(5, -1).T + conv.bias).reshape(2, -1, 5).transpose(1, 2)
    torch.testing.assert_close(y.reshape(2, 5, 4, 4), conv(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ sensitivity and budgets
def test_measure_scores_each_candidate_alone_and_restores():
    state = {"v": 0.0}

    @contextlib.contextmanager
    def setv(v):
        state["v"] = v
        try:
            yield
        finally:
            state["v"] = 0.0

    sens = measure({"l": [(s, 10 * s, s, functools.partial(setv, s)) for s in (1, 2)]},
                   lambda: 1.0 - state["v"] / 10, x_label="s", y_label="f", baseline_x=0.0)
    assert [(o.setting, o.cost, o.fidelity) for o in sens.options["l"]] == [(1, 10, 0.9), (2, 20, 0.8)]
    assert sens.curves() == {"l": [[1.0, 0.9], [2.0, 0.8], [0.0, 1.0]]} and state["v"] == 0.0


def test_threshold_allocation_prefers_least_fidelity_loss():
    cost = {"a": 100, "b": 100}
    options = {"a": [Option(0.5, 50, 0.99), Option(0.25, 25, 0.90)],
               "b": [Option(0.5, 50, 0.80), Option(0.25, 25, 0.70)]}
    sel = allocate_threshold(options, cost, total=200, budget=150)
    assert sel.met and sel.cost == 150 and sel.choice["b"] is None and sel.choice["a"].setting == 0.5
    sel = allocate_threshold(options, cost, total=200, budget=125)
    assert sel.met and sel.cost == 125 and sel.choice["a"].setting == 0.25 and sel.choice["b"] is None
    sel = allocate_threshold(options, cost, total=200, budget=10)
    assert not sel.met and sel.cost == 50  # best effort: the cheapest option everywhere
    sel = allocate_threshold(options, cost, total=200, budget=300)
    assert sel.met and all(v is None for v in sel.choice.values())


def test_marginal_allocation_steps_by_loss_per_cost_and_rechecks_the_real_cost():
    cost = {"a": 100, "b": 100}
    options = {"a": [Option("a1", 80, -0.1), Option("a2", 40, -0.5)],
               "b": [Option("b1", 50, -0.2), Option("b2", 20, -0.25)]}
    sel = allocate_marginal(options, cost, total=200, budget=150, base_fidelity=0.0)
    assert sel.met and sel.choice == {"a": None, "b": options["b"][0]}  # 0.004/unit beats 0.005
    # the real total is 10 more than the estimate: one more step is taken
    sel = allocate_marginal(options, cost, total=200, budget=150, base_fidelity=0.0,
                            actual=lambda choice: 10 + 200 - sum(cost[k] - o.cost for k, o in choice.items() if o))
    assert sel.met and sel.choice["b"] is options["b"][1] and sel.cost == 130


# ------------------------------------------------------------------ training
def _regression():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    teacher = x @ torch.randn(4, 3)
    return x, teacher


def test_train_fits_an_objective_with_hooks():
    x, teacher = _regression()
    teacher[:, 0] = 0  # reachable with output 0's weights masked to zero
    model = nn.Linear(4, 3)
    mask = torch.ones_like(model.weight)
    mask[0] = 0
    steps = Minibatches(64, 16, seed=0).steps(200)
    losses = train(model, (x,), Objective("mse", teacher=teacher), steps,
                   optimizer=torch.optim.Adam(model.parameters(), lr=0.05),
                   hooks=Hooks(after_step=lambda: model.weight.data.mul_(mask)))
    assert len(losses) == 200 and losses[-1] < 0.1 * losses[0]
    assert torch.all(model.weight[0] == 0)  # the hook ran after every step
    with pytest.raises(ValueError, match="needs labels"):
        Objective("supervised")


def test_minibatches_are_seeded_epochs():
    a = [idx.tolist() for idx in Minibatches(10, 4, seed=3).steps(6)]
    b = [idx.tolist() for idx in Minibatches(10, 4, seed=3).steps(6)]
    assert a == b and sorted(sum(a[:3], [])) == list(range(10)) and len(a[3]) == 4


_DDP_SCRIPT = """
import sys, torch
from torch import nn
sys.path.insert(0, {root!r})
from slimgraph.passes.toolkit import Minibatches, Objective, train
torch.manual_seed(0)
x = torch.randn(64, 4); teacher = x @ torch.randn(4, 3)
model = nn.Linear(4, 3)
train(model, (x,), Objective("mse", teacher=teacher), Minibatches(64, 16, seed=0).steps(20),
      optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
import torch.distributed as dist
rank = dist.get_rank() if dist.is_initialized() else 0
torch.save(model.state_dict(), {out!r} + f"/rank{{rank}}.pt")
"""


@pytest.mark.slow
def test_data_parallel_under_torchrun_matches_one_process(tmp_path):
    root = str(Path(__file__).resolve().parents[2])
    script = tmp_path / "ddp.py"
    script.write_text(_DDP_SCRIPT.format(root=root, out=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    torchrun = Path(sys.executable).with_name("torchrun")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                          "--master_port", str(port), str(script)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    single = tmp_path / "single"
    single.mkdir()
    script.write_text(_DDP_SCRIPT.format(root=root, out=str(single)))
    subprocess.run([sys.executable, str(script)], check=True, env=env, timeout=300)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    one = torch.load(single / "rank0.pt")
    for k in one:
        torch.testing.assert_close(r0[k], r1[k])  # the ranks agree
        torch.testing.assert_close(r0[k], one[k], rtol=1e-5, atol=1e-6)  # and equal one process
