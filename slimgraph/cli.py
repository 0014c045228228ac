"""``slimgraph optimize|inspect|bench|targets|passes``: the command line.

MODEL is an ``.onnx`` file, a ``.pt2`` file, or ``file.py:factory`` returning
``(module, example_inputs)``. Every user error prints one line, ``slimgraph: error: ...``, and
exits with status 2; a traceback means a bug in slimgraph.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from slimgraph.errors import SlimgraphError


def _shapes(values: list[str] | None) -> dict[str, tuple[int, ...]] | None:
    from slimgraph.ir.loading import parse_shape

    return dict(parse_shape(v) for v in values) if values else None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL: file.onnx, file.pt2, or file.py:factory")
    p.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                   help="static shape for an input (repeatable), e.g. input=1,3,224,224")


def check_output_dir(path: str) -> Path:
    """Refuse an output directory that cannot be written, before any work (one line)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SlimgraphError(f"-o {path}: exists and is not a directory")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SlimgraphError(f"-o {path}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SlimgraphError(f"-o {path}: {existing} is not writable")
    return out


def cmd_optimize(args: argparse.Namespace) -> int:
    check_output_dir(args.output)
    import slimgraph

    result = slimgraph.optimize(
        args.model, args.target, pipeline=args.pipeline, input_shapes=_shapes(args.input_shape),
        calibration=args.calibration, tune_trials=args.tune_trials, workdir=args.workdir,
        benchmark=not args.no_bench, dump_ir=args.dump_ir, progress=args.log_level != "ERROR",
        rpc=args.rpc, cc=args.cc, tune_time_s=args.tune_time, database=args.database,
        emulate=args.emulate, conv_layout=args.conv_layout)
    out = result.save(args.output)
    if args.log_level != "ERROR":
        print(result.report.summary())
        print(f"\nwrote {out}/ (compiled model, manifest.json, report.json, report.html)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from slimgraph.ir.analysis import AnalysisManager, Cost, Shapes
    from slimgraph.ir.loading import load_model

    graph = load_model(args.model, input_shapes=_shapes(args.input_shape))
    am = AnalysisManager()
    shapes, cost = am.get(Shapes, graph), am.get(Cost, graph)
    rows = []
    for node in graph.nodes:
        c = cost.nodes.get(node.name)
        if c is None or (not args.all and not (c.macs or c.params)):
            continue
        s = shapes.get(node.name)
        rows.append((node.name, c.op, "x".join(map(str, s.shape)) if hasattr(s, "shape") else "-",
                     c.macs, c.params))
    if args.json:
        print(json.dumps([dict(zip(("name", "op", "output_shape", "macs", "params"), r, strict=True))
                          for r in rows], indent=1))
        return 0
    w = max([len(r[0]) for r in rows] + [4])
    print(f"{graph.name}: {len(graph.input_names)} input(s) "
          + ", ".join(f"{s.name} {list(s.shape)}" for s in graph.input_specs()))
    print(f"{'name':<{w}}  {'op':<18} {'output shape':<16} {'MACs':>14} {'params':>11}")
    for name, op, shape, macs, params in rows:
        print(f"{name:<{w}}  {op:<18} {shape:<16} {macs:>14,} {params:>11,}")
    print(f"{'total':<{w}}  {'':<18} {'':<16} {cost.macs:>14,} {cost.params:>11,}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from slimgraph.bench import bench

    result = bench(args.model, args.target, input_shapes=_shapes(args.input_shape),
                   pipeline=args.pipeline, tune_trials=args.tune_trials, workdir=args.workdir,
                   compare_untuned=args.compare_untuned, repeat=args.repeat,
                   tune_time_s=args.tune_time, kernels=args.kernels)
    print(result.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=1))
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    from slimgraph.backends.tvm import list_targets

    for t in list_targets():
        print(f"{t.name:<22} {t.description}\n{'':<22} default pipeline: {t.default_pipeline}")
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from slimgraph.passes import available_passes
    from slimgraph.passes.base import _format_value, option_docs

    passes = available_passes()
    if args.name:
        if args.name not in passes:
            raise SlimgraphError(f"unknown pass {args.name!r}; available: {', '.join(passes)}")
        cls = passes[args.name]
        doc = (cls.__doc__ or "").strip()
        print(f"{args.name} ({'exact' if cls.exact else 'approximate'})\n\n{doc}\n\noptions:")
        for opt in option_docs(cls):
            allowed = f" one of {', '.join(map(str, opt.choices))};" if opt.choices else ""
            print(f"  {opt.name:<18} {opt.type:<26} default {_format_value(opt.default)}")
            print(f"  {'':<18} {allowed} {opt.meaning}".rstrip())
        print(f"\nsyntax: {args.name}{{option=value,...}}, e.g. --pipeline \"fold-bn,{args.name}\"")
        return 0
    for name, cls in passes.items():
        doc = (cls.__doc__ or "").strip().splitlines()
        print(f"{name:<18} {'exact' if cls.exact else 'approx':<7} {doc[0] if doc else ''}")
    print("\n`slimgraph passes NAME` shows a pass's options.")
    return 0


def _add_verbosity(p: argparse.ArgumentParser, top: bool = False) -> None:
    """-v/-q/--log-level, before the subcommand or after it (there they default to the top
    level's)."""
    default = "INFO" if top else argparse.SUPPRESS
    group = p.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_const", const="DEBUG", dest="log_level",
                       default=default, help="debug output, TVM's and ONNX Runtime's logs included")
    group.add_argument("-q", "--quiet", action="store_const", const="ERROR", dest="log_level",
                       default=default, help="errors only: no phase lines, summary or progress bars")
    group.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       default=default, help="what is printed on stderr")


