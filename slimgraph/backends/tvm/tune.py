"""MetaSchedule tuning of a Relax module, with a persistent database.

CPU targets are tuned on this machine or, through ``device``, on a board behind TVM's RPC
server. CUDA targets are tuned on a GPU in this machine (the runner's worker registers the
compile callback: candidates hold CUDA source); that path is checked here up to building
candidates and compiling their kernels with NVRTC, but has not yet run on a GPU.

TVM's CPU default pipeline emits unscheduled loops (no threads, no vectors): ResNet-18 runs
~100x slower than ONNX Runtime until MetaSchedule finds schedules. This module runs that
search within a trial budget and a time budget, and keeps what it learns:

  prepare()          legalize + fuse (the same passes before extraction and before the build,
                     so database keys match); weights are marked layout-free so tuned kernels
                     may repack them, and the repacking is folded into the constants at build.
  task_infos()       one task per distinct fused kernel: calls in the model, estimated FLOPs.
  plan_budget()      trials per task: a floor for every task (each gets a schedule), the rest
                     in proportion to FLOPs x calls, capped per task; tiny tasks get the floor
                     only. Trials already in the database count toward a task's share, so
                     re-building the same layer shapes tunes nothing.
  search, phase 1    "sample": one batch of random schedules (ReplayTrace) per task, biggest
                     task first. An evolutionary round would spend most of its time mutating a
                     population ranked by an untrained cost model, i.e. at random.
  search, phase 2    "evolve": EvolutionarySearch guided by the XGBoost cost model (trained
                     once on phase 1's measurements, then as data grows) on the tasks with
                     budget left, always the one with the largest calls x best latency; a task
                     whose best has not improved by 1% in `patience` rounds hands its unspent
                     trials to the others. Both phases stop at the time budget.
  builder            compiles candidates in a persistent pool of worker processes (one per
                     core) or, for small budgets, in this process. TVM's LocalBuilder starts
                     fresh workers every round, and each spends ~40 s importing every backend's
                     tensor intrinsics; ours load only the target's (~0.3 s).
  runner             TVM's LocalRunner: one persistent worker process measures on this host
                     (median of a few repeats), so a crashing candidate cannot take the
                     compiler down. With ``device`` (an ``rpc.RPCDevice``), TVM's RPCRunner
                     measures on the device behind a TVM RPC server instead, and the builder
                     links each candidate with the target's (cross) compiler: the same search,
                     budgets and database, for a board or phone tuned from this machine.
  JSON database      <dir>/database_{workload,tuning_record}.json, appended after every batch
                     (an interrupted run keeps its records); one tuning process per directory
                     at a time (file lock).
  apply_and_build()  MetaScheduleApplyDatabase, fold the weight repacking, tvm.compile.
                     Kernels without a valid record keep the default (slow, correct) schedule.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib
import importlib.machinery
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from slimgraph.errors import BackendError, TargetError

from . import nativelog
from .targets import TargetSpec

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger("slimgraph.tvm.tune")

# Where tuning databases live unless build() is told otherwise: <cache>/tuning/<target key>/.
CACHE_ENV = "SLIMGRAPH_CACHE_DIR"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, "~/.cache/slimgraph")).expanduser()


def tuning_dir(spec: TargetSpec, workdir: str | Path | None = None,
               database: str | Path | None = None) -> Path:
    """The database directory: ``database`` if given, else ``workdir/tuning/<target key>``,
    else the shared cache ``~/.cache/slimgraph/tuning/<target key>`` (``$SLIMGRAPH_CACHE_DIR``)."""
    if database is not None:
        return Path(database)
    root = Path(workdir) if workdir is not None else default_cache_dir()
    return root / "tuning" / spec.key


@dataclass(frozen=True)
class TuneOptions:
    """Search knobs. Defaults suit a few-core CPU and budgets of 10 to a few thousand trials."""

    min_trials: int = 8  # per-task floor = the phase-1 batch (lowered for tiny budgets)
    batch: int | None = None  # phase-2 candidates per round; None: from the budget
    max_trials_per_task: int | None = None  # None: max(64, budget / 4)
    tiny_share: float = 0.01  # tasks under this share of FLOPs x calls get the floor only
    patience: int = 2  # phase-2 rounds without a 1% gain before a task gives its trials back
    population: int = 128  # evolutionary search population (TVM's default: 512)
    genetic_iters: int = 2  # generations per round (TVM's default: 4)
    build_workers: int | None = None  # None: one per core if the budget exceeds 32, else 0
    build_timeout_s: float = 120.0
    measure_repeat: int = 3  # the runner reports the median of this many repeats ...
    measure_min_ms: int = 20  # ... each repeated until it lasts this long
    run_timeout_s: float = 30.0
    prepack_weights: bool = True
    seed: int = 0

    def __post_init__(self):
        bad = [name for name, ok in (
            ("min_trials", self.min_trials >= 1), ("patience", self.patience >= 1),
            ("population", self.population >= 8), ("genetic_iters", self.genetic_iters >= 1),
            ("measure_repeat", self.measure_repeat >= 1),
            ("batch", self.batch is None or self.batch >= 1),
            ("build_workers", self.build_workers is None or self.build_workers >= 0),
            ("tiny_share", 0 <= self.tiny_share < 1)) if not ok]
        if bad:
            raise BackendError(f"invalid tuning option(s) {', '.join(bad)} in {self}")


@dataclass
class TaskInfo:
    """One tuning task as slimgraph sees it."""

    name: str
    weight: int  # number of calls in the model
    flops: float
    done: int = 0  # trials already in the database for this workload
    tuned: bool = False  # the database has a valid schedule for it
    best_s: float | None = None  # the database's best measured run time for it

    @property
    def work(self) -> float:
        return self.weight * self.flops


@dataclass
class TuneResult:
    database: Path
    tasks: int
    tasks_tuned: int  # tasks that had trials this run
    trials_requested: int
    trials_measured: int
    tune_time_s: float
    stopped_by: str  # "done" | "time" | "cached"
    untuned_tasks: list[str] = field(default_factory=list)
    task_table: list[dict] = field(default_factory=list)
    runner: str = "this machine"  # or "rpc HOST:PORT"

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


# ---------------------------------------------------------------- intrinsics (import cost)

def load_tensor_intrinsics(kind: str) -> None:
    """Register the tensor intrinsics MetaSchedule's rules for ``kind`` refer to, and only those.

    ``import tvm.s_tir.tensor_intrin`` registers every backend's intrinsics (CUDA's alone take
    ~17 s of TVMScript parsing on a 2-core machine); the x86 rules need only ``.x86`` (~0.3 s).
    The package module is installed without running its ``__init__``, so that
    ``default_build``'s own ``import tvm.s_tir.tensor_intrin`` costs nothing; any submodule
    still imports on demand.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir

        path = str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [path]
        package = types.ModuleType(name)
        package.__spec__, package.__path__, package.__package__ = spec, [path], name
        package.__file__ = os.path.join(path, "__init__.py")
        sys.modules[name] = package
        tvm.s_tir.tensor_intrin = package
    for sub in {"x86": ["x86"], "arm64": ["arm_cpu"], "cuda": ["cuda"]}.get(kind, []):
        importlib.import_module(f"{name}.{sub}")
    from .intrinsics import register_intrinsics

    register_intrinsics(kind)  # slimgraph's int8 intrinsics; TVM's dot_16x4_vnni fixed


