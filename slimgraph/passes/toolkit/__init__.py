"""The pass toolkit: what every data-driven pass needs, written once.

A data-driven pass (pruning, low-rank with data fits, quantization, weight sharing, ...)
calibrates on data, measures how sensitive each layer is, picks per-layer settings under a
budget, and may train to recover. Each of those is one module here:

``capture``      activations on calibration data by node name (``stream``, ``capture``,
                 ``record``; one ``fx.Interpreter``, no hooks), ``patches`` (im2col rows)
``sensitivity``  ``FidelityProbe`` (network fidelity vs the reference on the calibration
                 batches), ``measure`` (each candidate setting of each layer alone) ->
                 ``Sensitivity`` (``Option``s per layer; curves for the report)
``budget``       ``allocate_threshold`` (AIMET-style greedy) and ``allocate_marginal`` (least
                 fidelity lost per unit of cost saved), for any cost: MACs, bytes, bits, latency
``train``        ``train`` (one loop: distillation / labels / MSE ``Objective``, ``Minibatches``,
                 ``Hooks`` for masks and quantizers; data parallel under ``torchrun``)

MACs come from the cost analysis (``Cost``, and ``cost.module_macs`` for a candidate module).

The smallest complete data-driven pass (tests/passes/test_toolkit.py has it running): round
each layer's weights to the fewest bits that keep the network's fidelity, under a bit budget.

    @register_pass
    @dataclass(frozen=True)
    class RoundWeights(Pass):
        '''Per-layer weight bits under a budget (example; see the tests).'''
        name: ClassVar[str] = "round-weights"
        exact: ClassVar[bool] = False
        budget: float = 0.5  # share of the float32 weight bits to keep

        def run(self, graph, ctx):
            out = graph.copy()
            layers = {n.name: out.gm.get_submodule(n.target) for n in out.nodes
                      if n.op == "call_module" and hasattr(out.gm.get_submodule(n.target), "weight")}
            probe = FidelityProbe(graph, ctx)
            sens = measure({name: [(b, m.weight.numel() * b, b, partial(rounded, m, b))
                                   for b in (2, 4, 8)] for name, m in layers.items()},
                           lambda: probe.score(out.gm), x_label="bits", y_label="cosine")
            full = {name: m.weight.numel() * 32 for name, m in layers.items()}
            alloc = allocate_threshold(sens.options, full, sum(full.values()),
                                       self.budget * sum(full.values()))
            for name, option in alloc.choice.items():
                if option is not None:
                    rounded(layers[name], option.setting).__enter__()   # keep it
            return PassResult(out, changed=True, stats={"bits": ...}, sensitivity=sens.report())
"""

from slimgraph.passes.toolkit.budget import Allocation, allocate_marginal, allocate_threshold
from slimgraph.passes.toolkit.capture import capture, patches, record, stream
from slimgraph.passes.toolkit.sensitivity import FidelityProbe, Option, Sensitivity, measure
from slimgraph.passes.toolkit.train import Hooks, Minibatches, Objective, teacher_outputs, train

__all__ = ["Allocation", "FidelityProbe", "Hooks", "Minibatches", "Objective", "Option",
           "Sensitivity", "allocate_marginal", "allocate_threshold", "capture", "measure",
           "patches", "record", "stream", "teacher_outputs", "train"]
