"""Tuning on a remote device: MetaSchedule measuring candidates through TVM's RPC.

On the device (an arm64 board, a phone, another x86 box) run TVM's RPC server::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090      # on the device
    slimgraph ... --target arm64 --rpc DEVICE_IP:9090               # here (tracker-less)

A device needs only TVM's runtime and the RPC server; candidates are compiled here (for arm64
with the cross compiler) as shared libraries, uploaded, loaded and timed there. With a tracker,
give ``RPCDevice(host, port, key=...)`` the tracker's address and the device key.

  RPCDevice            where the server (or tracker) is, and its timeouts; ``check()`` connects
                       once and raises a ``TargetError`` that names the fix when it cannot.
  make_rpc_runner()    MetaSchedule's RPCRunner, with a tracker-less session factory.
  SharedLibBuilder     builds candidates in this process and exports ``.so`` files (TVM's
                       LocalBuilder starts worker processes that import tensor intrinsics for
                       ~40 s; its ``.tar`` output needs a compiler on the device).
  tune_over_rpc()      tunes a prepared module (``tune.prepare``) into the JSON database
                       (records are appended as measured: an interrupted run keeps them, and a
                       re-run counts them toward its budget).
  LocalRPCServer       starts ``python -m tvm.exec.rpc_server`` on 127.0.0.1 in a subprocess,
                       for tests and for tuning this machine through the same path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import BackendError, TargetError

from .targets import TargetSpec

logger = logging.getLogger("slimgraph.tvm.rpc")


@dataclass(frozen=True)
class RPCDevice:
    """An RPC server (``key is None``) or a tracker holding devices registered under ``key``."""

    host: str
    port: int
    key: str | None = None
    session_timeout_s: float = 60.0
    connect_timeout_s: float = 20.0

    def __post_init__(self):
        if not self.host or not 0 < int(self.port) < 65536:
            raise TargetError(f"bad RPC address {self.host!r}:{self.port!r}")

    @classmethod
    def parse(cls, address: str, key: str | None = None) -> RPCDevice:
        """``"host:port"`` (e.g. from a ``--rpc`` option)."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise TargetError(f"--rpc wants HOST:PORT, got {address!r}")
        return cls(host, int(port), key)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def connect(self):
        """An ``RPCSession`` to the device."""
        from tvm import rpc

        if self.key is None:
            return rpc.connect(self.host, self.port, session_timeout=self.session_timeout_s)
        tracker = rpc.connect_tracker(self.host, self.port)
        return tracker.request(self.key, session_timeout=self.session_timeout_s)

    def check(self) -> None:
        """Connect once; ``TargetError`` that says how to start the server when that fails."""
        try:
            session = self.connect()
            session.cpu(0).exist  # noqa: B018 - a round trip
        except Exception as err:  # noqa: BLE001 - every connection failure reads the same
            raise TargetError(
                f"cannot reach a TVM RPC server at {self.address}: {err}. Start one on the "
                f"device: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {self.port}"
            ) from err


# ---------------------------------------------------------------- MetaSchedule pieces

def _session_factory(device: RPCDevice):
    """f_create_session for RPCRunner. A closure, so cloudpickle sends it to the runner's
    worker process by value (the worker need not import slimgraph)."""
    host, port, key, timeout = device.host, device.port, device.key, device.session_timeout_s

    def create_session(_rpc_config):
        from tvm import rpc

        if key is None:
            return rpc.connect(host, port, session_timeout=timeout)
        return rpc.connect_tracker(host, port).request(key, session_timeout=timeout)

    return create_session


def make_rpc_runner(device: RPCDevice, *, repeat: int = 3, min_repeat_ms: int = 20,
                    timeout_s: float | None = None):
    """MetaSchedule's ``RPCRunner`` measuring on ``device`` (one connection at a time)."""
    from tvm.s_tir import meta_schedule as ms

    timeout = timeout_s or device.session_timeout_s
    config = ms.runner.RPCConfig(tracker_host=device.host, tracker_port=device.port,
                                 tracker_key=device.key or "slimgraph-direct",  # unused without a tracker session_priority=1,
                                 session_timeout_sec=int(timeout))
    evaluator = ms.runner.EvaluatorConfig(number=1, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                          enable_cpu_cache_flush=False)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=evaluator,
                               f_create_session=_session_factory(device), max_workers=1)