# ---------------------------------------------------------------- passes

def prepare(mod: tvm.IRModule, spec: TargetSpec, *, prepack_weights: bool = True) -> tvm.IRModule:
    """Legalize and fuse: the module tasks are extracted from and the tuned build starts from."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline

    target = spec.to_tvm()
    passes = [
        relax.transform.DecomposeOpsForInference(),
        relax.transform.CanonicalizeBindings(),
        *pipeline.library_dispatch_passes(target),
        *pipeline.legalize_passes(target),  # LegalizeOps, FoldConstant, FuseOps, FuseTIR
    ]
    if prepack_weights:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target, tvm.transform.PassContext(opt_level=3):
        return tvm.transform.Sequential(passes)(mod)


def apply_and_build(prepared: tvm.IRModule, spec: TargetSpec, db_dir: Path, *,
                    prepack_weights: bool = True):
    """Apply the database's best schedules to ``prepared`` and compile it (a VMExecutable)."""
    import tvm
    from tvm import relax

    load_tensor_intrinsics(spec.kind)
    target = spec.to_tvm()
    database = open_database(db_dir, create=False)
    with target, database, tvm.transform.PassContext(opt_level=3):
        mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(prepared)
        if prepack_weights:
            # The weight repacking of tuned kernels becomes its own function on constants,
            # which FoldConstant evaluates at build time; the repacking kernels are then dead.
            mod = tvm.transform.Sequential([
                relax.transform.SplitLayoutRewritePreproc(),
                relax.transform.FoldConstant(),
                relax.transform.DeadCodeElimination(["main"]),
            ])(mod)
    return tvm.compile(mod, target=target)


