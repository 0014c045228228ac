"""Differential fuzzer: random CNNs through every import path and every registered pass.

    .venv/bin/python tools/fuzz.py --graphs 50 --seed 0 --json out/fuzz.json \
        [--paths fx,pt2,onnx] [--compile-every 10] [--shrink-to tests/fuzz/cases] [--jobs 2]
    .venv/bin/python tools/fuzz.py --seeds 21001,21044   # re-check chosen seeds after a fix

1. A seed gives a *spec*: a list of layer records (dicts; blocks hold nested lists), rendered
   to Python source for an ``nn.Module`` (``render``) and built by executing that source
   (``build``), so a written-out case is exactly the model the fuzzer ran. Records cover
   strided/dilated/padded/"same" convs, grouped and depthwise convs, transposed convs, BN with
   random statistics, max/avg/adaptive pooling, interpolation, residual adds, channel concat,
   split/chunk/slice, squeeze-excitation, channel shuffle, permute and back, ten activations,
   dropout, per-channel and scalar affine ops, shared (reused) convs, spatial attention,
   GroupNorm, F.pad, padding modes, 1xk kernels, and a conv or linear head. ``--off`` keeps
   named ops out of the graphs (to look past a known failure).
2. Each graph is imported through torch.fx (``fx``), a ``torch.export`` ``.pt2`` file
   (``pt2``) and an ONNX file (``onnx``); on each path ``cleanup`` then ``fold-bn`` run once,
   then every registered pass on that result (option variants drawn from the seed, the same
   on every path), with seeded calibration data.
3. Invariants (one ``Finding`` per violation; see ``INVARIANTS``). A ``SlimgraphError`` that
   declines cleanly is a *decline*, counted apart from findings (unless it wraps a Python
   programming error such as a KeyError, or is a VerifyError). The prune-channels oracle is
   ``tests/passes/prune_fixtures.zeroed`` (producers zeroed) or, for paths through ops that do
   not map 0 to 0 (sigmoid, x + b), ``ignored_inputs`` (consumers' removed inputs zeroed).
4. ``--shrink-to``: up to ``--shrink-per-kind`` failures per (pass, invariant, kind) are shrunk
   (records deleted, blocks unwrapped, widths and options reduced while the same invariant still
   fails on the same path and pass) and written as xfail(strict) pytest files that rebuild the
   minimal model and re-run the check through ``run_model``; a failure that shrinks to a model
   already written is listed in the JSON as a duplicate of that case.

Deterministic for a given seed (spec, weights, inputs, calibration, pass options), whatever
``--jobs`` (worker processes, one thread each; results are collected in seed order). Prints a
markdown summary; ``--json`` also gets every finding, decline and spec.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from slimgraph.errors import PassError, SlimgraphError, VerifyError  # noqa: E402

PATHS = ("fx", "pt2", "onnx")
INVARIANTS = {
    "crash": "an exception that is not a SlimgraphError (stage/type in `kind`)",
    "import": "the imported graph runs like the torch model (rel-L2 1e-4)",
    "verify": "Graph.verify() holds on every imported and output graph",
    "shape": "output shapes equal the input graph's (the torch model's on import)",
    "exact": "an exact pass stays within rel-L2 1e-5 of its input",
    "prune-oracle": "prune-channels output == its input with the removed channels zeroed (1e-4)",
    "onnx": "Graph.to_onnx + onnxruntime == Graph.run (rel-L2 1e-4; 5e-2 for integer graphs in QDQ form)",
    "paths": "a pass gives the same MACs, removes as many parameters, and gives the same outputs "
             "(rel-L2 1e-4; 5e-2 after training) on every path",
    "compile": "an untuned x86 TVM build == Graph.run (rel-L2 1e-4)",
    "skipped": "a pass that changed nothing says why (non-empty skipped)",
    "mutation": "a pass leaves its input graph as it was (code and outputs)",
}
IMPORT_TOL, EXACT_TOL, PRUNE_TOL, ONNX_TOL, PATH_TOL, COMPILE_TOL = 1e-4, 1e-5, 1e-4, 1e-4, 1e-4, 1e-4
PREFIX = ("cleanup", "fold-bn")
# Training amplifies rounding differences between equivalent graphs (Adam's normalized steps),
# so passes that train are compared across paths at a looser tolerance.
TRAINING_PASSES, TRAINED_PATH_TOL = ("finetune",), 5e-2
# An integer graph goes to ONNX in QDQ form, which cannot state slimgraph's fixed-point
# requantization: ONNX Runtime requantizes in float, rounding half to even, so a value near a
# rounding boundary lands one quantization step away and the step propagates (slimgraph/ops/qdq.py).
# Seen at 4-bit weights: rel-L2 0.008-0.016; a wrong scale or zero point gives far more.
INTEGER_PASSES, INTEGER_ONNX_TOL = ("quantize", "fixed-point"), 5e-2
# A training pass gets a student with something to recover (finetune declines a graph that
# already reproduces its teacher): magnitude pruning, the same on every path.
STUDENT = "prune-weights{sparsity=0.5}"

# Option variants per registered pass; a graph's seed picks one (the same on every path).
VARIANTS = {
    "cleanup": ["cleanup"],
    "const-fold": ["const-fold"],
    "fold-bn": ["fold-bn"],
    "fc-svd": ["fc-svd{rank=0.9}", "fc-svd{rank=2}", "fc-svd{rank=vbmf}"],
    "spatial-svd": ["spatial-svd{rank=macs=0.5}", "spatial-svd{rank=0.9}", "spatial-svd{rank=1}"],
    "channel-lowrank": ["channel-lowrank{rank=macs=0.5}", "channel-lowrank{rank=frac=0.5}"],
    "tucker2": ["tucker2{rank=macs=0.5}", "tucker2{rank=vbmf}", "tucker2{rank=0.8}"],
    "cp": ["cp{rank=macs=0.5}", "cp{rank=2}"],
    "flatten-conv": ["flatten-conv{rank=macs=0.5}", "flatten-conv{rank=2}"],
    "prune-channels": ["prune-channels{ratio=0.25}", "prune-channels{ratio=0.5,round_to=2}",
                       "prune-channels{target_macs=0.6}",
                       "prune-channels{ratio=0.5,criterion=taylor}"],
    "prune-weights": ["prune-weights{sparsity=0.5}", "prune-weights{method=obd,sparsity=0.7}",
                      "prune-weights{method=obs,sparsity=0.5}"],
    "finetune": ["finetune{epochs=1}", "finetune{epochs=1,optimizer=sgd}"],
    "fixed-point": ["fixed-point{budget=4}"],
    "quantize": ["quantize", "quantize{per_channel=false}", "quantize{calibration=percentile}",
                 "quantize{weight_bits=4}", "quantize{symmetric=true}"],
}


# =============================================================================== the spec
class Invalid(Exception):
    """A spec (or a shrinking candidate) that does not describe a runnable model."""


@dataclass
class _Ctx:
    """Rendering state: the current tensor's shape (without batch) and the emitted lines."""

    shape: tuple[int, ...]
    init: list[str] = field(default_factory=list)
    fwd: list[str] = field(default_factory=list)
    n: int = 0
    fresh: bool = False  # the current tensor is a layer's fresh output (in-place is safe)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def module(self, prefix: str, ctor: str) -> str:
        name = self.name(prefix)
        self.init.append(f"self.{name} = {ctor}")
        return name

    def let(self, expr: str, fresh: bool = True) -> str:
        var = self.name("x")
        self.fwd.append(f"{var} = {expr}")
        self.fresh = fresh
        return var

    def scratch(self) -> _Ctx:
        return _Ctx(self.shape, n=self.n)


def _chw(ctx: _Ctx) -> tuple[int, int, int]:
    if len(ctx.shape) != 3 or min(ctx.shape) < 1:
        raise Invalid(f"needs a non-empty NCHW tensor, got shape {ctx.shape}")
    return ctx.shape  # type: ignore[return-value]


