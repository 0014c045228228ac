"""MetaSchedule over RPC: tune a small conv through a TVM RPC server on 127.0.0.1 (a subprocess,
bounded in time), resume from the database, build from it and compare with PyTorch."""

import socket

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import get_target, lower
from slimgraph.backends.tvm.rpc import LocalRPCServer, RPCDevice, tune_over_rpc
from slimgraph.backends.tvm.tune import apply_and_build, prepare
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


@pytest.mark.timeout(420)
def test_tune_over_loopback_rpc_resumes_and_builds(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    spec = get_target("x86")
    prepared = prepare(lower(net, (x,)), spec)
    db = tmp_path / "db"
    records = db / "database_tuning_record.json"
    with LocalRPCServer(start_timeout_s=120) as server:
        first = tune_over_rpc(prepared, spec, 4, db, server.device, batch=2)
        assert first.records_before == 0 and first.records_after == 4
        assert first.summary()["runner"] == "rpc"
        kept = records.read_text().splitlines()
        assert len(kept) == 4  # one JSON line per measured trial
        # A second run with a larger budget counts what is there and measures only the rest.
        second = tune_over_rpc(prepared, spec, 6, db, server.device, batch=2)
        assert (second.records_before, second.records_after) == (4, 6)
        assert records.read_text().splitlines()[:4] == kept
        # Nothing left to do: no trial, no change.
        third = tune_over_rpc(prepared, spec, 6, db, server.device)
        assert third.trials_measured == 0
    lines = records.read_text().splitlines()
    assert all("[" in line for line in lines)
    executable = apply_and_build(prepared, spec, db)
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    result = vm["main"](tvm.runtime.tensor(x.numpy()))
    y = (result[0] if not hasattr(result, "numpy") else result).numpy()
    with torch.no_grad():
        ref = net(x).numpy()
    assert np.abs(y - ref).max() < 1e-4