def setup_logging(level: str) -> None:
    """slimgraph's phase lines and warnings on stderr, through the logging module."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("slimgraph")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


class _Formatter(logging.Formatter):
    def format(self, record) -> str:
        prefix = {logging.WARNING: "slimgraph: warning: ", logging.ERROR: "slimgraph: error: "}
        return prefix.get(record.levelno, "slimgraph: ") + record.getMessage()


def build_parser() -> argparse.ArgumentParser:
    from slimgraph import __version__

    parser = argparse.ArgumentParser(
        prog="slimgraph", description="Compress and compile trained CNNs (passes over torch.fx, "
        "Apache TVM backends).", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"slimgraph {__version__}")
    _add_verbosity(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_optimize_parser, _inspect_parser, _bench_parser, _list_parsers):
        add(sub)
    return parser


def _subparser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_verbosity(p)
    return p


def _optimize_parser(sub) -> None:
    p = _subparser(sub, "optimize", "compress and compile a model for a target")
    _add_model_args(p)
    p.add_argument("--target", default="x86", help="x86, x86:CPU, arm64, cuda:sm_90 (see `targets`)")
    p.add_argument("--pipeline", default=None, help="e.g. 'cleanup,fold-bn' (default: the target's)")
    p.add_argument("--calibration", default=None, help=".npy/.npz samples for data-driven passes")
    p.add_argument("--tune-trials", type=int, default=None,
                   help="MetaSchedule trials (0: no tuning; default 256)")
    p.add_argument("--tune-time", type=float, default=None, metavar="SECONDS",
                   help="stop tuning after this long (finished measurements are kept)")
    p.add_argument("--workdir", default=None, help="where tuning databases live (reused across runs)")
    p.add_argument("--database", default=None, metavar="DIR",
                   help="a tuning database to use (e.g. one tuned on the device before)")
    p.add_argument("--rpc", default=None, metavar="HOST:PORT",
                   help="tune by measuring on a device running `python -m tvm.exec.rpc_server`")
    p.add_argument("--cc", default=None, metavar="COMPILER",
                   help="C++ compiler that links the library, e.g. an Android NDK "
                        "aarch64-linux-android24-clang++ (arm64 default: aarch64-linux-gnu-g++)")
    p.add_argument("--conv-layout", choices=["NHWC", "NCHW"], default=None,
                   help="layout convolutions are compiled in (default: NHWC on CPUs, NCHW on CUDA)")
    p.add_argument("--emulate", action="store_true",
                   help="arm64: check the artifact's numerics here under qemu-aarch64")
    p.add_argument("--dump-ir", default=None, metavar="DIR", help="write the IR after every pass")
    p.add_argument("--no-bench", action="store_true", help="skip latency measurement")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.set_defaults(func=cmd_optimize)


def _inspect_parser(sub) -> None:
    p = _subparser(sub, "inspect", "per-layer table: name, op, output shape, MACs, params")
    _add_model_args(p)
    p.add_argument("--all", action="store_true", help="include nodes without MACs or params")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)


def _bench_parser(sub) -> None:
    p = _subparser(sub, "bench", "latency of PyTorch, ONNX Runtime and slimgraph in one run")
    _add_model_args(p)
    p.add_argument("--target", default="x86", help="a target this machine runs (see `targets`)")
    p.add_argument("--pipeline", default=None, help="passes before compiling (default: the target's)")
    p.add_argument("--tune-trials", type=int, default=None, help="MetaSchedule trials (default 256)")
    p.add_argument("--tune-time", type=float, default=None, metavar="SECONDS",
                   help="stop tuning after this long")
    p.add_argument("--workdir", default=None, help="where tuning databases live")
    p.add_argument("--compare-untuned", action="store_true", help="also build and time untuned TVM")
    p.add_argument("--repeat", type=int, default=20, help="timed runs per engine")
    p.add_argument("--kernels", type=int, default=0, metavar="N",
                   help="also list the compiled model's N slowest kernels (where the time goes)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)


def _list_parsers(sub) -> None:
    _subparser(sub, "targets", "list device targets").set_defaults(func=cmd_targets)
    p = _subparser(sub, "completion", "print a shell completion script "
                   "(e.g. `slimgraph completion bash > ~/.local/share/bash-completion/completions/slimgraph`)")
    p.add_argument("shell", choices=["bash", "zsh", "tcsh"], help="the shell to complete in")
    p.set_defaults(func=cmd_completion)
    p = _subparser(sub, "passes", "list passes, or one pass's options")
    p.add_argument("name", nargs="?", help="a pass: show its options, types, defaults, meaning")
    p.set_defaults(func=cmd_passes)


def cmd_completion(args: argparse.Namespace) -> int:
    import shtab  # generates the script from this parser (maintained; no hand-written completion)

    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if getattr(args, "tune_trials", None) is None and hasattr(args, "tune_trials"):
        from slimgraph import DEFAULT_TUNE_TRIALS

        args.tune_trials = DEFAULT_TUNE_TRIALS
    try:
        return args.func(args)
    except SlimgraphError as err:
        print(f"slimgraph: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `slimgraph inspect m.onnx | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("slimgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
