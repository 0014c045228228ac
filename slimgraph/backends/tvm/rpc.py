"""Tuning on a remote device: MetaSchedule measuring candidates through TVM's RPC.

On the device (an arm64 board, a phone, another x86 box) run TVM's RPC server::

    python -m tvm.exec.rpc_server --host 0.0.0.0 --port 9090      # on the device
    slimgraph ... --target arm64 --rpc DEVICE_IP:9090               # here (tracker-less)

A device needs only TVM's runtime and the RPC server; candidates are compiled here (for arm64
with the cross compiler) as shared libraries, uploaded, loaded and timed there. With a tracker,
give ``RPCDevice(host, port, key=...)`` the tracker's address and the device key. The search
itself is ``tune.tune(..., device=RPCDevice(...))``: the same budget planning, time budget,
cost model and resumable database as tuning on this machine.

  RPCDevice            where the server (or tracker) is, and its timeouts; ``check()`` connects
                       once and raises a ``TargetError`` that names the fix when it cannot.
  make_rpc_runner()    MetaSchedule's RPCRunner, with a tracker-less session factory.
  LocalRPCServer       starts ``python -m tvm.exec.rpc_server`` on 127.0.0.1 in a subprocess,
                       for tests and for tuning this machine through the same path.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from slimgraph.errors import TargetError


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
