"""MetaSchedule over RPC: tune a small conv through a TVM RPC server on 127.0.0.1 (a subprocess)
within a time budget, resume from the database, build from it and compare with PyTorch."""

import socket

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import get_target, lower
from slimgraph.backends.tvm.rpc import LocalRPCServer, RPCDevice
from slimgraph.backends.tvm.tune import apply_and_build, prepare, tune
from slimgraph.errors import TargetError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rpc_address_parsing():
    dev = RPCDevice.parse("192.0.2.7:9090")
    assert (dev.host, dev.port, dev.key) == ("192.0.2.7", 9090, None)
    with pytest.raises(TargetError, match="HOST:PORT"):
        RPCDevice.parse("192.0.2.7")
    with pytest.raises(TargetError, match="bad RPC address"):
        RPCDevice("127.0.0.1", 70000)


def test_unreachable_server_names_the_fix():
    dev = RPCDevice("127.0.0.1", _free_port(), session_timeout_s=5)
    with pytest.raises(TargetError, match=r"python -m tvm.exec.rpc_server"):
        dev.check()


def _records(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_tune_over_loopback_rpc_time_budget_resume_and_build(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    spec = get_target("x86")
    prepared = prepare(lower(net, (x,)), spec)
    db = tmp_path / "db"
    records = db / "database_tuning_record.json"
    with LocalRPCServer(start_timeout_s=120) as server:
        # A spent time budget stops the search at its first check: nothing measured.
        spent = tune(prepared, spec, 40, db, time_budget_s=0.0, progress=False,
                     device=server.device)
        assert spent.stopped_by == "time" and spent.trials_measured == 0
        # What a run measured is in the database (one JSON line per trial).
        first = tune(prepared, spec, 5, db, progress=False, device=server.device)
        assert first.stopped_by == "done" and first.trials_measured == 5
        assert first.runner.startswith("rpc 127.0.0.1:")
        kept = _records(records)
        assert len(kept) == first.trials_measured
        # Without a budget, a re-run counts what is there and measures only the rest.
        second = tune(prepared, spec, 12, db, progress=False, device=server.device)
        assert second.stopped_by == "done"
        assert second.trials_measured == 12 - len(kept)
        assert _records(records)[:len(kept)] == kept and len(_records(records)) == 12
        # Nothing left to do: no trial, no change.
        third = tune(prepared, spec, 12, db, progress=False, device=server.device)
        assert third.trials_measured == 0 and third.stopped_by == "cached"
    executable = apply_and_build(prepared, spec, db)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    result = vm["main"](tvm.runtime.tensor(x.numpy()))
    y = (result[0] if not hasattr(result, "numpy") else result).numpy()
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(y - ref).max() < 1e-4

