"""Choosing per-layer settings under a budget, from measured sensitivity.

The cost is whatever the pass budgets (MACs, weight bytes, bits, measured latency); the value is
the fidelity each option keeps (higher is better). Two strategies:

``threshold``  AIMET's greedy compression-ratio selection, with an exact scan instead of its
               binary search: for a fidelity threshold t, every layer takes its cheapest option
               with fidelity >= t (or stays as it is); the highest t whose total cost meets the
               budget wins. Each layer's choice depends only on t, so it is fast and monotone.
``marginal``   step by step, the move with the least fidelity lost per unit of cost saved
               (each layer walks down its options in order of cost); for options whose cost
               interacts (channel pruning: a group changes its neighbours' MACs), ``actual``
               recomputes the true total after the estimate meets the budget, and steps go on
               until it does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from slimgraph.passes.toolkit.sensitivity import Option


@dataclass
class Allocation:
    choice: dict[str, Option | None]  # per layer, the option taken (None: left as it is)
    cost: float  # the total cost with that choice
    met: bool  # whether ``cost <= budget``
    threshold: float  # the fidelity threshold (``threshold``), or the last step's loss rate


def allocate_threshold(options: Mapping[str, Sequence[Option]], layer_cost: Mapping[str, float],
                       total: float, budget: float) -> Allocation:
    """The ``threshold`` strategy (see the module docstring)."""
    def pick(t: float) -> tuple[dict[str, Option | None], float]:
        choice, cost = {}, total
        for layer, opts in options.items():
            ok = [o for o in opts if o.fidelity >= t and o.cost < layer_cost[layer]]
            best = min(ok, key=lambda o: (o.cost, -o.fidelity)) if ok else None
            choice[layer] = best
            if best is not None:
                cost -= layer_cost[layer] - best.cost
        return choice, cost

    thresholds = sorted({o.fidelity for opts in options.values() for o in opts
                         if math.isfinite(o.fidelity)}, reverse=True)
    choice, cost, t = {layer: None for layer in options}, total, math.inf
    if cost <= budget:
        return Allocation(choice, cost, True, t)
    for t in thresholds:
        choice, cost = pick(t)
        if cost <= budget:
            return Allocation(choice, cost, True, t)
    return Allocation(choice, cost, False, t)


def allocate_marginal(options: Mapping[str, Sequence[Option]], layer_cost: Mapping[str, float],
                      total: float, budget: float, base_fidelity: float,
                      actual: Callable[[dict[str, Option | None]], float] | None = None) -> Allocation:
    """The ``marginal`` strategy (see the module docstring). Each layer's options must be in
    the order it walks them (decreasing cost)."""
    level = {layer: -1 for layer in options}

    def current(layer: str) -> tuple[float, float]:
        lv = level[layer]
        return (layer_cost[layer], base_fidelity) if lv < 0 else (options[layer][lv].cost,
                                                                   options[layer][lv].fidelity)

    def step() -> float | None:
        best, rate = None, math.inf
        for layer, opts in options.items():
            if level[layer] + 1 >= len(opts):
                continue
            cost, fid = current(layer)
            nxt = opts[level[layer] + 1]
            saved = cost - nxt.cost
            r = (fid - nxt.fidelity) / saved if saved > 0 else math.inf
            if best is None or r < rate:
                best, rate = layer, r
        if best is None:
            return None
        level[best] += 1
        return rate

    def choice() -> dict[str, Option | None]:
        return {layer: options[layer][lv] if lv >= 0 else None for layer, lv in level.items()}

    def estimate() -> float:
        return total - sum(layer_cost[layer] - current(layer)[0] for layer in options)

    rate = 0.0
    while estimate() > budget and (r := step()) is not None:
        rate = r
    cost = actual(choice()) if actual else estimate()
    while cost > budget and (r := step()) is not None:
        rate = r
        cost = actual(choice()) if actual else estimate()
    return Allocation(choice(), cost, cost <= budget, rate)