def make_shared_lib_builder(spec: TargetSpec, tmpdir: Path, cc: str | None = None):
    """An in-process MetaSchedule builder exporting each candidate as a ``.so`` for ``spec``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build

    from .device import fcompile_for

    fcompile = fcompile_for(spec, cc)

    @derived_object
    class SharedLibBuilder(PyBuilder):
        def __init__(self):
            super().__init__()
            self.count = 0

        def build(self, build_inputs):
            results = []
            for inp in build_inputs:
                self.count += 1
                # One folder per candidate: MetaSchedule's RemoveBuildArtifact callback deletes
                # the artifact's whole folder after measuring it.
                path = Path(tempfile.mkdtemp(prefix=f"c{self.count}-", dir=tmpdir)) / "lib.so"
                try:
                    rt_mod = default_build(inp.mod, inp.target, None)
                    if fcompile is None:
                        rt_mod.export_library(str(path))
                    else:
                        rt_mod.export_library(str(path), fcompile=fcompile)
                    results.append(BuilderResult(str(path), None))
                except Exception as err:  # noqa: BLE001 - a bad candidate is a result
                    results.append(BuilderResult(None, f"SharedLibBuilder: "
                                                       f"{type(err).__name__}: {err}"))
            return results

    return SharedLibBuilder()


@dataclass
class RPCTuneResult:
    database: Path
    device: str
    tasks: int
    trials_requested: int
    records_before: int
    records_after: int
    tune_time_s: float

    @property
    def trials_measured(self) -> int:
        return self.records_after - self.records_before

    def summary(self) -> dict:
        return {"database": str(self.database), "device": self.device, "tasks": self.tasks,
                "trials_requested": self.trials_requested,
                "trials_measured": self.trials_measured, "records": self.records_after,
                "tune_time_s": round(self.tune_time_s, 2), "runner": "rpc"}


def tune_over_rpc(prepared, spec: TargetSpec, trials: int, db_dir: str | Path,
                  device: RPCDevice, *, batch: int = 8, cc: str | None = None,
                  seed: int = 0, population: int = 64) -> RPCTuneResult:
    """Tune ``prepared`` (from ``tune.prepare``) for ``spec``, measuring on ``device``.

    ``trials`` is the total the database should hold for this module's tasks: records already
    there count, so an interrupted run that is started again continues where it stopped.
    Searches with a random cost model and round-robin over tasks (few trials, slow devices).
    """
    from .tune import _locked, load_tensor_intrinsics, open_database, task_infos

    if trials < 1:
        raise BackendError(f"trials must be >= 1, got {trials}")
    device.check()
    db_dir = Path(db_dir)
    start = time.monotonic()
    load_tensor_intrinsics(spec.kind)
    with _locked(db_dir):
        database = open_database(db_dir)
        extracted, infos = task_infos(prepared, spec)
        before = _records_for(database, extracted)
        todo = trials - before
        if todo > 0:
            _search(extracted, infos, database, spec, device, todo, batch, cc, seed,
                    population)
        after = _records_for(open_database(db_dir), extracted)
    return RPCTuneResult(database=db_dir, device=device.address, tasks=len(infos),
                         trials_requested=trials, records_before=before, records_after=after,
                         tune_time_s=time.monotonic() - start)


def _records_for(database, extracted) -> int:
    """Records in ``database`` for the workloads of these tasks."""
    import tvm_ffi

    from .tune import _records_by_workload

    counts = _records_by_workload(database)
    return sum(counts.get(tvm_ffi.structural_hash(t.dispatched[0]), (0, False))[0]
               for t in extracted)


def _search(extracted, infos, database, spec, device, todo, batch, cc, seed, population):
    from tvm.s_tir import meta_schedule as ms

    cores = int(spec.tvm_target.get("num-cores", 1))
    contexts = [ms.TuneContext(
        mod=task.dispatched[0], target=task.target, space_generator="post-order-apply",
        search_strategy=ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population // 4),
            genetic_num_iters=2),
        task_name=str(task.task_name), logger=logger, rand_state=seed + k,
        num_threads=cores).clone() for k, task in enumerate(extracted)]
    tmpdir = Path(tempfile.mkdtemp(prefix="slimgraph-rpc-candidates-"))
    runner = None
    try:
        builder = make_shared_lib_builder(spec, tmpdir, cc)
        runner = make_rpc_runner(device)
        ms.tune_tasks(tasks=contexts, task_weights=[float(i.weight) for i in infos],
                      work_dir=str(tmpdir), max_trials_global=todo,
                      num_trials_per_iter=min(batch, todo), builder=builder, runner=runner,
                      database=database, cost_model="random", task_scheduler="round-robin")
    except (TargetError, BackendError):
        raise
    except Exception as err:
        raise BackendError(f"tuning over RPC ({device.address}) failed: "
                           f"{type(err).__name__}: {err}") from err
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.pool.shutdown()
        shutil.rmtree(tmpdir, ignore_errors=True)


# ---------------------------------------------------------------- a local server

class LocalRPCServer:
    """``python -m tvm.exec.rpc_server`` bound to 127.0.0.1, in a subprocess.

    ``with LocalRPCServer() as server: RPCDevice("127.0.0.1", server.port)``. The server
    picks a free port in [port, port_end); it is killed (its process group) on exit.
    """

    _BIND = re.compile(r"bind to 127\.0\.0\.1:(\d+)")

    def __init__(self, port: int = 9190, port_end: int = 9290, start_timeout_s: float = 120.0):
        self.port_range = (port, port_end)
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> LocalRPCServer:
        self._log = tempfile.NamedTemporaryFile(prefix="slimgraph-rpc-", suffix=".log",
                                                delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
             "--port", str(self.port_range[0]), "--port-end", str(self.port_range[1])],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            match = self._BIND.search(Path(self._log.name).read_text(errors="replace"))
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        log = Path(self._log.name).read_text(errors="replace")[-1500:]
        self.__exit__(None, None, None)
        raise TargetError(f"the local TVM RPC server did not start within "
                          f"{self.start_timeout_s:.0f} s: {log}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)

    @property
    def device(self) -> RPCDevice:
        if self.port is None:
            raise TargetError("the local RPC server is not running")
        return RPCDevice("127.0.0.1", self.port)
