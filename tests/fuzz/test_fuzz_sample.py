"""A fixed sample of tools/fuzz.py in CI: random CNNs through the fx, pt2 and ONNX import paths
and every registered pass, with every invariant checked (see ``tools.fuzz.INVARIANTS``).

The sample must show exactly the known failures below, each documented by a shrunk xfail case
in tests/fuzz/cases/: a new failure fails this test, and so does a fixed one (remove it from
``KNOWN`` and delete its case file when its xfail starts passing).
"""

from pathlib import Path

from tools.fuzz import PATHS, format_summary, run_fuzz

SEEDS = range(10)
COMPILE_EVERY = 3  # seeds 0, 3, 6, 9: an imported graph and one pass output each, built with TVM

# case file in tests/fuzz/cases/ -> the (seed, path, pass, invariant, kind) it explains here
_CASES: dict[str, list[tuple[int, str, str, str, str]]] = {}  # none at present
KNOWN: dict[tuple[int, str, str, str, str], str] = {
    sig: case for case, sigs in _CASES.items() for sig in sigs}


def test_fuzz_sample():
    _, results, summary = run_fuzz(SEEDS, paths=PATHS, compile_every=COMPILE_EVERY)
    found = {f.signature(): f for r in results for f in r.findings}
    new = {sig: f.message for sig, f in found.items() if sig not in KNOWN}
    fixed = {sig: KNOWN[sig] for sig in KNOWN if sig not in found}
    assert not new and not fixed, (
        f"new failures: {new}\nno longer failing (update KNOWN and the case): {fixed}\n"
        + format_summary(summary))
    assert summary["graphs"] == len(SEEDS)


def test_known_failures_have_their_case_file():
    cases = Path(__file__).parent / "cases"
    assert all((cases / case).is_file() for case in _CASES)


def test_every_registered_pass_has_fuzz_variants():
    from slimgraph.passes.base import available_passes, parse_pipeline
    from tools.fuzz import VARIANTS

    assert set(VARIANTS) == set(available_passes())
    for specs in VARIANTS.values():
        for spec in specs:
            parse_pipeline(spec)  # every variant is a valid pipeline


# ---- the checks themselves catch what they claim to (bugs injected into a pass)
def _tiny():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    return model, torch.randn(1, 3, 8, 8)


def _const_fold_that(monkeypatch, rewrite):
    """const-fold (an exact pass) patched to apply ``rewrite`` to a copy of its input."""
    from slimgraph.passes.base import PassResult
    from slimgraph.passes.const_fold import ConstFold

    def run(self, graph, ctx):
        out = graph.copy()
        rewrite(out)
        return PassResult(out, changed=True)

    monkeypatch.setattr(ConstFold, "run", run)


def _findings(**options):
    from tools.fuzz import run_model

    model, x = _tiny()
    result = run_model(model, x, seed=0, paths=["fx"], passes={"const-fold": "const-fold"}, **options)
    return {(f.pass_name, f.invariant) for f in result.findings}


def test_an_exact_pass_that_changes_outputs_is_caught(monkeypatch):
    import torch

    def perturb(graph):
        with torch.no_grad():
            next(graph.gm.parameters()).mul_(1.01)

    _const_fold_that(monkeypatch, perturb)
    assert ("const-fold", "exact") in _findings()


def test_a_pass_that_mutates_its_input_or_crashes_is_caught(monkeypatch):
    import torch

    from slimgraph.passes.base import PassResult
    from slimgraph.passes.const_fold import ConstFold

    def mutate(self, graph, ctx):
        with torch.no_grad():
            next(graph.gm.parameters()).zero_()
        return PassResult(graph.copy(), changed=True)

    monkeypatch.setattr(ConstFold, "run", mutate)
    assert ("const-fold", "mutation") in _findings()

    def crash(self, graph, ctx):
        raise IndexError("planted")

    monkeypatch.setattr(ConstFold, "run", crash)
    assert ("const-fold", "crash") in _findings()


def test_worker_processes_give_the_serial_results_in_seed_order():
    from dataclasses import asdict

    kwargs = {"paths": ["fx"], "passes": ["const-fold", "prune-weights"]}
    serial = run_fuzz(range(3), **kwargs)
    parallel = run_fuzz(range(3), jobs=2, **kwargs)
    assert [s["seed"] for s in parallel[0]] == [0, 1, 2]
    assert parallel[0] == serial[0]
    assert [asdict(r) | {"seconds": 0} for r in parallel[1]] == [asdict(r) | {"seconds": 0} for r in serial[1]]
    # past the time limit no further seed starts
    specs, _, summary = run_fuzz(range(5), time_limit=0.0, jobs=2, **kwargs)
    assert specs == [] and summary["graphs"] == 0
