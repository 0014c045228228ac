from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from slimgraph.errors import PassError
from slimgraph.ir import Graph
from slimgraph.ir.analysis import AnalysisManager
from slimgraph.models import resnet18
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


@dataclass(frozen=True)
class BreakWeights(Pass):
    """Test-only: claims to be exact but perturbs the first conv."""

    name: ClassVar[str] = "break-weights"

    def run(self, graph, am):
        out = graph.copy()
        out.gm.conv1.weight.data.mul_(1.5)
        return PassResult(out, changed=True)


@dataclass(frozen=True)
class Crash(Pass):
    name: ClassVar[str] = "crash"

    def run(self, graph, am):
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def graph():
    return Graph.from_torch(resnet18(width=8, num_classes=10), (torch.randn(1, 3, 32, 32),))


def _instruments(graph):
    return [TimingInstrument(), VerifyInstrument(), NumericsInstrument(graph, [(torch.randn(4, 3, 32, 32),)])]


def test_records_follow_the_report_schema(graph, tmp_path):
    passes = parse_pipeline("cleanup,fold-bn")
    out, records = PassManager(passes, [*_instruments(graph), IRDumpInstrument(tmp_path)]).run(graph)
    assert [r["name"] for r in records] == ["cleanup", "fold-bn"]
    fold = records[1]
    assert fold["changed"] and fold["exact"]
    assert set(fold["stats"]) >= {"macs_before", "macs_after", "params_before", "params_after"}
    assert fold["numerics"]["rel_l2"] < 1e-5 and fold["numerics"]["top1_agreement"] == 1.0
    assert fold["wall_time_s"] > 0
    assert any(row["name"] == "conv1" for row in fold["layers"])  # conv gained a bias
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
        PassManager([*parse_pipeline("cleanup,fold-bn"), Crash()]).run(graph, AnalysisManager())
    assert isinstance(info.value.__cause__, RuntimeError)


def test_exact_pass_after_an_approximate_one_is_checked_against_its_input(graph):
    # prune-channels moves the outputs away from the original; fold-bn after it must not be
    # blamed for that drift, but it is still checked against its own input.
    out, records = PassManager(parse_pipeline("prune-channels{ratio=0.3},fold-bn"),
                               _instruments(graph)).run(graph, AnalysisManager())
    assert records[0]["numerics"]["rel_l2"] > 1e-3  # the approximate pass drifted
    assert records[1]["numerics"]["rel_l2"] == pytest.approx(records[0]["numerics"]["rel_l2"],
                                                             rel=1e-3)
    with pytest.raises(PassError, match="break-weights.*changed the outputs"):
        PassManager([*parse_pipeline("prune-channels{ratio=0.3}"), BreakWeights()],
                    _instruments(graph)).run(graph, AnalysisManager())