# ---------------------------------------------------------------- database

def open_database(db_dir: Path, *, create: bool = True):
    from tvm.s_tir import meta_schedule as ms

    db_dir = Path(db_dir)
    if create:
        db_dir.mkdir(parents=True, exist_ok=True)
    elif not (db_dir / "database_workload.json").exists():
        return ms.database.MemoryDatabase()
    return ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        allow_missing=True, module_equality="structural")


@contextlib.contextmanager
def _locked(db_dir: Path):
    """One tuning process per database directory (others wait)."""
    db_dir.mkdir(parents=True, exist_ok=True)
    with open(db_dir / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("waiting for another process tuning into %s", db_dir)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _records_by_workload(database) -> dict[int, tuple[int, bool, float | None]]:
    """structural hash of workload -> (records, has a valid one, best mean run time in s)."""
    import tvm_ffi

    counts: dict[int, tuple[int, bool, float | None]] = {}
    for rec in database.get_all_tuning_records():
        key = tvm_ffi.structural_hash(rec.workload.mod)
        secs = [_seconds(s) for s in rec.run_secs or []]
        valid = bool(secs) and min(secs) < 1e9
        n, ok, best = counts.get(key, (0, False, None))
        mean = sum(secs) / len(secs) if valid else None
        if mean is not None and (best is None or mean < best):
            best = mean
        counts[key] = (n + 1, ok or valid, best)
    return counts


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e6, 1)


def _seconds(value) -> float:
    return float(getattr(value, "value", value))


# ---------------------------------------------------------------- budget