def _out_size(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    span = size + 2 * p - d * (k - 1) - 1
    out = (math.ceil(span / s) if ceil else span // s) + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    if out < 1 or span < 0:
        raise Invalid(f"window {k} (stride {s}, pad {p}, dilation {d}) does not fit size {size}")
    return out


def _kw(**kwargs: Any) -> str:
    """Keyword arguments that differ from their defaults (given as (value, default) pairs)."""
    return "".join(f", {k}={v[0]!r}" for k, v in kwargs.items() if v[0] != v[1])


def _conv(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    k, s, d, g, out, p = rec["k"], rec["s"], rec["d"], rec["g"], rec["out"], rec["p"]
    kw, pw, pm = rec.get("kw", k), rec.get("pw", p), rec.get("pm", "zeros")
    if c % g or out % g:
        raise Invalid(f"groups {g} do not divide {c} -> {out}")
    if p == "same":
        if s != 1:
            raise Invalid("padding='same' needs stride 1")
        ho, wo, pads = h, w, (d * (k - 1) // 2 + 1, d * (kw - 1) // 2 + 1)
    else:
        ho, wo, pads = _out_size(h, k, s, p, d), _out_size(w, kw, s, pw, d), (p, pw)
    if pm != "zeros" and (pads[0] >= h or pads[1] >= w):
        raise Invalid(f"padding_mode {pm} needs padding below the input size")
    ksrc = k if kw == k else (k, kw)
    psrc = p if p == "same" or pw == p else (p, pw)
    mod = ctx.module("conv", f"nn.Conv2d({c}, {out}, {ksrc!r}"
                     + _kw(stride=(s, 1), padding=(psrc, 0), dilation=(d, 1), groups=(g, 1),
                           bias=(rec["bias"], True), padding_mode=(pm, "zeros")) + ")")
    y = ctx.let(f"self.{mod}({x})")
    ctx.shape = (out, ho, wo)
    return y


def _dw(rec: dict, ctx: _Ctx, x: str) -> str:
    c = _chw(ctx)[0]
    return _conv({**rec, "out": c * rec["mult"], "g": c}, ctx, x)


def _convt(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    k, s, p, op, d, g, out = (rec[key] for key in ("k", "s", "p", "opad", "d", "g", "out"))
    if c % g or out % g or op >= max(s, d):
        raise Invalid("bad groups or output_padding for a transposed conv")
    ho, wo = ((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n in (h, w))
    if min(ho, wo) < 1:
        raise Invalid("transposed conv output is empty")
    mod = ctx.module("convt", f"nn.ConvTranspose2d({c}, {out}, {k}"
                     + _kw(stride=(s, 1), padding=(p, 0), output_padding=(op, 0),
                           groups=(g, 1), bias=(rec["bias"], True), dilation=(d, 1)) + ")")
    y = ctx.let(f"self.{mod}({x})")
    ctx.shape = (out, ho, wo)
    return y


def _bn(rec: dict, ctx: _Ctx, x: str) -> str:
    c = _chw(ctx)[0]
    mod = ctx.module("bn", f"nn.BatchNorm2d({c}" + _kw(affine=(rec["affine"], True)) + ")")
    return ctx.let(f"self.{mod}({x})")


# activation kind -> (module ctor, functional form, method form); {a} is the kind's argument
ACTS: dict[str, tuple[str, str | None, str | None]] = {
    "relu": ("nn.ReLU({ip})", "F.relu({x}{ipk})", "{x}.relu()"),
    "relu6": ("nn.ReLU6({ip})", "F.relu6({x}{ipk})", None),
    "leaky": ("nn.LeakyReLU({a}{ipc})", "F.leaky_relu({x}, {a}{ipk})", None),
    "prelu": ("nn.PReLU({a})", None, None),
    "gelu": ("nn.GELU({a})", "F.gelu({x}{ak})", None),
    "silu": ("nn.SiLU({ip})", "F.silu({x}{ipk})", None),
    "hardswish": ("nn.Hardswish({ip})", "F.hardswish({x}{ipk})", None),
    "hardsigmoid": ("nn.Hardsigmoid({ip})", "F.hardsigmoid({x}{ipk})", None),
    "sigmoid": ("nn.Sigmoid()", "torch.sigmoid({x})", "{x}.sigmoid()"),
    "tanh": ("nn.Tanh()", "torch.tanh({x})", "{x}.tanh()"),
}
_INPLACE = {"relu", "relu6", "leaky", "silu", "hardswish", "hardsigmoid"}


def _act(rec: dict, ctx: _Ctx, x: str) -> str:
    kind, style = rec["kind"], rec["style"]
    ctor, fn, method = ACTS[kind]
    inplace = bool(rec.get("inplace")) and kind in _INPLACE and ctx.fresh
    a = {"leaky": rec.get("a", 0.1), "gelu": repr(rec.get("a", "none")),
         "prelu": ctx.shape[0] if rec.get("per_channel") else 1}.get(kind, "")
    fmt = {"x": x, "a": a, "ip": "inplace=True" if inplace else "",
           "ipk": ", inplace=True" if inplace else "", "ipc": ", inplace=True" if inplace else "",
           "ak": ", approximate='tanh'" if kind == "gelu" and a == "'tanh'" else ""}
    if kind == "gelu":
        fmt["a"] = "approximate='tanh'" if a == "'tanh'" else ""
    if style == "function" and fn:
        return ctx.let(fn.format(**fmt))
    if style == "method" and method:
        return ctx.let(method.format(**fmt))
    mod = ctx.module("act", ctor.format(**fmt))
    return ctx.let(f"self.{mod}({x})")


def _pool(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    k, s, p, ceil = rec["k"], rec["s"], rec["p"], rec["ceil"]
    if 2 * p > k:
        raise Invalid("pool padding above half the kernel")
    ho, wo = _out_size(h, k, s, p, ceil=ceil), _out_size(w, k, s, p, ceil=ceil)
    kind = "Max" if rec["kind"] == "max" else "Avg"
    extra = _kw(ceil_mode=(ceil, False))
    if kind == "Avg":
        extra += _kw(count_include_pad=(rec.get("cip", True), True))
    args = f"{k}, {s}" + (f", {p}" if p else "") + extra
    if rec["style"] == "function":
        y = ctx.let(f"F.{kind.lower()}_pool2d({x}, {args})")
    else:
        mod = ctx.module("pool", f"nn.{kind}Pool2d({args})")
        y = ctx.let(f"self.{mod}({x})")
    ctx.shape = (c, ho, wo)
    return y


def _adaptive(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    size, kind = rec["size"], rec["kind"]
    if rec["style"] == "function":
        y = ctx.let(f"F.adaptive_{kind}_pool2d({x}, {size})")
    else:
        mod = ctx.module("pool", f"nn.Adaptive{kind.capitalize()}Pool2d({size})")
        y = ctx.let(f"self.{mod}({x})")
    ctx.shape = (c, size, size)
    return y


def _interp(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    mode, align = rec["mode"], rec.get("align", False)
    opts = f", mode={mode!r}" + (f", align_corners={align}" if mode == "bilinear" else "")
    if rec.get("size"):
        ho, wo = rec["size"]
        what = f"size=({ho}, {wo})"
    else:
        ho, wo = h * rec["scale"], w * rec["scale"]
        what = f"scale_factor={float(rec['scale'])}"
    if max(ho, wo) > 64:
        raise Invalid("interpolation too large")
    if rec["style"] == "function":
        y = ctx.let(f"F.interpolate({x}, {what}{opts})")
    else:
        mod = ctx.module("up", f"nn.Upsample({what}{opts})")
        y = ctx.let(f"self.{mod}({x})")
    ctx.shape = (c, ho, wo)
    return y


def _residual(rec: dict, ctx: _Ctx, x: str) -> str:
    c0, h0, w0 = _chw(ctx)
    ctx.fresh = False
    y = emit_list(rec["body"], ctx, x)
    c, h, w = _chw(ctx)
    if (h, w) != (h0, w0):
        raise Invalid("a residual body must keep the spatial size")
    short = x
    if rec["proj"]:
        mod = ctx.module("proj", f"nn.Conv2d({c0}, {c}, 1, bias=False)")
        short = ctx.let(f"self.{mod}({x})")
    elif c != c0:
        raise Invalid("a residual body changed the channels and has no projection")
    ctx.shape = (c, h, w)
    out = ctx.let({"add": f"{y} + {short}", "torch": f"torch.add({short}, {y})"}[rec["style"]])
    return _act(rec["post"], ctx, out) if rec.get("post") else out


def _branches(branches: list[list[dict]], ctx: _Ctx, xs: list[str],
              shapes: list[tuple[int, int, int]], merge: str = "cat") -> str:
    outs, out_shapes = [], []
    for body, x, shape in zip(branches, xs, shapes, strict=True):
        ctx.shape, ctx.fresh = shape, False
        outs.append(emit_list(body, ctx, x))
        out_shapes.append(_chw(ctx))
    if len({s[1:] for s in out_shapes}) != 1:
        raise Invalid("merged branches differ in spatial size")
    if len(outs) == 1:
        return outs[0]
    if merge == "cat":
        ctx.shape = (sum(s[0] for s in out_shapes), *out_shapes[0][1:])
        return ctx.let(f"torch.cat([{', '.join(outs)}], 1)")
    if len(set(out_shapes)) != 1:
        raise Invalid(f"{merge} of branches with different shapes")
    ctx.shape = out_shapes[0]
    return ctx.let(f" {'+' if merge == 'add' else '*'} ".join(outs))


def _concat(rec: dict, ctx: _Ctx, x: str) -> str:
    shape = _chw(ctx)
    if not rec["branches"]:
        raise Invalid("a concat needs a branch")
    n = len(rec["branches"])
    return _branches(rec["branches"], ctx, [x] * n, [shape] * n, rec.get("merge", "cat"))


def _split(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    mode, parts = rec["mode"], len(rec["branches"])
    if mode == "chunk":
        if parts < 2 or c % parts:
            raise Invalid(f"{c} channels do not chunk into {parts}")
        sizes = [c // parts] * parts
        expr = f"torch.chunk({x}, {parts}, 1)" if rec["style"] == "function" else f"{x}.chunk({parts}, dim=1)"
        tup = ctx.let(expr)
        xs = [ctx.let(f"{tup}[{i}]") for i in range(parts)]
    else:
        k = rec["k"]
        if parts != 2 or not 0 < k < c:
            raise Invalid(f"cannot split {c} channels at {k}")
        sizes = [k, c - k]
        if mode == "sizes":
            a, b = ctx.name("x"), ctx.name("x")
            ctx.fwd.append(f"{a}, {b} = torch.split({x}, [{k}, {c - k}], 1)")
            xs = [a, b]
        else:
            xs = [ctx.let(f"{x}[:, :{k}]"), ctx.let(f"{x}[:, {k}:]")]
    return _branches(rec["branches"], ctx, xs, [(s, h, w) for s in sizes])


def _slice(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    k = rec["k"]
    if not 0 < k < c:
        raise Invalid(f"cannot slice {c} channels at {k}")
    ctx.shape = (c - k, h, w)
    return ctx.let(f"{x}[:, {k}:]")


def _se(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    hid = max(1, min(rec["hidden"], c))
    gate = {"sigmoid": "torch.sigmoid({})", "hardsigmoid": "F.hardsigmoid({})"}[rec["gate"]]
    act = {"relu": "F.relu({})", "silu": "F.silu({})"}[rec["act"]]
    if rec["fc"] == "conv":
        a = ctx.module("se", f"nn.Conv2d({c}, {hid}, 1)")
        b = ctx.module("se", f"nn.Conv2d({hid}, {c}, 1)")
        pooled = (f"F.adaptive_avg_pool2d({x}, 1)" if rec["pool"] == "adaptive"
                  else f"{x}.mean((2, 3), keepdim=True)")
        s = ctx.let(pooled)
        s = ctx.let(gate.format(f"self.{b}(" + act.format(f"self.{a}({s})") + ")"))
    else:
        a = ctx.module("se", f"nn.Linear({c}, {hid})")
        b = ctx.module("se", f"nn.Linear({hid}, {c})")
        pooled = (f"F.adaptive_avg_pool2d({x}, 1).flatten(1)" if rec["pool"] == "adaptive"
                  else f"{x}.mean((2, 3))")
        s = ctx.let(pooled)
        s = ctx.let(gate.format(f"self.{b}(" + act.format(f"self.{a}({s})") + ")"))
        s = ctx.let({"view": f"{s}.view(-1, {c}, 1, 1)", "size": f"{s}.view({s}.size(0), -1, 1, 1)",
                     "index": f"{s}[:, :, None, None]"}[rec["view"]])
    ctx.shape = (c, h, w)
    return ctx.let(f"{x} * {s}")


def _shuffle(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    g = rec["g"]
    if g < 2 or c % g:
        raise Invalid(f"cannot shuffle {c} channels in {g} groups")
    if rec["style"] == "size":
        b, cc, hh, ww = (ctx.name("n") for _ in range(4))
        ctx.fwd.append(f"{b}, {cc}, {hh}, {ww} = {x}.size()")
        y = ctx.let(f"{x}.view({b}, {g}, {cc} // {g}, {hh}, {ww})")
        y = ctx.let(f"torch.transpose({y}, 1, 2).contiguous()")
        return ctx.let(f"{y}.view({b}, -1, {hh}, {ww})")
    y = ctx.let(f"{x}.view(-1, {g}, {c // g}, {h}, {w}).transpose(1, 2).contiguous()")
    return ctx.let(f"{y}.view(-1, {c}, {h}, {w})")


def _permute(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    y = ctx.let(f"{x}.permute(0, 2, 3, 1)")
    out = c
    if rec["inner"] == "linear":
        out = rec["out"]
        mod = ctx.module("lin", f"nn.Linear({c}, {out})")
        y = ctx.let(f"self.{mod}({y})")
    elif rec["inner"] == "ln":
        mod = ctx.module("ln", f"nn.LayerNorm({c})")
        y = ctx.let(f"self.{mod}({y})")
    ctx.shape = (out, h, w)
    return ctx.let(f"{y}.permute(0, 3, 1, 2)" + (".contiguous()" if rec.get("contiguous") else ""))


def _dropout(rec: dict, ctx: _Ctx, x: str) -> str:
    _chw(ctx)
    kind = rec["kind"]
    if rec["style"] == "function":
        return ctx.let(f"F.{kind}({x}, {rec['p']}, self.training)")
    mod = ctx.module("drop", f"nn.{ {'dropout': 'Dropout', 'dropout2d': 'Dropout2d'}[kind] }({rec['p']})")
    return ctx.let(f"self.{mod}({x})")


def _scale(rec: dict, ctx: _Ctx, x: str) -> str:
    _chw(ctx)
    return ctx.let(f"{x} * {rec['a']} + {rec['b']}")


def _chanscale(rec: dict, ctx: _Ctx, x: str) -> str:
    c = _chw(ctx)[0]
    name = ctx.name("scale")
    ctx.init.append(f"self.{name} = nn.Parameter(torch.ones(1, {c}, 1, 1))")
    return ctx.let(f"{x} {'+' if rec.get('mode') == 'add' else '*'} self.{name}")


def _shared(rec: dict, ctx: _Ctx, x: str) -> str:
    """One conv (c -> c, 'same' size) called ``times`` times: shared weights."""
    c = _chw(ctx)[0]
    k = rec["k"]
    mod = ctx.module("shared", f"nn.Conv2d({c}, {c}, {k}, padding={k // 2})")
    for i in range(rec["times"]):
        x = ctx.let(f"self.{mod}({x})")
        if rec.get("act") and i < rec["times"] - 1:
            x = ctx.let(f"F.relu({x})")
    return x


def _sattn(rec: dict, ctx: _Ctx, x: str) -> str:
    """CBAM-style spatial attention: channel mean (and max) -> conv -> sigmoid -> x * s."""
    _chw(ctx)
    k = rec["k"]
    if rec["mode"] == "meanmax":
        a = ctx.let(f"torch.cat([{x}.mean(1, keepdim=True), {x}.amax(1, keepdim=True)], 1)")
        n_in = 2
    else:
        a = ctx.let(f"torch.mean({x}, dim=1, keepdim=True)")
        n_in = 1
    mod = ctx.module("sa", f"nn.Conv2d({n_in}, 1, {k}, padding={k // 2})")
    s = ctx.let(f"torch.sigmoid(self.{mod}({a}))")
    return ctx.let(f"{x} * {s}")


def _softmax(rec: dict, ctx: _Ctx, x: str) -> str:
    _chw(ctx)
    return ctx.let(f"F.softmax({x}, dim={rec['dim']})")


def _groupnorm(rec: dict, ctx: _Ctx, x: str) -> str:
    c = _chw(ctx)[0]
    if c % rec["g"]:
        raise Invalid(f"GroupNorm: {rec['g']} groups do not divide {c}")
    mod = ctx.module("gn", f"nn.GroupNorm({rec['g']}, {c})")
    return ctx.let(f"self.{mod}({x})")


def _pad(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    left, right, top, bottom = rec["pads"]
    if rec["mode"] != "constant" and (max(left, right) >= w or max(top, bottom) >= h):
        raise Invalid("reflect/replicate padding must be below the input size")
    mode = "" if rec["mode"] == "constant" else f", mode={rec['mode']!r}"
    ctx.shape = (c, h + top + bottom, w + left + right)
    return ctx.let(f"F.pad({x}, ({left}, {right}, {top}, {bottom}){mode})")


def _head(rec: dict, ctx: _Ctx, x: str) -> str:
    c, h, w = _chw(ctx)
    kind, classes = rec["kind"], rec["classes"]
    if kind == "conv":
        mod = ctx.module("head", f"nn.Conv2d({c}, {classes}, 1)")
        ctx.shape = (classes, h, w)
        return ctx.let(f"self.{mod}({x})")
    flat = {"gap": (f"F.adaptive_avg_pool2d({x}, 1).flatten(1)", c),
            "mean": (f"{x}.mean((2, 3))", c),
            "flatten": (f"torch.flatten({x}, 1)", c * h * w),
            "view": (f"{x}.view({x}.size(0), -1)", c * h * w),
            "reshape": (f"{x}.reshape(-1, {c * h * w})", c * h * w)}
    expr, feats = flat[kind]
    y = ctx.let(expr)
    ctx.shape = (feats,)
    if rec.get("hidden"):
        mod = ctx.module("fc", f"nn.Linear({feats}, {rec['hidden']})")
        y = ctx.let(f"self.{mod}({y})")
        ctx.shape = (rec["hidden"],)
        if rec.get("bn1d"):
            mod = ctx.module("bn", f"nn.BatchNorm1d({rec['hidden']})")
            y = ctx.let(f"self.{mod}({y})")
        if rec.get("act"):
            y = _act(rec["act"], ctx, y)
    mod = ctx.module("fc", f"nn.Linear({ctx.shape[0]}, {classes})")
    ctx.shape = (classes,)
    return ctx.let(f"self.{mod}({y})")


EMITTERS: dict[str, Callable[[dict, _Ctx, str], str]] = {
    "conv": _conv, "dw": _dw, "convt": _convt, "bn": _bn, "act": _act, "pool": _pool,
    "adaptive": _adaptive, "interp": _interp, "res": _residual, "cat": _concat, "split": _split,
    "slice": _slice, "se": _se, "shuffle": _shuffle, "perm": _permute, "drop": _dropout,
    "scale": _scale, "chanscale": _chanscale, "head": _head, "shared": _shared, "sattn": _sattn,
    "softmax": _softmax, "gn": _groupnorm, "pad": _pad,
}


def emit_list(records: list[dict], ctx: _Ctx, x: str) -> str:
    for rec in records:
        if len(ctx.shape) != 3 and rec["op"] != "act":
            raise Invalid(f"{rec['op']} after the head")
        x = EMITTERS[rec["op"]](rec, ctx, x)
        if len(ctx.shape) == 3 and min(ctx.shape) < 1:
            raise Invalid("empty tensor")
    return x


INIT_SOURCE = '''\
def init_weights(model, seed):
    """Seeded weights, random batch-norm statistics, PReLU slopes and per-channel scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) - 0.5)
            elif isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        for p in model._parameters.values():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model.eval()
'''


def render(spec: dict) -> str:
    """The spec as Python source defining ``Net``, ``init_weights`` and ``make_model()``."""
    shape = tuple(spec["input"])
    ctx = _Ctx(shape[1:])
    out = emit_list(spec["layers"], ctx, "x")
    init = ["super().__init__()", *ctx.init]
    body = "\n".join(f"        {line}" for line in init)
    fwd = "\n".join(f"        {line}" for line in [*ctx.fwd, f"return {out}"])
    return (f"import torch\nimport torch.nn.functional as F\nfrom torch import nn\n\n\n"
            f"class Net(nn.Module):\n    def __init__(self):\n{body}\n\n"
            f"    def forward(self, x):\n{fwd}\n\n\n{INIT_SOURCE}\n\n"
            f"def make_model(seed={spec['seed']}):\n"
            f"    torch.manual_seed(seed)\n"
            f"    model = init_weights(Net(), seed)\n"
            f"    x = torch.randn({shape}, generator=torch.Generator().manual_seed(seed))\n"
            f"    return model, x\n")


def build(spec: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """Render, execute and instantiate the spec; ``Invalid`` unless the model runs."""
    source = render(spec)
    namespace: dict[str, Any] = {"__name__": f"fuzz_model_{spec['seed']}"}
    exec(compile(source, f"<fuzz spec {spec['seed']}>", "exec"), namespace)  # noqa: S102
    model, x = namespace["make_model"]()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(x.expand(2, *x.shape[1:]).clone())
    except Exception as err:
        raise Invalid(f"the model does not run: {type(err).__name__}: {err}") from err
    return model, x


# =============================================================================== generator
WIDTHS = (4, 6, 8, 12, 16)


def _gen_conv(rng: random.Random, shape: tuple, keep_spatial: bool) -> dict:
    c, h, _ = shape
    k = rng.choice((1, 3, 3, 3, 5, 2)) if h >= 5 else rng.choice((1, 3))
    s = 1 if keep_spatial or h < 6 else rng.choice((1, 1, 2))
    d = rng.choice((1, 1, 1, 2)) if k > 1 and h >= 8 else 1
    p = "same" if s == 1 and rng.random() < 0.25 else (d * (k - 1) // 2 if keep_spatial or rng.random() < 0.7
                                                      else rng.choice((0, 1)))
    if keep_spatial and k % 2 == 0:
        k = 3
        p = d
    out = c if keep_spatial and rng.random() < 0.3 else rng.choice(WIDTHS)
    gs = [g for g in (2, 4) if c % g == 0 and out % g == 0]
    g = rng.choice(gs) if gs and rng.random() < 0.25 else 1
    rec = {"op": "conv", "out": out, "k": k, "s": s, "p": p, "d": d, "g": g, "bias": rng.random() < 0.5}
    off = getattr(rng, "off", ())
    if rng.random() < 0.12 and "asym" not in off:  # a 1xk / kx1 kernel
        rec |= {"k": 1, "kw": 3, "p": "same" if p == "same" else 0, "pw": "same" if p == "same" else 1}
        if rng.random() < 0.5:
            rec["k"], rec["kw"], rec["p"], rec["pw"] = rec["kw"], rec["k"], rec["pw"], rec["p"]
        if rec["p"] == "same":
            del rec["pw"]
    if rng.random() < 0.03 and "pm" not in off:
        rec["pm"] = rng.choice(("reflect", "replicate", "circular"))
    return rec


def _gen_dw(rng, shape, keep_spatial):
    s = 1 if keep_spatial or shape[1] < 6 else rng.choice((1, 2))
    k = rng.choice((3, 3, 5))
    return {"op": "dw", "mult": rng.choice((1, 1, 1, 2)), "k": k, "s": s,
            "p": "same" if s == 1 and rng.random() < 0.3 else k // 2, "d": 1, "bias": rng.random() < 0.3}


def _gen_convt(rng, shape, keep_spatial):
    c, out = shape[0], rng.choice(WIDTHS)
    if keep_spatial or shape[1] > 16:
        k, s, p, opad = 3, 1, 1, 0
    else:
        k, s, p, opad = rng.choice(((2, 2, 0, 0), (3, 2, 1, 1), (4, 2, 1, 0), (3, 1, 1, 0)))
    gs = [g for g in (2, 4) if c % g == 0 and out % g == 0]
    return {"op": "convt", "out": out, "k": k, "s": s, "p": p, "opad": opad, "d": 1,
            "g": rng.choice(gs) if gs and rng.random() < 0.3 else 1, "bias": rng.random() < 0.5}


def _gen_bn(rng, shape, keep_spatial):
    return {"op": "bn", "affine": rng.random() < 0.9}


def _gen_act(rng, shape, keep_spatial=True):
    kind = rng.choice(list(ACTS))
    rec = {"op": "act", "kind": kind, "style": rng.choice(("module", "module", "function", "method"))}
    if kind == "leaky":
        rec["a"] = rng.choice((0.01, 0.1, 0.2))
    if kind == "gelu":
        rec["a"] = rng.choice(("none", "tanh"))
    if kind == "prelu":
        rec["per_channel"] = rng.random() < 0.6
    if rng.random() < 0.3:
        rec["inplace"] = True
    return rec


def _gen_pool(rng, shape, keep_spatial):
    k, s, p = (3, 1, 1) if keep_spatial else rng.choice(((2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0), (3, 2, 0)))
    return {"op": "pool", "kind": rng.choice(("max", "avg")), "k": k, "s": s, "p": p,
            "ceil": not keep_spatial and rng.random() < 0.15, "cip": rng.random() < 0.7,
            "style": rng.choice(("module", "function"))}


def _gen_adaptive(rng, shape, keep_spatial):
    _, h, w = shape
    sizes = [n for n in (1, 2, 4) if h % n == 0 and w % n == 0 and n < min(h, w)] or [1]
    size = 3 if rng.random() < 0.1 and min(h, w) > 3 else rng.choice(sizes)
    return {"op": "adaptive", "kind": rng.choice(("avg", "avg", "max")), "size": size,
            "style": rng.choice(("module", "function"))}


def _gen_interp(rng, shape, keep_spatial):
    _, h, w = shape
    rec = {"op": "interp", "mode": rng.choice(("nearest", "bilinear")),
           "style": rng.choice(("module", "function")), "align": rng.random() < 0.3}
    if rng.random() < 0.3:
        rec["size"] = [h + h // 2, w + w // 2] if rng.random() < 0.5 else [2 * h, 2 * w]
    else:
        rec["scale"] = 2
    return rec


def _gen_body(rng, shape, depth, n) -> list[dict]:
    body, sc = [], _Ctx(shape)
    for _ in range(n):
        rec = _gen_valid(rng, sc, depth, keep_spatial=True)
        if rec is not None:
            body.append(rec)
    return body


def _gen_res(rng, shape, keep_spatial, depth=0):
    c = shape[0]
    body = _gen_body(rng, shape, depth + 1, rng.randint(1, 3))
    proj = rng.random() < 0.2
    sc = _Ctx(shape)
    emit_list(body, sc, "x")
    if sc.shape[0] != c and not proj:
        body.append({"op": "conv", "out": c, "k": rng.choice((1, 3)), "s": 1, "p": "same", "d": 1,
                     "g": 1, "bias": False})
        if rng.random() < 0.5:
            body.append({"op": "bn", "affine": True})
    rec = {"op": "res", "body": body, "proj": proj, "style": rng.choice(("add", "add", "torch"))}
    if rng.random() < 0.5:
        rec["post"] = _gen_act(rng, shape)
    return rec


def _gen_cat(rng, shape, keep_spatial, depth=0):
    merge = rng.choice(("cat", "cat", "cat", "add", "mul"))
    branches = []
    for _ in range(rng.choice((2, 2, 3))):
        body = [] if rng.random() < 0.25 else _gen_body(rng, shape, depth + 1, rng.randint(1, 2))
        sc = _Ctx(shape)
        emit_list(body, sc, "x")
        if merge != "cat" and sc.shape[0] != shape[0]:
            body.append({"op": "conv", "out": shape[0], "k": 1, "s": 1, "p": 0, "d": 1, "g": 1,
                         "bias": rng.random() < 0.5})
        branches.append(body)
    return {"op": "cat", "merge": merge, "branches": branches}


def _gen_split(rng, shape, keep_spatial, depth=0):
    c = shape[0]
    mode = rng.choice(("chunk", "chunk", "sizes", "slice"))
    parts = 3 if mode == "chunk" and c % 3 == 0 and rng.random() < 0.3 else 2
    if mode == "chunk" and c % parts:
        mode = "sizes"
    rec = {"op": "split", "mode": mode, "k": rng.randint(1, max(1, c - 1)),
           "style": rng.choice(("function", "method")), "branches": []}
    sizes = [c // parts] * parts if mode == "chunk" else [rec["k"], c - rec["k"]]
    for size in sizes:
        sub = (size, *shape[1:])
        rec["branches"].append([] if rng.random() < 0.3 else _gen_body(rng, sub, depth + 1, rng.randint(1, 2)))
    return rec


def _gen_slice(rng, shape, keep_spatial):
    return {"op": "slice", "k": rng.randint(1, max(1, shape[0] - 1))}


def _gen_se(rng, shape, keep_spatial):
    return {"op": "se", "hidden": max(1, shape[0] // rng.choice((2, 4))),
            "fc": rng.choice(("linear", "conv")), "pool": rng.choice(("mean", "adaptive")),
            "gate": rng.choice(("sigmoid", "hardsigmoid")), "act": rng.choice(("relu", "silu")),
            "view": rng.choice(("view", "size", "index"))}


def _gen_shuffle(rng, shape, keep_spatial):
    gs = [g for g in (2, 3, 4) if shape[0] % g == 0]
    return {"op": "shuffle", "g": rng.choice(gs) if gs else 2, "style": rng.choice(("size", "literal"))}


def _gen_perm(rng, shape, keep_spatial):
    return {"op": "perm", "inner": rng.choice(("none", "linear", "linear", "ln")),
            "out": rng.choice(WIDTHS), "contiguous": rng.random() < 0.5}


def _gen_drop(rng, shape, keep_spatial):
    return {"op": "drop", "kind": rng.choice(("dropout", "dropout2d")), "p": 0.2,
            "style": rng.choice(("module", "function"))}


def _gen_scale(rng, shape, keep_spatial):
    return {"op": "scale", "a": rng.choice((0.5, 2.0, -1.0)), "b": rng.choice((0.0, 0.1))}


def _gen_chanscale(rng, shape, keep_spatial):
    return {"op": "chanscale", "mode": rng.choice(("mul", "mul", "add"))}


def _gen_shared(rng, shape, keep_spatial):
    return {"op": "shared", "k": rng.choice((1, 3)), "times": rng.choice((2, 2, 3)), "act": rng.random() < 0.5}


def _gen_sattn(rng, shape, keep_spatial):
    return {"op": "sattn", "k": rng.choice((3, 7)), "mode": rng.choice(("meanmax", "mean"))}


def _gen_softmax(rng, shape, keep_spatial):
    return {"op": "softmax", "dim": 1}


def _gen_gn(rng, shape, keep_spatial):
    gs = [g for g in (1, 2, 4) if shape[0] % g == 0]
    return {"op": "gn", "g": rng.choice(gs)}


def _gen_pad(rng, shape, keep_spatial):
    return {"op": "pad", "pads": [rng.choice((0, 1, 2)) for _ in range(4)],
            "mode": rng.choice(("constant", "constant", "reflect", "replicate"))}


def _gen_head(rng, shape) -> dict:
    kinds = ["conv", "gap", "gap", "mean"] + (["flatten", "view", "reshape"] if math.prod(shape) <= 2048 else [])
    kind = rng.choice(kinds)
    rec = {"op": "head", "kind": kind, "classes": rng.choice((4, 5, 10))}
    if kind != "conv" and rng.random() < 0.5:
        rec["hidden"] = rng.choice((8, 16, 32))
        rec["act"] = _gen_act(rng, shape)
        rec["bn1d"] = rng.random() < 0.3
    return rec


# op -> (generator, weight at top level, allowed inside a block body)
GENERATORS: dict[str, tuple[Callable, float, bool]] = {
    "conv": (_gen_conv, 3.0, True), "dw": (_gen_dw, 1.5, True), "convt": (_gen_convt, 0.7, True),
    "bn": (_gen_bn, 1.5, True), "act": (_gen_act, 2.5, True), "pool": (_gen_pool, 1.0, True),
    "adaptive": (_gen_adaptive, 0.3, False), "interp": (_gen_interp, 0.6, False),
    "res": (_gen_res, 1.5, True), "cat": (_gen_cat, 1.0, True), "split": (_gen_split, 1.0, True),
    "slice": (_gen_slice, 0.3, True), "se": (_gen_se, 0.8, True), "shuffle": (_gen_shuffle, 0.6, True),
    "perm": (_gen_perm, 0.6, True), "drop": (_gen_drop, 0.3, True), "scale": (_gen_scale, 0.3, True),
    "chanscale": (_gen_chanscale, 0.4, True), "shared": (_gen_shared, 0.25, True),
    "sattn": (_gen_sattn, 0.3, True), "softmax": (_gen_softmax, 0.15, True), "gn": (_gen_gn, 0.3, True),
    "pad": (_gen_pad, 0.3, False),
}
BLOCKS = ("res", "cat", "split")


def _gen_valid(rng: random.Random, ctx: _Ctx, depth: int, keep_spatial: bool) -> dict | None:
    """A record valid at ``ctx.shape`` (appended to ``ctx``), or None after 12 tries."""
    ops = [op for op, (_, _, in_body) in GENERATORS.items()
           if (in_body or not keep_spatial) and not (op in BLOCKS and depth >= 2)
           and op not in getattr(rng, "off", ())]
    weights = [GENERATORS[op][1] for op in ops]
    for _ in range(12):
        op = rng.choices(ops, weights)[0]
        gen = GENERATORS[op][0]
        try:
            rec = gen(rng, ctx.shape, keep_spatial, depth) if op in BLOCKS else gen(rng, ctx.shape, keep_spatial)
            trial = ctx.scratch()
            emit_list([rec], trial, "x")
        except Invalid:
            continue
        c, h, w = trial.shape
        if keep_spatial and (h, w) != ctx.shape[1:]:
            continue
        if not (2 <= min(h, w) and max(h, w) <= 32 and c <= 48) and op != "adaptive":
            continue
        emit_list([rec], ctx, "x")
        return rec
    return None


class _Rng(random.Random):
    """The generator's random source, carrying the ops it must not use."""

    def __init__(self, seed: int, off: frozenset[str] = frozenset()):
        super().__init__(seed)
        self.off = off


# Features that ``--off`` can disable besides the ops: non-zero padding modes, 1xk/kx1 kernels.
FEATURES = ("pm", "asym")


def generate(seed: int, off: Sequence[str] = ()) -> dict:
    """A random valid spec for ``seed`` (deterministic); ``off`` names ops/FEATURES not to use."""
    unknown = set(off) - set(GENERATORS) - set(FEATURES)
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; ops: {', '.join(GENERATORS)}, features: {', '.join(FEATURES)}")
    rng = _Rng(seed, frozenset(off))
    for _ in range(20):
        h, w = rng.choice(((16, 16), (16, 16), (12, 12), (12, 16), (8, 8)))
        cin = rng.choice((3, 3, 3, 1, 4))
        spec = {"seed": seed, "input": [rng.choice((1, 1, 1, 2)), cin, h, w], "layers": []}
        ctx = _Ctx((cin, h, w))
        if rng.random() < 0.9:
            for _ in range(5):
                with contextlib.suppress(Invalid):
                    stem = _gen_conv(rng, ctx.shape, keep_spatial=False)
                    emit_list([stem], ctx.scratch(), "x")
                    emit_list([stem], ctx, "x")
                    spec["layers"].append(stem)
                    break
        for _ in range(rng.randint(2, 8)):
            rec = _gen_valid(rng, ctx, 0, keep_spatial=False)
            if rec is not None:
                spec["layers"].append(rec)
        spec["layers"].append(_gen_head(rng, ctx.shape))
        try:
            build(spec)
            return spec
        except Invalid:
            continue
    raise RuntimeError(f"seed {seed}: no valid spec in 20 tries")


# =============================================================================== findings
@dataclass
class Finding:
    """One invariant violation."""

    seed: int
    path: str
    pass_name: str  # a registered pass, "import", or the compiled graph's producer
    spec: str       # the pass in pipeline syntax ("" for import)
    invariant: str  # a key of INVARIANTS
    kind: str       # the invariant again, or "stage/ExceptionType" for a crash
    message: str
    where: str = ""  # the innermost slimgraph frame of the exception, when there is one

    def key(self) -> tuple[str, str, str, str]:
        return (self.path, self.pass_name, self.invariant, self.kind)

    def signature(self) -> tuple[int, str, str, str, str]:
        return (self.seed, *self.key())


@dataclass
class Decline:
    """A clean refusal: a SlimgraphError, or a path torch itself cannot export to."""

    seed: int
    path: str
    pass_name: str
    reason: str


@dataclass
class GraphResult:
    seed: int
    findings: list[Finding] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    runs: int = 0  # (path, pass) executions, prefix passes included
    changed: Counter = field(default_factory=Counter)  # pass -> paths where it changed the graph
    seconds: float = 0.0


class PathUnavailable(Exception):
    """torch cannot export the model this way (not slimgraph's doing)."""


# Python programming errors: never an intended decline, even wrapped in a SlimgraphError.
_BUG_TYPES = (AssertionError, AttributeError, IndexError, KeyError, NameError, TypeError,
              UnboundLocalError, ZeroDivisionError, RecursionError)


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and its explicit causes (``raise ... from``), outermost first."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__
    return out


def _where(err: BaseException) -> str:
    """``slimgraph/file.py:line in fn`` of the innermost slimgraph frame in the chain."""
    for e in reversed(_chain(err)):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/slimgraph/" in f.filename
                  and "/site-packages/" not in f.filename]
        if frames:
            f = frames[-1]
            return f"{f.filename[f.filename.rindex('/slimgraph/') + 1:]}:{f.lineno} in {f.name}"
    return ""


def _short(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}"


def classify(err: BaseException) -> tuple[str, str] | None:
    """None for a clean decline; else (invariant, kind) of the finding ``err`` is.

    A SlimgraphError is a decline, unless it wraps a Python programming error (AssertionError,
    KeyError, ...: a bug caught and re-raised) or is a VerifyError (a broken graph).
    """
    chain = _chain(err)
    if not isinstance(err, SlimgraphError):
        return "crash", type(err).__name__
    inner = [e for e in chain if not isinstance(e, PassError)] or [err]
    first = inner[0]  # what the pass (or the API) raised
    if not isinstance(first, SlimgraphError):
        return "crash", type(first).__name__
    bugs = [e for e in inner if isinstance(e, _BUG_TYPES)]
    if bugs:
        return "crash", f"{type(bugs[0]).__name__} (wrapped in {type(first).__name__})"
    if isinstance(first, VerifyError):
        return "verify", "verify"
    return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters' and torch's warnings are noise here, and so is what the TorchScript ONNX
    exporter's C++ code writes straight to file descriptors 1 and 2 when an export fails."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with warnings.catch_warnings(), open(os.devnull, "w") as null:
        warnings.simplefilter("ignore")
        logger = logging.getLogger("torch")
        level = logger.level
        logger.setLevel(logging.ERROR)
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            for fd, copy_fd in zip((1, 2), saved, strict=True):
                os.dup2(copy_fd, fd)
                os.close(copy_fd)
            logger.setLevel(level)


def rel_l2(ref: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> float:
    if len(ref) != len(got) or any(np.shape(a) != np.shape(b) for a, b in zip(ref, got, strict=True)):
        return math.inf
    a = np.concatenate([np.asarray(r, np.float64).ravel() for r in ref])
    b = np.concatenate([np.asarray(g, np.float64).ravel() for g in got])
    norm = float(np.linalg.norm(a))
    err = float(np.linalg.norm(a - b))
    if not np.isfinite(b).all():
        return math.inf
    return err / norm if norm > 0 else err


# =============================================================================== import paths
def import_graph(path: str, model: torch.nn.Module, x: torch.Tensor, tmp: Path):
    """The model as a Graph through one path, the way a user would get it there."""
    from slimgraph.ir.export_frontend import export_module
    from slimgraph.ir.loading import load_model

    if path == "fx":
        return load_model(model, (x,))
    if path == "pt2":
        try:
            ep, _, _ = export_module(model, (x,))
            torch.export.save(ep, tmp / "model.pt2")
        except Exception as err:
            raise PathUnavailable(f"torch.export: {_short(err, 160)}") from err
        return load_model(str(tmp / "model.pt2"))
    if path == "onnx":
        try:
            torch.onnx.export(model, (x,), str(tmp / "model.onnx"), dynamo=False, opset_version=17,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["input"],
                              output_names=["output"],
                              dynamic_axes={"input": {0: "n"}, "output": {0: "n"}})
        except Exception as err:
            raise PathUnavailable(f"torch.onnx.export: {_short(err, 160)}") from err
        return load_model(str(tmp / "model.onnx"), input_shapes={"input": tuple(x.shape)})
    raise ValueError(f"unknown path {path!r}")


def ort_run(file: Path, x: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(file), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


def pass_specs(seed: int, names: Sequence[str] | None = None) -> dict[str, str]:
    """One option variant per registered pass, drawn from ``seed``."""
    from slimgraph.passes.base import available_passes

    rng = random.Random(f"passes-{seed}")
    # a pass without VARIANTS (new) runs with its defaults; tests/fuzz asks for its variants
    return {n: rng.choice(VARIANTS.get(n, [n])) for n in available_passes() if names is None or n in names}


# =============================================================================== one model
class Runner:
    """One model through the import paths, the passes and the checks; collects a GraphResult.

    ``passes`` maps pass name -> spec; each runs on every path after ``cleanup`` and
    ``fold-bn`` (run once per path). ``compile_targets`` are ("import" or a pass name, path)
    pairs whose graph is built with TVM. ``checks`` limits the invariants checked (crashes are
    always recorded), which keeps shrinking fast.
    """

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, *, seed: int, tmp: Path,
                 paths: Sequence[str] = PATHS, passes: dict[str, str] | None = None,
                 compile_targets: Sequence[tuple[str, str]] = (), checks: Sequence[str] | None = None):
        self.model, self.x, self.seed, self.tmp = model, x, seed, Path(tmp)
        self.paths = list(paths)
        self.passes = dict(passes) if passes is not None else pass_specs(seed)
        self.compile_targets = list(compile_targets)
        self.checks = set(checks) if checks else set(INVARIANTS)
        self.result = GraphResult(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        shape = tuple(x.shape[1:])
        self.xt = torch.randn((2, *shape), generator=gen)
        self.calib = [(torch.randn((8, *shape), generator=gen),) for _ in range(2)]
        self._outs: dict[int, tuple[Any, list[np.ndarray]]] = {}
        self._exportable: bool | None = None
        self._layers: dict[str, int] = {}
        self._macs: dict[str, int] = {}
        self._n = 0

    # ---- recording
    def find(self, path: str, pass_name: str, spec: str, invariant: str, message: str,
             kind: str | None = None, where: str = "") -> None:
        self.result.findings.append(Finding(self.seed, path, pass_name, spec, invariant,
                                            kind or invariant, message, where))

    def fail(self, path: str, pass_name: str, spec: str, stage: str, err: BaseException) -> None:
        verdict = classify(err)
        if verdict is None:
            self.result.declines.append(Decline(self.seed, path, pass_name, f"{stage}: {_short(err, 200)}"))
            return
        invariant, kind = verdict
        self.find(path, pass_name, spec, invariant, _short(err, 600),
                  kind=f"{stage}/{kind}" if invariant == "crash" else kind, where=_where(err))

    def outputs(self, graph, path: str, pass_name: str, spec: str) -> list[np.ndarray] | None:
        """The graph's outputs on the test batch (cached); None (and a finding) if it fails."""
        hit = self._outs.get(id(graph))
        if hit is not None and hit[0] is graph:
            return hit[1]
        try:
            with _quiet():
                outs = graph.run(self.xt)
        except Exception as err:
            self.fail(path, pass_name, spec, "run", err)
            return None
        self._outs[id(graph)] = (graph, outs)
        return outs

    # ---- the whole model
    def run(self) -> GraphResult:
        t0 = time.perf_counter()
        with torch.no_grad():
            self.ref = [t.numpy() for t in _flat(self.model(self.xt))]
        imported = {p: g for p in self.paths if (g := self._import(p)) is not None}
        self._cross_import(imported)
        prefixed = {p: g for p, g in ((p, self._prefix(p, g)) for p, g in imported.items()) if g is not None}
        self._cross_prefix(prefixed)
        produced: dict[str, dict[str, Any]] = {}
        for name, spec in self.passes.items():
            per_path = {p: self._run_pass(p, self._student(g) if name in TRAINING_PASSES else g,
                                          name, spec, imported[p]) for p, g in prefixed.items()}
            self._cross_paths(name, spec, per_path)
            produced[name] = per_path
        for target, path in self.compile_targets:
            graph = imported.get(path) if target == "import" else produced.get(target, {}).get(path)
            if graph is not None and not isinstance(graph, str):
                self._compile(target, path, graph if target == "import" else graph[0])
        self.result.seconds = round(time.perf_counter() - t0, 2)
        return self.result

    # ---- import
    def _import(self, path: str):
        try:
            with _quiet():
                graph = import_graph(path, self.model, self.x, self.tmp)
        except PathUnavailable as err:
            self.result.declines.append(Decline(self.seed, path, "import", f"path unavailable: {err}"))
            return None
        except Exception as err:
            self.fail(path, "import", "", "import", err)
            return None
        self._verify(path, "import", "", graph)
        outs = self.outputs(graph, path, "import", "")
        if outs is not None:
            if "shape" in self.checks and _shapes(outs) != _shapes(self.ref):
                self.find(path, "import", "", "shape", f"imported outputs {_shapes(outs)}, the model's {_shapes(self.ref)}")
            elif "import" in self.checks and (err := rel_l2(self.ref, outs)) > IMPORT_TOL:
                self._import_mismatch(path, err)
        self._onnx_check(path, "import", "", graph)
        return graph

    def _import_mismatch(self, path: str, err: float) -> None:
        if path == "onnx":  # is the exported file itself faithful? then the frontend is at fault
            with contextlib.suppress(Exception):
                if rel_l2(self.ref, ort_run(self.tmp / "model.onnx", self.xt)) > IMPORT_TOL:
                    self.result.declines.append(Decline(self.seed, path, "import", (
                        "torch.onnx.export is not faithful to the model (onnxruntime differs)")))
                    return
        self.find(path, "import", "", "import", f"imported graph vs torch model: rel-L2 {err:.3g}")

    def _prefix(self, path: str, graph):
        for name in PREFIX:
            out = self._run_pass(path, graph, name, name, graph)
            if isinstance(out, str):
                return None
            graph = out[0]
        return graph

    # ---- passes
    def _student(self, graph):
        """``graph`` after STUDENT (the graph itself where that changes nothing or fails)."""
        from slimgraph.passes.base import parse_pipeline
        from slimgraph.passes.context import PassContext
        from slimgraph.passes.manager import PassManager

        try:
            with _quiet():
                out, _ = PassManager(parse_pipeline(STUDENT)).run(graph, PassContext(
                    calibration=self.calib, seed=self.seed))
        except Exception:  # noqa: BLE001 - prune-weights' own findings are its fuzz runs' business
            return graph
        return out

    def _run_pass(self, path: str, before, name: str, spec: str, reference):
        """(graph, record) for the pass's output, or a string saying why there is none."""
        from slimgraph.passes.base import parse_pipeline
        from slimgraph.passes.context import PassContext
        from slimgraph.passes.manager import PassManager

        code = before.gm.code
        before_out = self.outputs(before, path, name, spec)
        (p,) = parse_pipeline(spec)
        ctx = PassContext(calibration=self.calib, reference=reference, seed=self.seed)
        self.result.runs += 1
        try:
            with _quiet():
                out, records = PassManager([p]).run(before, ctx)
        except Exception as err:
            crashed = classify(err) is not None
            self.fail(path, name, spec, "pass", err)
            return ("crashed: " if crashed else "declined: ") + _short(err, 200)
        record = _as_dict(records[-1])
        if record["changed"]:
            self.result.changed[name] += 1
        if "mutation" in self.checks and (before.gm.code != code or (
                before_out is not None and rel_l2(before_out, before.run(self.xt)) != 0.0)):
            self.find(path, name, spec, "mutation", "the pass changed its input graph")
        self._check_output(path, name, spec, p, before, before_out, out, record)
        return out, record

    def _check_output(self, path, name, spec, p, before, before_out, out, record) -> None:
        if "skipped" in self.checks and not record["changed"] and not record["skipped"]:
            self.find(path, name, spec, "skipped", "changed=False with an empty skipped list")
        self._verify(path, name, spec, out)
        outs = self.outputs(out, path, name, spec)
        if outs is None or before_out is None:
            return
        if "shape" in self.checks and _shapes(outs) != _shapes(before_out):
            self.find(path, name, spec, "shape", f"outputs {_shapes(outs)}, input graph's {_shapes(before_out)}")
            return
        if "exact" in self.checks and p.exact and (err := rel_l2(before_out, outs)) > EXACT_TOL:
            self.find(path, name, spec, "exact", f"exact pass moved the outputs: rel-L2 {err:.3g}")
        if ("prune-oracle" in self.checks and name == "prune-channels" and record["changed"]
                and p.criterion != "reconstruction"):
            self._prune_oracle(path, spec, before, outs, record)
        self._onnx_check(path, name, spec, out)

    def _prune_oracle(self, path, spec, before, outs, record) -> None:
        """Holds if either oracle matches: ``zeroed`` (producers' removed out-channels zeroed;
        valid where every op between producer and consumer maps 0 to 0) or ``ignored``
        (consumers' removed in-channels zeroed; valid for any element-wise path, e.g. sigmoid)."""
        from tests.passes.prune_fixtures import zeroed

        errors = {}
        for oracle_name, oracle in (("zeroed", zeroed), ("ignored", ignored_inputs)):
            try:
                graph = oracle(before, record["removed"])
                errors[oracle_name] = rel_l2(graph.run(self.xt), outs)
            except Exception as err:
                errors[oracle_name] = _short(err, 120)
        if not any(isinstance(e, float) and e <= PRUNE_TOL for e in errors.values()):
            text = ", ".join(f"{k}: {e:.3g}" if isinstance(e, float) else f"{k}: {e}" for k, e in errors.items())
            self.find(path, "prune-channels", spec, "prune-oracle",
                      f"pruned graph vs the unpruned one with the removed channels zeroed: {text}")

    def _verify(self, path, name, spec, graph) -> None:
        if "verify" not in self.checks:
            return
        try:
            with _quiet():
                graph.verify()
        except Exception as err:
            if isinstance(err, VerifyError):
                self.find(path, name, spec, "verify", _short(err, 600), where=_where(err))
            else:
                self.fail(path, name, spec, "verify", err)

    # ---- ONNX round trip
    def _model_exportable(self) -> bool:
        if self._exportable is None:
            if "onnx" in self.paths:
                self._exportable = (self.tmp / "model.onnx").is_file()
            else:
                try:
                    with _quiet():
                        import_graph("onnx", self.model, self.x, self.tmp)
                    self._exportable = True
                except Exception:
                    self._exportable = False
        return self._exportable

    def _onnx_check(self, path, name, spec, graph) -> None:
        if "onnx" not in self.checks:
            return
        b = graph.fixed_batch
        x = self.xt if b is None else self.xt[:b] if b <= 2 else None
        if x is None:
            return
        self._n += 1
        file = self.tmp / f"check{self._n}.onnx"
        try:
            with _quiet():
                graph.to_onnx(file, dynamic_batch=b is None)
        except Exception as err:
            if isinstance(err, SlimgraphError) and not self._model_exportable():
                self.result.declines.append(Decline(self.seed, path, name, "to_onnx: the model itself does not export"))
            else:
                self.find(path, name, spec, "onnx", f"to_onnx failed: {_short(err, 500)}", where=_where(err))
            return
        try:
            got = ort_run(file, x)
        except Exception as err:
            self.find(path, name, spec, "onnx", f"onnxruntime rejects the to_onnx file: {_short(err, 500)}")
            return
        finally:
            file.unlink(missing_ok=True)
        ref = self.outputs(graph, path, name, spec) if b is None else None
        if ref is None:
            try:
                ref = graph.run(x)
            except Exception:
                return  # already recorded by outputs()
        if (err := rel_l2(ref, got)) > (INTEGER_ONNX_TOL if name in INTEGER_PASSES else ONNX_TOL):
            self.find(path, name, spec, "onnx", f"to_onnx + onnxruntime vs Graph.run: rel-L2 {err:.3g}")

    # ---- across paths
    def _cross_paths(self, name: str, spec: str, per_path: dict[str, Any]) -> None:
        if "paths" not in self.checks or len(per_path) < 2:
            return
        ran = {p: v for p, v in per_path.items() if not isinstance(v, str)}
        for p, v in per_path.items():
            if isinstance(v, str) and v.startswith("declined") and ran:  # a crash is its own finding
                self.find(p, name, spec, "paths", f"{v[:200]} on {p}, but runs on {', '.join(ran)}")
        if len(ran) < 2:
            return
        base_path, (base, base_rec) = next(iter(ran.items()))
        base_out = self.outputs(base, base_path, name, spec)
        for p, (g, rec) in list(ran.items())[1:]:
            stats = {k: (f(base_rec["stats"]), f(rec["stats"])) for k, f in _COMPARED.items()}
            if self._macs.get(p) != self._macs.get(base_path):
                stats.pop("macs_after")  # the imports already differ (reported once, on import)
            if any(a != b for a, b in stats.values()):
                self.find(p, name, spec, "paths", f"{base_path} vs {p}: " + ", ".join(
                    f"{k} {a} vs {b}" for k, (a, b) in stats.items()))
                continue
            if self._layers.get(p) != self._layers.get(base_path):
                continue  # different input graphs (reported once, after fold-bn)
            outs = self.outputs(g, p, name, spec)
            tol = TRAINED_PATH_TOL if name in TRAINING_PASSES else PATH_TOL
            if base_out is not None and outs is not None and (err := rel_l2(base_out, outs)) > tol:
                self.find(p, name, spec, "paths", f"{base_path} vs {p} outputs: rel-L2 {err:.3g}")

    def _cross_prefix(self, prefixed: dict[str, Any]) -> None:
        """After cleanup,fold-bn the paths should hold the same layers: the exporters fold and
        drop what they can, and these passes are where slimgraph catches up."""
        self._layers = {p: _layer_params(g) for p, g in prefixed.items()}
        if "paths" not in self.checks or len(prefixed) < 2:
            return
        base_path, base = next(iter(self._layers.items()))
        for p, n in self._layers.items():
            if n != base:
                self.find(p, "fold-bn", "fold-bn", "paths", f"after cleanup,fold-bn the layers hold "
                          f"{base} parameters on {base_path}, {n} on {p}")

    def _cross_import(self, imported: dict[str, Any]) -> None:
        from slimgraph.ir.analysis import AnalysisManager, Cost

        if "paths" not in self.checks or len(imported) < 2:
            return
        macs = {}
        for p, g in imported.items():
            try:
                macs[p] = AnalysisManager().get(Cost, g).macs
            except Exception as err:
                self.fail(p, "import", "", "cost", err)
        self._macs = macs
        base = next(iter(macs.items()), None)
        for p, m in macs.items():
            if base and m != base[1]:
                self.find(p, "import", "", "paths", f"imported MACs {base[0]} {base[1]} vs {p} {m}")

    # ---- TVM
    def _compile(self, target: str, path: str, graph) -> None:
        from slimgraph.backends.tvm import build

        spec = "" if target == "import" else self.passes[target]
        inputs = graph.example_inputs
        try:
            with _quiet():
                compiled = build(graph.to_torch(), inputs, "x86", tune_trials=0, progress=False)
                got = compiled(*[t.numpy() for t in inputs])
                ref = graph.run(*inputs)
        except Exception as err:
            self.fail(path, target, spec, "compile", err)
            return
        self.result.runs += 1
        if (err := rel_l2(ref, got)) > COMPILE_TOL:
            self.find(path, target, spec, "compile", f"TVM x86 untuned vs Graph.run: rel-L2 {err:.3g}")


def ignored_inputs(graph, removed: dict[str, dict[str, list[int]]]):
    """The consumer-side oracle: a copy of the UNPRUNED graph whose consumers (conv, conv
    transpose, linear; grouped too) have zero weights on their removed in-channels, so the
    removed channels' values, whatever they are, reach no output."""
    from torch import nn

    out = graph.copy()
    targets = {n.name: n.target for n in out.nodes if n.op == "call_module"}
    with torch.no_grad():
        for node, entry in removed.items():
            if "in" not in entry or node not in targets:
                continue
            mod, idx = out.gm.get_submodule(targets[node]), list(entry["in"])
            if isinstance(mod, nn.Linear | nn.modules.conv._ConvTransposeNd):
                w = mod.weight if isinstance(mod, nn.modules.conv._ConvTransposeNd) else mod.weight.t()
                w[idx] = 0.0
            elif isinstance(mod, nn.modules.conv._ConvNd):
                per, rows = mod.weight.shape[1], mod.weight.shape[0] // mod.groups
                for i in idx:
                    mod.weight[(i // per) * rows:(i // per + 1) * rows, i % per] = 0.0
    return out


# What must agree across paths: MACs after the pass, and the parameters it removed (constant
# folding in the exporters legitimately changes the parameter count of the imported graph).
_COMPARED = {"macs_after": lambda st: st.get("macs_after"),
             "params_removed": lambda st: (st.get("params_before") or 0) - (st.get("params_after") or 0)}


def _as_dict(record: Any) -> dict[str, Any]:
    """A pass record as its JSON form (``PassRecord.to_dict``; older managers gave dicts)."""
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


def _layer_params(graph) -> int:
    """Parameters held by the graph's modules (constants outside modules not counted)."""
    return sum(p.numel() for n in graph.nodes if n.op == "call_module"
               for p in graph.module(n).parameters())


def _flat(out: Any) -> list[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _shapes(outs: Sequence[np.ndarray]) -> list[tuple[int, ...]]:
    return [tuple(np.shape(o)) for o in outs]


def run_model(model: torch.nn.Module, x: torch.Tensor, *, seed: int = 0, tmp: Path | None = None,
              **options: Any) -> GraphResult:
    """Run the fuzz checks on one (model, example input); see ``Runner`` for the options."""
    if tmp is not None:
        return Runner(model, x, seed=seed, tmp=tmp, **options).run()
    with tempfile.TemporaryDirectory(prefix="slimgraph-fuzz-") as d:
        return Runner(model, x, seed=seed, tmp=Path(d), **options).run()


# =============================================================================== a batch
def compile_targets(seed: int, every: int, paths: Sequence[str], names: Sequence[str]) -> list[tuple[str, str]]:
    """Every ``every``-th seed: its imported graph and one pass's output (both rotating)."""
    if not every or seed % every:
        return []
    turn = seed // every
    return [("import", paths[turn % len(paths)]), (names[turn % len(names)], paths[(turn + 1) % len(paths)])]


def run_seed(seed: int, *, paths: Sequence[str] = PATHS, compile_every: int = 0,
             passes: Sequence[str] | None = None, off: Sequence[str] = (),
             tmp: Path | None = None) -> tuple[dict, GraphResult]:
    spec = generate(seed, off)
    model, x = build(spec)
    specs = pass_specs(seed, passes)
    result = run_model(model, x, seed=seed, tmp=tmp, paths=paths, passes=specs,
                       compile_targets=compile_targets(seed, compile_every, paths, list(specs)))
    return spec, result


def summarize(results: Sequence[GraphResult], seconds: float) -> dict[str, Any]:
    findings = [f for r in results for f in r.findings]
    declines = [d for r in results for d in r.declines]
    return {
        "graphs": len(results), "runs": sum(r.runs for r in results), "seconds": round(seconds, 1),
        "crashes": dict(Counter(f"{f.kind} [{f.pass_name}]" for f in findings if f.invariant == "crash").most_common()),
        "violations": dict(Counter(f.invariant for f in findings if f.invariant != "crash").most_common()),
        "violations_by_pass": dict(Counter(f"{f.invariant} [{f.pass_name}]" for f in findings
                                           if f.invariant != "crash").most_common()),
        "declines": len(declines),
        "declines_by_pass": dict(Counter(f"{d.pass_name}: {_decline_kind(d.reason)}" for d in declines).most_common()),
        "changed": dict(sum((r.changed for r in results), Counter()).most_common()),
        "graphs_with_findings": sum(1 for r in results if r.findings),
    }


def _decline_kind(reason: str) -> str:
    """A decline's reason without the numbers and names that differ between graphs."""
    text = re.sub(r"\d+(\.\d+)?", "N", reason)
    return re.sub(r"'[^']*'", "'…'", text)[:110]


def format_summary(summary: dict[str, Any]) -> str:
    lines = ["| | count |", "|---|---|",
             f"| graphs | {summary['graphs']} |", f"| pass runs (incl. cleanup, fold-bn, compiles) | {summary['runs']} |",
             f"| graphs with a finding | {summary['graphs_with_findings']} |",
             f"| crashes | {sum(summary['crashes'].values())} |",
             f"| invariant violations | {sum(summary['violations'].values())} |",
             f"| clean declines | {summary['declines']} |", f"| wall time (s) | {summary['seconds']} |"]
    for title, key in (("crash kind [pass]", "crashes"), ("violation [pass]", "violations_by_pass"),
                       ("decline [pass]", "declines_by_pass")):
        if summary[key]:
            lines += ["", f"| {title} | count |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in summary[key].items()]
    return "\n".join(lines)


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_seed_job(job: tuple[int, dict]) -> tuple[dict, GraphResult]:
    seed, kwargs = job
    return run_seed(seed, **kwargs)


def _seed_results(seeds: Sequence[int], jobs: int, kwargs: dict,
                  stop: Callable[[], bool]) -> Iterator[tuple[int, dict, GraphResult]]:
    """(seed, spec, result) in seed order, until ``stop()`` says to start no more seeds; with
    ``jobs`` > 1 from that many spawned worker processes kept ``jobs`` seeds ahead (spawned,
    not forked: torch's thread pools do not survive a fork)."""
    if jobs <= 1:
        for seed in seeds:
            if stop():
                return
            yield seed, *run_seed(seed, **kwargs)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    todo = iter(seeds)
    pending: list[tuple[int, cf.Future]] = []
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init) as pool:
        try:
            while True:
                while len(pending) < jobs and not stop() and (seed := next(todo, None)) is not None:
                    pending.append((seed, pool.submit(_run_seed_job, (seed, kwargs))))
                if not pending:
                    return
                seed, fut = pending.pop(0)
                yield seed, *fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def run_fuzz(seeds: Sequence[int], *, paths: Sequence[str] = PATHS, compile_every: int = 0,
             passes: Sequence[str] | None = None, off: Sequence[str] = (),
             time_limit: float | None = None, progress: Callable[[str], None] | None = None,
             on_graph: Callable[[list, list], None] | None = None,
             jobs: int = 1) -> tuple[list[dict], list[GraphResult], dict]:
    """Run the seeds; returns (specs, results, summary). Stops starting seeds past
    ``time_limit``. ``jobs`` > 1 runs seeds in that many worker processes (one thread each);
    results come back in seed order, so a run's output does not depend on ``jobs``."""
    t0 = time.perf_counter()
    specs, results = [], []
    kwargs = {"paths": list(paths), "compile_every": compile_every, "passes": passes, "off": list(off)}

    def stop() -> bool:
        return time_limit is not None and time.perf_counter() - t0 > time_limit

    for seed, spec, result in _seed_results(seeds, jobs, kwargs, stop):
        specs.append(spec)
        results.append(result)
        if progress:
            progress(f"seed {seed}: {result.seconds:.1f}s, {len(result.findings)} finding(s), "
                     f"{len(result.declines)} decline(s)"
                     + "".join(f"\n    {f.invariant} {f.kind} [{f.path} {f.spec or f.pass_name}] {f.message[:160]}"
                               for f in result.findings))
        if on_graph:
            on_graph(specs, results)
    return specs, results, summarize(results, time.perf_counter() - t0)


# =============================================================================== shrinking
def _lists(spec: dict) -> list[tuple]:
    """Key paths of every record list in the spec (top level, bodies, branches)."""
    out = [("layers",)]

    def walk(key: tuple, records: list[dict]) -> None:
        for i, rec in enumerate(records):
            subs = [(key + (i, "body"), rec["body"])] if "body" in rec else []
            subs += [(key + (i, "branches", j), b) for j, b in enumerate(rec.get("branches", []))]
            for k, sub in subs:
                out.append(k)
                walk(k, sub)

    walk(("layers",), spec["layers"])
    return out


def _get(obj: Any, key: tuple) -> Any:
    for k in key:
        obj = obj[k]
    return obj


def _records(spec: dict) -> Iterator[tuple[tuple, int, dict]]:
    for key in _lists(spec):
        for i, rec in enumerate(_get(spec, key)):
            yield key, i, rec


# field -> simpler values to try, in order (a value is tried only where it differs)
_SIMPLER: dict[str, Callable[[Any, dict], list[Any]]] = {
    "k": lambda v, r: [] if r["op"] in ("slice", "split") else [k for k in (1, 3) if k < v],
    "s": lambda v, r: [1] if v != 1 else [],
    "d": lambda v, r: [1] if v != 1 else [],
    "p": lambda v, r: [0] if v not in (0, "same") else ([r["d"] * (r["k"] - 1) // 2] if v == "same" else []),
    "g": lambda v, r: [1] if v != 1 else [],
    "mult": lambda v, r: [1] if v != 1 else [],
    "bias": lambda v, r: [False] if v else [],
    "inplace": lambda v, r: [False] if v else [],
    "style": lambda v, r: [s for s in ("module", "add", "function") if s != v][:1] if v not in ("module", "add") else [],
    "kind": lambda v, r: ["relu"] if r["op"] == "act" and v != "relu" else [],
    "proj": lambda v, r: [False] if v else [],
    "post": lambda v, r: [None] if v else [],
    "act": lambda v, r: [None] if r["op"] == "head" and v else [],
    "hidden": lambda v, r: [0] if r["op"] == "head" and v else [],
    "ceil": lambda v, r: [False] if v else [],
    "align": lambda v, r: [False] if v else [],
    "inner": lambda v, r: ["none"] if v != "none" else [],
    "contiguous": lambda v, r: [False] if v else [],
    "classes": lambda v, r: [2] if v > 2 else [],
    "kw": lambda v, r: [r["k"]] if v != r["k"] else [],
    "pw": lambda v, r: [r["p"]] if v != r["p"] and r["p"] != "same" else [],
    "pm": lambda v, r: ["zeros"] if v != "zeros" else [],
    "merge": lambda v, r: ["cat"] if v != "cat" else [],
    "bn1d": lambda v, r: [False] if v else [],
    "times": lambda v, r: [2] if v > 2 else [],
    "mode": lambda v, r: ["nearest"] if v != "nearest" and r["op"] == "interp" else (
        ["constant"] if r["op"] == "pad" and v != "constant" else ["mul"] if r["op"] == "chanscale" and v != "mul" else []),
}
_WIDTHS = ("out", "hidden")


def _halve_widths(spec: dict) -> dict:
    """Every width halved by one rule, so widths that were equal stay equal."""
    c = copy.deepcopy(spec)
    for _, _, rec in _records(c):
        for key in _WIDTHS:
            if isinstance(rec.get(key), int) and rec[key] > 1:
                rec[key] = max(1, rec[key] // 2)
        if rec["op"] in ("slice", "split") and rec.get("k", 1) > 1:
            rec["k"] //= 2
    return c


def candidates(spec: dict) -> Iterator[tuple[str, dict]]:
    """Smaller variants of ``spec``, the biggest cuts first."""
    n = len(spec["layers"])
    size = n // 2
    while size >= 2:
        for start in range(0, n, size):
            c = copy.deepcopy(spec)
            del c["layers"][start:start + size]
            yield f"delete layers {start}-{start + size - 1}", c
        size //= 2
    for key, i, rec in reversed(list(_records(spec))):
        c = copy.deepcopy(spec)
        del _get(c, key)[i]
        yield f"delete {rec['op']} at {key}[{i}]", c
    for key, i, rec in _records(spec):
        subs = [rec["body"]] if "body" in rec else rec.get("branches", [])
        for j, sub in enumerate(subs):
            c = copy.deepcopy(spec)
            _get(c, key)[i:i + 1] = copy.deepcopy(sub)
            yield f"unwrap {rec['op']} at {key}[{i}] (part {j})", c
    h, w = spec["input"][2:]
    if max(h, w) > 4:
        c = copy.deepcopy(spec)
        c["input"] = [*spec["input"][:2], max(2, h // 2), max(2, w // 2)]
        yield "halve the input size", c
    yield "halve every width", _halve_widths(spec)
    for key, i, rec in _records(spec):
        for field_name, simpler in _SIMPLER.items():
            if field_name not in rec:
                continue
            for value in simpler(rec[field_name], rec):
                c = copy.deepcopy(spec)
                _get(c, key)[i][field_name] = value
                yield f"{rec['op']}.{field_name}={value!r} at {key}[{i}]", c
        for key_w in _WIDTHS:
            if isinstance(rec.get(key_w), int) and rec[key_w] > 1:
                c = copy.deepcopy(spec)
                _get(c, key)[i][key_w] = rec[key_w] // 2
                yield f"{rec['op']}.{key_w} halved at {key}[{i}]", c


def _size(spec: dict) -> int:
    return sum(1 for _ in _records(spec))


def reproduce_options(finding: Finding, paths: Sequence[str]) -> dict[str, Any]:
    """What ``run_model`` needs to check just this finding again."""
    target = finding.pass_name
    needs_pass = target not in ("import", *PREFIX)
    compile_targets = [(target, finding.path)] if finding.invariant == "compile" or (
        finding.invariant == "crash" and finding.kind.startswith("compile/")) else []
    both = [paths[0], finding.path] if finding.path != paths[0] else list(paths)
    return {"paths": both if finding.invariant == "paths" else [finding.path],
            "passes": {target: finding.spec} if needs_pass else {},
            "compile_targets": compile_targets,
            "checks": sorted({finding.invariant} - {"crash"}) or ["skipped"]}


def shrink(spec: dict, finding: Finding, paths: Sequence[str], budget_s: float = 120.0,
           log: Callable[[str], None] | None = None) -> tuple[dict, Finding, int]:
    """Greedy: take the first smaller candidate that still fails the same way, until none does."""
    options = reproduce_options(finding, paths)
    t0, tries, current, last = time.perf_counter(), 0, spec, finding

    def still_fails(candidate: dict) -> Finding | None:
        try:
            model, x = build(candidate)
        except Invalid:
            return None
        result = run_model(model, x, seed=candidate["seed"], **options)
        return next((f for f in result.findings if f.key() == finding.key()), None)

    progress = True
    while progress and time.perf_counter() - t0 < budget_s:
        progress = False
        for desc, cand in candidates(current):
            if time.perf_counter() - t0 > budget_s:
                break
            if cand == current:
                continue
            try:
                build(cand)
            except (Invalid, KeyError, IndexError, TypeError):
                continue
            tries += 1
            hit = still_fails(cand)
            if hit is not None:
                current, last, progress = cand, hit, True
                if log:
                    log(f"  shrink: {desc} -> {_size(current)} records")
                break
    return current, last, tries


# =============================================================================== case files
_CASE = '''"""Fuzz case: {title}.

Found by tools/fuzz.py (seed {seed}), shrunk from {before} to {after} records:
    path {path}, pass {spec}, invariant {invariant} ({invariant_doc})
    {kind}: {message}
{where}
Re-run the original graph: .venv/bin/python tools/fuzz.py --graphs 1 --seed {seed}
"""

import pytest
import torch
import torch.nn.functional as F  # noqa: F401
from torch import nn

from tools.fuzz import run_model


{source}

@pytest.mark.xfail(strict=True, reason={reason!r})
def test_{name}(tmp_path):
    model, x = make_model()
    result = run_model(model, x, seed={seed}, tmp=tmp_path, paths={paths!r},
                       passes={passes!r},
                       compile_targets={compile_targets!r}, checks={checks!r})
    found = [f for f in result.findings if f.key() == {key!r}]
    assert not found, found[0].message
'''


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_case(directory: Path, spec: dict, finding: Finding, paths: Sequence[str], before: int) -> Path:
    options = reproduce_options(finding, paths)
    name = _slug(f"{finding.pass_name}_{finding.invariant}_{finding.kind}_{finding.path}")[:64]
    name = f"{name}_s{spec['seed']}"
    source = render(spec).split("\n\n\n", 1)[1]
    reason = f"{finding.invariant} [{finding.path} {finding.spec or finding.pass_name}]: {finding.message}"
    text = _CASE.format(
        title=f"{finding.invariant} on {finding.path} after {finding.spec or finding.pass_name}",
        seed=spec["seed"], before=before, after=_size(spec), path=finding.path,
        spec=finding.spec or finding.pass_name, invariant=finding.invariant,
        invariant_doc=INVARIANTS[finding.invariant], kind=finding.kind,
        message=_wrap(finding.message), where=f"Raised at: {finding.where}\n" if finding.where else "",
        source=source.rstrip() + "\n", reason=reason[:200], name=name, key=finding.key(), **options)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "__init__.py").touch()
    path = directory / f"test_{name}.py"
    path.write_text(text)
    return path


def _wrap(text: str, width: int = 92) -> str:
    words, lines, cur = text.split(), [], ""
    for word in words:
        if cur and len(cur) + len(word) + 1 > width:
            lines.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}".strip()
    lines.append(cur)
    return "\n    ".join(lines)


def distinct(findings: Sequence[Finding], sizes: dict[int, int], per_kind: int = 2) -> list[Finding]:
    """Up to ``per_kind`` findings per (pass, invariant, kind), from different seeds, the
    smallest graphs first (fx before pt2 before onnx within a seed)."""
    order = {p: i for i, p in enumerate(PATHS)}
    picked: dict[tuple, list[Finding]] = {}
    for f in sorted(findings, key=lambda f: (sizes.get(f.seed, 0), f.seed, order.get(f.path, 9))):
        group = picked.setdefault((f.pass_name, f.invariant, f.kind), [])
        if len(group) < per_kind and all(g.seed != f.seed for g in group):
            group.append(f)
    return [f for group in picked.values() for f in group]


def _same_model(a: dict, b: dict) -> bool:
    return a["input"] == b["input"] and a["layers"] == b["layers"]


# =============================================================================== CLI
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graphs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0, help="first seed (graphs use seed, seed+1, ...)")
    ap.add_argument("--seeds", default="", help="comma-separated seeds to run instead (e.g. those "
                    "with findings in an earlier run's JSON, re-checked after a fix)")
    ap.add_argument("--json", type=Path, help="write the summary, findings and specs here")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--passes", default="", help="comma-separated subset of the registered passes")
    ap.add_argument("--off", default="", help="comma-separated ops/features the generator must not "
                    "use (e.g. shared,pm: to look past a known failure)")
    ap.add_argument("--compile-every", type=int, default=0, help="TVM-compile every K-th seed (0: never)")
    ap.add_argument("--time-limit", type=float, help="stop starting graphs after this many seconds")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker processes (one thread each); results do not depend on it")
    ap.add_argument("--shrink-to", type=Path, help="shrink each distinct failure and write a case here")
    ap.add_argument("--shrink-budget", type=float, default=90.0, help="seconds per shrink")
    ap.add_argument("--shrink-per-kind", type=int, default=2,
                    help="failures shrunk per (pass, invariant, kind), from different seeds")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        ap.error(f"unknown path(s) {sorted(unknown)}; choose from {', '.join(PATHS)}")
    passes = [p for p in args.passes.split(",") if p] or None

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def save(specs: list, results: list, summary: dict | None = None, cases: list | None = None) -> None:
        if not args.json:
            return
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = {"command": " ".join(["tools/fuzz.py", *(argv if argv is not None else sys.argv[1:])]),
                "summary": summary or summarize(results, 0.0), "cases": cases or [],
                "findings": [asdict(f) for r in results for f in r.findings],
                "declines": [asdict(d) for r in results for d in r.declines],
                "graphs": [{"seed": r.seed, "seconds": r.seconds, "runs": r.runs, "spec": s}
                           for s, r in zip(specs, results, strict=True)]}
        args.json.write_text(json.dumps(data, indent=1, default=str))

    try:
        seeds = ([int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds
                 else range(args.seed, args.seed + args.graphs))
    except ValueError:
        ap.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    specs, results, summary = run_fuzz(seeds, paths=paths, compile_every=args.compile_every,
                                       passes=passes, off=[o for o in args.off.split(",") if o],
                                       time_limit=args.time_limit, progress=log,
                                       on_graph=save, jobs=args.jobs)
    cases = []
    if args.shrink_to:
        by_seed = dict(zip([r.seed for r in results], specs, strict=True))
        sizes = {seed: _size(spec) for seed, spec in by_seed.items()}
        written: list[tuple[dict, Finding, str]] = []
        for f in distinct([f for r in results for f in r.findings], sizes, args.shrink_per_kind):
            log(f"shrinking {f.invariant} {f.kind} [{f.path} {f.spec or f.pass_name}] seed {f.seed}")
            spec = by_seed[f.seed]
            small, last, tries = shrink(spec, f, paths, args.shrink_budget, log)
            twin = next((file for s, g, file in written if _same_model(s, small)
                         and (g.path, g.invariant, g.kind) == (last.path, last.invariant, last.kind)), None)
            if twin:  # the same minimal model fails the same way: one case documents both
                cases.append({"duplicate_of": twin, "records": _size(small), **asdict(last)})
                log(f"  -> same minimal model as {twin}")
                continue
            path = write_case(args.shrink_to, small, last, paths, _size(spec))
            written.append((small, last, str(path)))
            cases.append({"file": str(path), "records": _size(small), "tries": tries, **asdict(last)})
            log(f"  -> {path} ({_size(small)} records, {tries} tries)")
    save(specs, results, summary, cases)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
