from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph
from slimgraph.passes import (
    IRDumpInstrument,
    NumericsInstrument,
    Pass,
    PassManager,
    PassResult,
    TimingInstrument,
    VerifyInstrument,
    parse_pipeline,
)
from slimgraph.passes.context import PassContext
from slimgraph.schema import PassRecord
from slimgraph.zoo.models import resnet18


@dataclass(frozen=True)
class BreakWeights(Pass):
    """Test-only: claims to be exact but perturbs the first conv."""

    name: ClassVar[str] = "break-weights"

    def run(self, graph, ctx):
        out = graph.copy()
        out.gm.conv1.weight.data.mul_(1.5)
        return PassResult(out, changed=True)


@dataclass(frozen=True)
class Crash(Pass):
    name: ClassVar[str] = "crash"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def graph():
    return Graph.from_torch(resnet18(width=8, num_classes=10), (torch.randn(1, 3, 32, 32),))


def _instruments(graph):
    return [TimingInstrument(), VerifyInstrument(), NumericsInstrument(graph, [(torch.randn(4, 3, 32, 32),)])]


def test_records_follow_the_report_schema(graph, tmp_path):
    passes = parse_pipeline("cleanup,fold-bn")
    out, records = PassManager(passes, [*_instruments(graph), IRDumpInstrument(tmp_path)]).run(graph)
    assert [r.name for r in records] == ["cleanup", "fold-bn"]
    fold = records[1]
    assert isinstance(fold, PassRecord) and fold.changed and fold.exact
    assert set(fold.stats) >= {"macs_before", "macs_after", "params_before", "params_after"}
    assert fold.numerics.rel_l2 < 1e-5 and fold.numerics.top1_agreement == 1.0
    assert fold.wall_time_s > 0
    assert any(row.name == "conv1" for row in fold.layers)  # conv gained a bias
    assert PassRecord.from_dict(fold.to_dict()) == fold  # the JSON form round-trips
    assert (tmp_path / "00_input.py").exists() and (tmp_path / "02_fold-bn.py").exists()
    assert out is not graph


def test_input_graph_is_never_mutated(graph):
    before = {k: v.clone() for k, v in graph.gm.state_dict().items()}
    PassManager(parse_pipeline("cleanup,const-fold,fold-bn")).run(graph)
    after = graph.gm.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_an_exact_pass_that_changes_numerics_is_caught(graph):
    with pytest.raises(PassError, match="break-weights.*changed the outputs"):
        PassManager([BreakWeights()], _instruments(graph)).run(graph)


def test_a_failing_pass_is_named_with_the_passes_before_it(graph):
    with pytest.raises(PassError, match=r"pass 'crash' failed \(after: cleanup, fold-bn\): RuntimeError: boom") as info:
        PassManager([*parse_pipeline("cleanup,fold-bn"), Crash()]).run(graph, PassContext())
    assert isinstance(info.value.__cause__, RuntimeError)


def test_exact_pass_after_an_approximate_one_is_checked_against_its_input(graph):
    # prune-channels moves the outputs away from the original; fold-bn after it must not be
    # blamed for that drift, but it is still checked against its own input.
    out, records = PassManager(parse_pipeline("prune-channels{ratio=0.3},fold-bn"),
                               _instruments(graph)).run(graph, PassContext())
    assert records[0].numerics.rel_l2 > 1e-3  # the approximate pass drifted
    assert records[1].numerics.rel_l2 == pytest.approx(records[0].numerics.rel_l2,
                                                             rel=1e-3)
    with pytest.raises(PassError, match="break-weights.*changed the outputs"):
        PassManager([*parse_pipeline("prune-channels{ratio=0.3}"), BreakWeights()],
                    _instruments(graph)).run(graph, PassContext())


def test_failing_pass_leaves_a_runnable_reproducer_when_dumping(graph, tmp_path):
    with pytest.raises(PassError):
        PassManager([*parse_pipeline("cleanup"), Crash()], [IRDumpInstrument(tmp_path)]).run(graph)
    folder = tmp_path / "02_before_crash"
    assert "boom" in (folder / "PASS.txt").read_text()
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "before_crash", folder / "__init__.py", submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["before_crash"] = mod
    try:
        spec.loader.exec_module(mod)
        repro = mod.Reproducer().eval()
    finally:
        sys.modules.pop("before_crash", None)
    (x,) = torch.load(folder / "example_inputs.pt")
    torch.testing.assert_close(repro(x), graph.gm(x))


@dataclass(frozen=True)
class Spy(Pass):
    """Test-only: records which analyses were cached when it ran; claims to preserve Cost."""

    name: ClassVar[str] = "spy"
    requires: ClassVar = ()
    seen: ClassVar[list] = []

    def run(self, graph, ctx):
        Spy.seen.append(set(ctx.analyses.cached(graph)))
        out = graph.copy()
        out.gm.fc = torch.nn.Linear(out.gm.fc.in_features, 3)
        out.gm.recompile()
        return PassResult(out, changed=True)


def test_requires_are_prefetched_and_a_false_preservation_claim_fails_in_debug(graph):
    from slimgraph.ir.analysis import Cost, Shapes

    class Hooks(VerifyInstrument):
        calls: ClassVar[list] = []

        def on_pipeline_start(self, graph, ctx):
            self.calls.append("start")

        def on_pipeline_end(self, graph, ctx):
            self.calls.append("end")

    spy = type("PrefetchSpy", (Spy,), {"requires": (Shapes,), "preserves": (Cost,)})()
    PassManager([spy], [Hooks()]).run(graph, PassContext())
    assert Shapes in Spy.seen[-1] and Hooks.calls == ["start", "end"]
    with pytest.raises(PassError, match="claims to preserve the cost analysis"):
        PassManager([spy]).run(graph, PassContext(check_preserved=True))