def choose_floor(trials: int, n_tasks: int, min_trials: int) -> int:
    """Phase-1 trials per task: ``min_trials``, or what the budget can give every task."""
    return max(1, min(min_trials, trials // max(1, n_tasks)))


def choose_batch(trials: int, n_tasks: int, floor: int) -> int:
    """Phase-2 candidates per round: about two rounds per task beyond the floor, in [8, 32]
    (less only when fewer than 8 trials are left after phase 1: one round uses them up).

    Each evolutionary round has a fixed cost (mutating the population) that a batch amortizes.
    """
    extra = max(0, trials - floor * n_tasks)
    batch = int(min(32, max(8, round(extra / max(1, n_tasks) / 2))))
    return max(1, min(batch, extra))


def plan_budget(tasks: list[TaskInfo], trials: int, *, floor: int = 8, batch: int = 16,
                max_trials_per_task: int | None = None, tiny_share: float = 0.01) -> list[int]:
    """Trials each task should have had (database trials included) for a budget of ``trials``.

    Every task gets ``floor`` trials (lowered to what the budget can give all of them; with
    fewer trials than tasks, the biggest tasks get one each): its phase-1 batch, so that each
    kernel has a schedule. The rest goes in whole ``batch``es (phase-2 rounds) to tasks with at
    least ``tiny_share`` of the model's FLOPs x calls, in proportion to it, each task capped at
    ``max_trials_per_task``; what a cap cuts off goes to the others. The sum never exceeds
    ``trials``.
    """
    n = len(tasks)
    if n == 0 or trials <= 0:
        return [0] * n
    batch = max(1, batch)
    cap = max_trials_per_task or max(64, trials // 4)
    order = sorted(range(n), key=lambda i: -tasks[i].work)
    if trials < n:
        plan = [0] * n
        for i in order[:trials]:
            plan[i] = 1
        return plan
    floor = max(1, min(floor, trials // n, cap))
    plan = [floor] * n
    units = (trials - floor * n) // batch
    total_work = sum(t.work for t in tasks) or 1.0
    room = {i: (cap - floor) // batch for i in range(n)
            if tasks[i].work / total_work >= tiny_share and cap - floor >= batch}
    given = {i: 0 for i in room}
    while units > 0 and room:
        work = sum(tasks[i].work for i in room) or float(len(room))
        exact = {i: units * (tasks[i].work or 1.0) / work for i in room}
        # whole units first, then the largest remainders, never past a task's room
        add = {i: min(int(exact[i]), room[i]) for i in room}
        spare = units - sum(add.values())
        for i in sorted(room, key=lambda i: -(exact[i] - int(exact[i]))):
            if spare <= 0:
                break
            if add[i] < room[i]:
                add[i] += 1
                spare -= 1
        if sum(add.values()) == 0:
            break
        for i, k in add.items():
            given[i] += k
            room[i] -= k
            units -= k
        room = {i: r for i, r in room.items() if r > 0}
    for i, k in given.items():
        plan[i] += k * batch
    return plan


# ---------------------------------------------------------------- builder

def _build_worker_init(kind: str) -> None:
    """Build-worker start-up: the target's tensor intrinsics only."""
    load_tensor_intrinsics(kind)


def _build_candidate(mod, target, path: str, compiler: str | None = None) -> str:
    """Compile one candidate and export it as a shared library (runs in a worker or here),
    linked by ``compiler`` (a cross compiler's path) or TVM's default host compiler."""
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    module = default_build(mod, target, None)
    if compiler is None:
        module.export_library(path)
    else:
        from tvm.support import cc as tvm_cc

        module.export_library(path, fcompile=tvm_cc.cross_compiler(compiler))
    return path


class _BuildPool:
    """Persistent build workers (TVM's PopenPoolExecutor: plain subprocesses, no re-import of
    the caller's __main__); a worker that times out or crashes is replaced."""

    def __init__(self, workers: int, kind: str, timeout_s: float):
        from tvm.support.popen_pool import PopenPoolExecutor

        self.pool = PopenPoolExecutor(max_workers=workers, timeout=timeout_s,
                                      initializer=_build_worker_init, initargs=(kind,))

    def build(self, jobs: list[tuple]) -> list[str | BaseException]:
        futures = [self.pool.submit(_build_candidate, *job) for job in jobs]
        out: list[str | BaseException] = []
        for fut in futures:
            try:
                out.append(fut.result())
            except Exception as err:  # noqa: BLE001 - a failed candidate is a result
                out.append(err)
        return out

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False)


def _make_builder(tmpdir: Path, pool: _BuildPool | None, compiler: str | None = None):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder

    @derived_object
    class SlimgraphBuilder(PyBuilder):
        """Builds candidates in the worker pool, or in this process without one."""

        def __init__(self):
            super().__init__()
            self.count = 0

        def build(self, build_inputs):
            # One directory per candidate: the RemoveBuildArtifact callback deletes the
            # artifact's parent directory once the candidate has been measured.
            jobs = []
            for inp in build_inputs:
                self.count += 1
                jobs.append((inp.mod, inp.target, str(tmpdir / f"c{self.count}" / "mod.so"),
                             compiler))
            if pool is not None:
                outcomes = pool.build(jobs)
            else:
                outcomes = []
                for job in jobs:
                    try:
                        outcomes.append(_build_candidate(*job))
                    except Exception as err:  # noqa: BLE001 - a failed candidate is a result
                        outcomes.append(err)
            return [BuilderResult(o, None) if isinstance(o, str) else
                    BuilderResult(None, f"build failed: {type(o).__name__}: {o}")
                    for o in outcomes]

    return SlimgraphBuilder()


def _make_runner(opts: TuneOptions, device=None, spec: TargetSpec | None = None):
    """LocalRunner on this host, or RPCRunner on ``device`` (an ``rpc.RPCDevice``). For a CUDA
    target, the runner's worker first loads TVM's CUDA runtime and registers the compile
    callback (``device.cuda_runner_init``): candidates hold CUDA source, compiled at load."""
    from tvm.s_tir import meta_schedule as ms

    if device is not None:
        from .rpc import make_rpc_runner

        return make_rpc_runner(device, repeat=opts.measure_repeat,
                               min_repeat_ms=opts.measure_min_ms)
    config = ms.runner.EvaluatorConfig(number=1, repeat=opts.measure_repeat,
                                       min_repeat_ms=opts.measure_min_ms,
                                       enable_cpu_cache_flush=False)
    initializer = None
    if spec is not None and spec.kind == "cuda":
        from .device import cuda_runner_init

        initializer = functools.partial(cuda_runner_init, spec.tvm_target["arch"])
    return ms.runner.LocalRunner(timeout_sec=opts.run_timeout_s, evaluator_config=config,
                                 initializer=initializer)


def _make_cost_model():
    """TVM's XGBoost cost model, except that training waits until ``train_now()``.

    Until it has a model, XGBModel ranks candidates at random anyway; training it after every
    phase-1 batch would cost seconds per batch for nothing. One thread: spinning OpenMP
    threads slow xgboost down ~6x on a shared 2-core machine.
    """
    import numpy as np
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model import XGBModel

    base = XGBModel._cls

    @derived_object
    class DeferredXGBModel(base):
        def __init__(self):
            super().__init__(num_warmup_samples=0, num_tuning_cores=1)
            self.defer = True

        def _train(self, xs, ys):
            if not self.defer:
                base._train(self, xs, ys)

        def train_now(self) -> None:
            self.defer = False
            if not self.data:
                return
            xs = [f for g in self.data.values() for f in g.features]
            with np.errstate(divide="ignore", invalid="ignore"):
                ys = np.concatenate([
                    np.divide(g.min_cost, g.costs, out=np.zeros_like(g.costs), where=g.costs != 0)
                    for g in self.data.values()])
            base._train(self, xs, ys)
            self.last_train_size = self.data_size

    return DeferredXGBModel()


# ---------------------------------------------------------------- bookkeeping and policy

class _Progress:
    """tqdm over trials (or nothing)."""

    def __init__(self, total: int, enabled: bool, n_tasks: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="trial", desc=f"tuning {n_tasks} tasks",
                            dynamic_ncols=True, mininterval=1.0)

    def update(self, n: int, postfix: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Ledger:
    """Trials spent, best latency and remaining share of every task, across both phases."""

    def __init__(self, infos: list[TaskInfo], quotas: list[int], *, floor: int, batch: int,
                 cap: int, opts: TuneOptions, deadline: float | None, progress: _Progress):
        n = len(infos)
        self.infos, self.quota, self.cap, self.opts = infos, list(quotas), cap, opts
        self.floor, self.batch = floor, batch
        self.deadline, self.progress = deadline, progress
        self.total = sum(quotas)
        self.spent = [0] * n
        self.best_ms = [math.inf] * n
        self.history: list[list[float]] = [[] for _ in range(n)]  # best after each round
        self.stalled = [False] * n
        self.stopped_by = "done"
        self.interrupted = False  # Ctrl-C: stop at the next check, keep what was measured

    def record(self, i: int, results, phase: str) -> None:
        for res in results:
            secs = res.run_secs
            if res.error_msg is None and secs:
                ms = sorted(_seconds(s) for s in secs)[len(secs) // 2] * 1e3
                self.best_ms[i] = min(self.best_ms[i], ms)
        self.spent[i] += len(results)
        self.history[i].append(self.best_ms[i])
        if phase == "evolve":
            self._check_stall(i)
        est = self.estimate_ms()
        postfix = f"{phase}, est {est:.1f} ms" if est is not None else phase
        self.progress.update(len(results), f"{postfix}, {self.infos[i].name[:32]}")

    def _check_stall(self, i: int) -> None:
        hist, k = self.history[i], self.opts.patience
        if len(hist) <= k or math.isinf(hist[-1]) or self.spent[i] >= self.quota[i]:
            return
        if hist[-1] > hist[-1 - k] * 0.99:
            self.stalled[i] = True
            self._give_back(i)

    def _give_back(self, i: int) -> None:
        """Hand task i's unspent whole batches to the others, biggest work first."""
        units = (self.quota[i] - self.spent[i]) // self.batch
        self.quota[i] = self.spent[i]
        takers = sorted((j for j in range(len(self.infos)) if j != i and not self.stalled[j]
                         and self.quota[j] + self.batch <= self.cap and self.infos[j].work > 0),
                        key=lambda j: -self.infos[j].work)
        while units > 0 and takers:
            for j in list(takers):
                if units == 0:
                    break
                self.quota[j] += self.batch
                units -= 1
                if self.quota[j] + self.batch > self.cap:
                    takers.remove(j)

    def out_of_time(self) -> bool:
        if self.interrupted:
            self.stopped_by = "interrupted"
            return True
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.stopped_by = "time"
            return True
        return False

    def wants_more(self, i: int) -> bool:
        return self.spent[i] < self.quota[i] and not self.stalled[i]

    def estimate_ms(self) -> float | None:
        """Sum of calls x best latency over the tasks measured so far."""
        known = [self.infos[i].weight * b for i, b in enumerate(self.best_ms) if not math.isinf(b)]
        return sum(known) if known else None


def _make_scheduler(ledger: _Ledger, ids: list[int], phase: str):
    """The task scheduler of one phase; scheduler task k is ledger task ids[k].

    It joins every finished batch itself before choosing, so the ledger sees all results
    (the C++ loop is given an unreachable trial limit and ends only when this returns -1).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class BudgetScheduler(PyTaskScheduler):
        def __init__(self):
            super().__init__()
            self.order = sorted(range(len(ids)), key=lambda k: -ledger.infos[ids[k]].work)

        def next_task_id(self) -> int:
            records = self._outer().tasks_
            for k, rec in enumerate(records):
                if not rec.is_terminated and rec.runner_futures is not None:
                    ledger.record(ids[k], self.join_running_task(k), phase)
            if ledger.out_of_time():
                return -1
            live = [k for k, rec in enumerate(records) if not rec.is_terminated]
            if phase == "sample":
                while self.order:
                    k = self.order.pop(0)
                    if k in live:
                        return k
                return -1
            eligible = [k for k in live if ledger.wants_more(ids[k])]
            if not eligible:
                return -1
            return max(eligible, key=lambda k: ledger.infos[ids[k]].weight * min(
                ledger.best_ms[ids[k]], 1e12))

    return BudgetScheduler()


# ---------------------------------------------------------------- tune

def task_infos(prepared: tvm.IRModule, spec: TargetSpec):
    """(extracted tasks, TaskInfo per task)."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.analysis import estimate_tir_flops

    tasks = ms.relax_integration.extract_tasks(prepared, spec.to_tvm())
    infos = [TaskInfo(name=str(t.task_name), weight=int(t.weight),
                      flops=float(estimate_tir_flops(t.dispatched[0]))) for t in tasks]
    return list(tasks), infos


def tune(prepared: tvm.IRModule, spec: TargetSpec, trials: int, db_dir: str | Path, *,
         time_budget_s: float | None = None, progress: bool = True,
         options: TuneOptions | None = None, device=None, cc: str | None = None) -> TuneResult:
    """Tune ``prepared`` (from ``prepare``) for ``spec`` into the database at ``db_dir``.

    ``trials`` is what the database should hold for this module's tasks (records already
    there count, so an interrupted run started again continues where it stopped).
    ``time_budget_s`` bounds the whole call; it is checked between batches. ``device`` (an
    ``rpc.RPCDevice``): measure on the device behind that TVM RPC server; candidates are
    linked with ``cc`` or the target's default (cross) compiler.
    """
    opts = options or TuneOptions()
    if trials < 1:
        raise BackendError(f"tuning trials must be >= 1, got {trials}")
    if spec.kind not in ("x86", "arm64", "cuda"):
        raise TargetError(f"tuning is not implemented for {spec.kind} targets")
    if spec.kind == "cuda":
        _check_cuda_tuning(spec, device)
    elif device is None and not spec.is_host:
        raise TargetError(f"cannot tune for {spec.name}: MetaSchedule measures candidates on "
                          "this machine, which cannot run code for that target. Tune on the device "
                          "through TVM's RPC server (rpc='HOST:PORT', CLI --rpc), give a tuning "
                          "database, or build with tune_trials=0 (untuned).")
    compiler = None
    if device is not None:
        from .device import cross_compiler_path

        compiler = cross_compiler_path(spec, cc)  # a missing compiler fails here, not per trial
        device.check()
    db_dir = Path(db_dir)
    start = time.monotonic()
    load_tensor_intrinsics(spec.kind)
    with _locked(db_dir), nativelog.captured() as log:
        try:
            return _tune_locked(prepared, spec, trials, db_dir, start, time_budget_s, progress,
                                opts, device, compiler)
        except BackendError as err:
            raise BackendError(f"{err}\nTVM log (last lines):\n{nativelog.tail(log)}") from err


def _check_cuda_tuning(spec: TargetSpec, device) -> None:
    """CUDA tuning measures on a GPU in this machine (not verified on a GPU yet: see README)."""
    if device is not None:
        raise TargetError(f"tuning {spec.name} over RPC is not supported: run the build on the "
                          "GPU machine, or build with tune_trials=0 (TVM's default GPU schedules)")
    if not spec.is_host:
        raise TargetError(f"cannot tune for {spec.name}: this machine has no NVIDIA GPU to "
                          "measure candidates on. Build on a GPU machine, give a tuning database "
                          "made on one, or build with tune_trials=0 (TVM's default GPU schedules)")
    from .device import prepare_cuda_runtime

    prepare_cuda_runtime(spec.tvm_target["arch"])  # a missing compiler fails before the search


def _fill_from_database(extracted, infos: list[TaskInfo], database) -> None:
    """Set each task's trials in the database and whether one of them is a valid schedule."""
    import tvm_ffi

    counts = _records_by_workload(database)
    for task, info in zip(extracted, infos, strict=True):
        info.done, info.tuned, info.best_s = counts.get(
            tvm_ffi.structural_hash(task.dispatched[0]), (0, False, None))


def coverage(prepared: tvm.IRModule, spec: TargetSpec, db_dir: str | Path) -> list[TaskInfo]:
    """The tasks of ``prepared`` with what the database at ``db_dir`` holds for each."""
    load_tensor_intrinsics(spec.kind)
    extracted, infos = task_infos(prepared, spec)
    _fill_from_database(extracted, infos, open_database(Path(db_dir), create=False))
    return infos


def _tune_locked(prepared, spec, trials, db_dir, start, time_budget_s, progress, opts,
                 device=None, compiler=None):
    database = open_database(db_dir)
    extracted, infos = task_infos(prepared, spec)

    def refresh() -> None:
        _fill_from_database(extracted, infos, database)

    refresh()
    cap = opts.max_trials_per_task or max(64, trials // 4)
    floor = choose_floor(trials, len(infos), opts.min_trials)
    batch = opts.batch or choose_batch(trials, len(infos), floor)
    plan = plan_budget(infos, trials, floor=floor, batch=batch, max_trials_per_task=cap,
                       tiny_share=opts.tiny_share)
    # A task is tuned if the plan wants more trials than the database holds for it, or if
    # none of those is valid (records of failed candidates do not count as a schedule).
    need = [max(0, p - i.done) if i.tuned else p for p, i in zip(plan, infos, strict=True)]
    todo = [k for k, q in enumerate(need) if q > 0]
    table = [{"task": i.name, "calls": i.weight, "mflops": round(i.flops / 1e6, 2),
              "planned": p, "in_database": i.done, "trials": 0, "best_us": _us(i.best_s)}
             for i, p in zip(infos, plan, strict=True)]
    result = TuneResult(database=db_dir, tasks=len(infos), tasks_tuned=len(todo),
                        trials_requested=trials, trials_measured=0, tune_time_s=0.0,
                        stopped_by="cached", task_table=table,
                        runner="this machine" if device is None else f"rpc {device.address}")
    if todo:
        deadline = None if time_budget_s is None else start + time_budget_s
        bar = _Progress(sum(need[k] for k in todo), progress, len(todo))
        ledger = _Ledger([infos[k] for k in todo], [need[k] for k in todo], floor=floor,
                         batch=batch, cap=cap, opts=opts, deadline=deadline, progress=bar)
        try:
            _search([extracted[k] for k in todo], ledger, database, spec, opts, device,
                    compiler)
        finally:
            bar.close()
        result.trials_measured, result.stopped_by = sum(ledger.spent), ledger.stopped_by
        for j, k in enumerate(todo):
            table[k]["trials"] = ledger.spent[j]
        refresh()
        for row, info in zip(table, infos, strict=True):  # the best in the database, this run's included
            row["best_us"], row["in_database"] = _us(info.best_s), info.done
    result.untuned_tasks = [i.name for i in infos if not i.tuned]
    result.tune_time_s = time.monotonic() - start
    return result


def _search(extracted, ledger: _Ledger, database, spec: TargetSpec, opts: TuneOptions,
            device=None, compiler: str | None = None) -> None:
    """Phase 1 (sample) then phase 2 (evolve), sharing builder, runner, cost model, database."""
    cores = os.cpu_count() or 1  # builders run here, whatever the target's cores
    n = len(extracted)
    workers = opts.build_workers if opts.build_workers is not None else (
        cores if ledger.total > 32 and cores > 1 else 0)
    tmpdir = Path(tempfile.mkdtemp(prefix="slimgraph-candidates-"))
    with _stop_on_sigint(ledger):
        _search_phases(extracted, ledger, database, spec, opts, device, compiler, tmpdir, n,
                       workers)
    if ledger.interrupted:  # raised here, in Python, once TVM's loops have returned
        raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_sigint(ledger: _Ledger):
    """A first Ctrl-C asks the search to stop at its next check (the database keeps every
    finished batch); a second one interrupts at once. An exception raised inside TVM's C++
    loops would come back as a RuntimeError, or not at all."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        ledger.interrupted = True
        signal.signal(signal.SIGINT, previous)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _search_phases(extracted, ledger, database, spec, opts, device, compiler, tmpdir, n,
                   workers) -> None:
    from tvm.s_tir import meta_schedule as ms

    pool = runner = None
    try:
        pool = _BuildPool(workers, spec.kind, opts.build_timeout_s) if workers else None
        shared = {"builder": _make_builder(tmpdir, pool, compiler),
                  "runner": _make_runner(opts, device, spec),
                  "database": database, "cost_model": _make_cost_model(),
                  "measure_callbacks": ms.measure_callback.MeasureCallback.create("default")}
        runner = shared["runner"]
        # Phase 1 gives each task its floor, or less where a resumed task needs less: one
        # call per distinct batch size (usually one).
        first = [min(ledger.floor, q) for q in ledger.quota]
        for size in sorted(set(first), reverse=True):
            if ledger.out_of_time():
                break
            _phase("sample", [i for i in range(n) if first[i] == size], extracted, ledger,
                   shared, spec, opts, per_iter=size, per_task=size)
        later = [i for i in range(n) if ledger.wants_more(i)]
        if later and not ledger.out_of_time():
            shared["cost_model"].train_now()
            _phase("evolve", later, extracted, ledger, shared, spec, opts,
                   per_iter=ledger.batch, per_task=ledger.cap)
    except BackendError:
        raise
    except Exception as err:
        raise BackendError(f"MetaSchedule tuning failed: {type(err).__name__}: {err}") from err
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.pool.shutdown(wait=False)
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)


# Design spaces for tasks TVM's default rules do not serve well; int8.py registers one.
# fn(task module, spec) -> a SpaceGenerator, or None to leave the task to the next one.
SPACE_GENERATORS: list = []


def _space_generator(mod, spec: TargetSpec):
    for fn in SPACE_GENERATORS:
        space = fn(mod, spec)
        if space is not None:
            return space
    return "post-order-apply"  # TVM's rules for the target


def _phase(phase: str, ids: list[int], extracted, ledger: _Ledger, shared: dict,
           spec: TargetSpec, opts: TuneOptions, *, per_iter: int, per_task: int) -> None:
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.task_scheduler import TaskScheduler

    cores = int(spec.tvm_target.get("num-cores", 1))
    contexts = []
    for i in ids:
        if phase == "sample":
            strategy = ms.search_strategy.ReplayTrace(max_fail_count=100)
        else:
            strategy = ms.search_strategy.EvolutionarySearch(
                population_size=opts.population, genetic_num_iters=opts.genetic_iters,
                init_min_unmeasured=max(8, opts.population // 4))
        task = extracted[i]
        contexts.append(ms.TuneContext(
            mod=task.dispatched[0], target=task.target,
            space_generator=_space_generator(task.dispatched[0], spec),
            search_strategy=strategy, task_name=str(task.task_name), logger=logger,
            rand_state=opts.seed * 1000 + i * 2 + (phase == "evolve"), num_threads=cores,
        ).clone())
    scheduler = _make_scheduler(ledger, ids, phase)
    # The base class's tune() (PyTaskScheduler's own wrapper lacks num_trials_per_iter).
    TaskScheduler.tune(scheduler, tasks=contexts,
                       task_weights=[float(ledger.infos[i].weight) for i in ids],
                       max_trials_global=1 << 30, max_trials_per_task=per_task,
                       num_trials_per_iter=per_iter, **shared)
