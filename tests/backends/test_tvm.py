"""TVM backend: targets, lowering, untuned and tuned builds, the tuning cache, artifacts.

Everything here runs on the host CPU in well under a minute per test, except the test marked
slow (ResNet-18 tuning, minutes on a 2-core machine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from slimgraph.backends.tvm import (
    ArtifactLoadError,
    CompiledModel,
    TuneOptions,
    build,
    get_target,
    host_mcpu,
    list_targets,
    load_compiled,
    lower,
    plan_budget,
    register_custom_op_lowering,
    unregister_custom_op_lowering,
)
from slimgraph.backends.tvm.artifact import VM_BUILTINS
from slimgraph.backends.tvm.tune import TaskInfo, choose_batch, choose_floor
from slimgraph.errors import BackendError, ModelLoadError, ShapeError, TargetError
from slimgraph.zoo.models import DigitsCNN, resnet18

RTOL = 1e-4


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    x = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).numpy()
    return model, x, ref


@pytest.fixture(scope="module")
def untuned(digits):
    model, x, _ = digits
    return build(model, (x,), "x86", tune_trials=0)


# ---------------------------------------------------------------- targets

def test_x86_target_detects_this_cpu():
    spec = get_target("x86")
    assert spec.kind == "x86" and spec.name == "x86"
    assert spec.tvm_target["kind"] == "llvm"
    assert spec.tvm_target["mcpu"] == host_mcpu() and spec.tvm_target["mcpu"]
    assert spec.tvm_target["num-cores"] >= 1
    assert spec.is_host
    assert spec.default_pipeline


def test_explicit_x86_cpu():
    spec = get_target("x86:skylake-avx512")
    assert spec.tvm_target["mcpu"] == "skylake-avx512"
    assert spec.name == "x86:skylake-avx512"
    assert spec.key != get_target("x86").key or host_mcpu() == "skylake-avx512"
    assert str(spec.to_tvm().attrs["mcpu"]) == "skylake-avx512"


def test_unknown_target_lists_known_names():
    with pytest.raises(TargetError) as info:
        get_target("tpu")
    message = str(info.value)
    for name in ("x86", "x86:skylake-avx512", "arm64", "cuda:sm_90"):
        assert name in message
    with pytest.raises(TargetError, match="LLVM does not know"):
        get_target("x86:not-a-cpu")


def test_list_targets_and_non_host_targets():
    names = [t.name for t in list_targets()]
    assert "x86" in names and "arm64" in names and "cuda:sm_90" in names
    arm = get_target("arm64")
    assert arm.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert get_target("cuda:sm_80").tvm_target["arch"] == "sm_80"


def test_runtime_threads_configured():
    # TVM would otherwise use half the cores and pin the process to core 0.
    assert int(os.environ["TVM_NUM_THREADS"]) >= 1


# ---------------------------------------------------------------- lowering and untuned build

def test_untuned_build_matches_pytorch(digits, untuned):
    _, x, ref = digits
    assert untuned.input_specs == [("x", (1, 1, 16, 16), "float32")]
    assert untuned.output_specs[0]["shape"] == [1, 10]
    assert untuned.info.tuned is False and untuned.info.trials_measured == 0
    out = untuned(x)  # torch in
    assert len(out) == 1 and out[0].shape == (1, 10)
    assert rel_err(out[0], ref) < RTOL
    assert rel_err(untuned(x.numpy())[0], ref) < RTOL  # numpy in


def test_wrong_inputs_raise_shape_error(untuned):
    with pytest.raises(ShapeError, match=r"expected shape \[1, 1, 16, 16\], got \[1, 1, 8, 8\]"):
        untuned(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ShapeError, match="expected 1 input"):
        untuned(np.zeros((1, 1, 16, 16), np.float32), np.zeros((1,), np.float32))
    with pytest.raises(ShapeError, match="dtype"):
        untuned(np.zeros((1, 1, 16, 16), np.float64))


def test_benchmark_reports_latency(untuned):
    stats = untuned.benchmark(repeat=3, warmup=1)
    assert stats["repeat"] == 3
    assert 0 < stats["min_ms"] <= stats["median_ms"]
    assert stats["mean_ms"] > 0


def test_profile_times_every_kernel_call(untuned):
    """Each kernel the VM calls appears once, with the calls the executable makes per run."""
    import collections
    import re

    rows = untuned.profile(repeat=3, warmup=1)
    calls = collections.Counter(n for n in re.findall(r"call\s+(\S+)", untuned._module.as_text())
                                if not n.startswith("vm.builtin."))
    kernels = {r.name: r.calls for r in rows if r.name != VM_BUILTINS}
    assert kernels == dict(calls) and len(kernels) > 5
    assert [r.ms for r in rows] == sorted((r.ms for r in rows), reverse=True)
    assert all(r.ms > 0 and 0 < r.share < 1 for r in rows)
    assert 0.5 < sum(r.share for r in rows) <= 1.0  # the rest: the VM between calls
    assert rows[0].name.startswith("conv2d")  # the digits CNN's time is in its convs
    assert set(rows[0].to_dict()) == {"kernel", "calls", "ms", "share"}


def test_profile_refuses_bad_arguments_and_other_targets(untuned):
    with pytest.raises(BackendError, match="repeat >= 1"):
        untuned.profile(repeat=0)
    model = CompiledModel(None, get_target("arm64"), [("x", (1,), "float32")], [], {})
    if not model.target.is_host:
        with pytest.raises(BackendError, match="cannot profile"):
            model.profile()


def test_benchmark_refuses_non_host_target():
    model = CompiledModel(None, get_target("arm64"), [("x", (1,), "float32")], [], {})
    if model.target.is_host:
        pytest.skip("this machine is arm64")
    with pytest.raises(BackendError, match="arm64"):
        model.benchmark()


@torch.library.custom_op("slimgraph_test::scale2", mutates_args=())
def _scale2(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0


@_scale2.register_fake
def _scale2_fake(x):
    return torch.empty_like(x)


class _UsesCustomOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(torch.ops.slimgraph_test.scale2(self.conv(x)))


def _lower_scale2(node, importer):
    from tvm import topi

    return importer.block_builder.emit_te(lambda t: topi.multiply(t, 2.0),
                                          importer.env[node.args[0]])


def test_custom_op_needs_registered_lowering():
    model, x = _UsesCustomOp().eval(), torch.randn(1, 1, 8, 8)
    with pytest.raises(BackendError, match=r"scale2\.default"):
        lower(model, (x,))
    key = register_custom_op_lowering("slimgraph_test::scale2", _lower_scale2)
    try:
        assert key == "scale2.default"
        compiled = build(model, (x,), "x86")
        with torch.no_grad():
            ref = model(x).numpy()
        assert rel_err(compiled(x)[0], ref) < RTOL
    finally:
        unregister_custom_op_lowering("slimgraph_test::scale2")


def test_failing_custom_lowering_names_op_and_node():
    def broken(node, importer):
        raise ValueError("no kernel")

    model, x = _UsesCustomOp().eval(), torch.randn(1, 1, 8, 8)
    with pytest.raises(BackendError, match=r"scale2\.default.*node.*no kernel"):
        lower(model, (x,), custom_convert_map={"scale2": broken})


class _AmaxPools(torch.nn.Module):
    """Global max pooling written as amax (TVM's importer has no amax/amin; slimgraph adds them)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y.amax(dim=(2, 3)), torch.amin(y, (-1, -2)),
                          y.amax(dim=3, keepdim=True).mean((2, 3)), y.amax().expand(1, 8)], 1)


def test_amax_and_amin_compile_and_match_pytorch():
    model, x = _AmaxPools().eval(), torch.randn(1, 3, 9, 9)
    compiled = build(model, (x,), "x86", progress=False)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(compiled(x.numpy())[0], want, rtol=1e-5, atol=1e-6)


class _AdaptiveMax(torch.nn.Module):
    """Adaptive max pooling to uneven bins (9x11 -> 3x2, 4x3: overlapping windows)."""

    def __init__(self, return_indices=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 6, 3)
        self.a = torch.nn.AdaptiveMaxPool2d((3, 2), return_indices=return_indices)
        self.b = torch.nn.AdaptiveMaxPool2d((4, 3))

    def forward(self, x):
        y = self.conv(x)
        if self.a.return_indices:
            return self.a(y)
        return torch.cat([self.a(y).flatten(1), self.b(y).flatten(1)], 1)


def test_adaptive_max_pool_compiles_and_matches_pytorch():
    model, x = _AdaptiveMax().eval(), torch.randn(2, 4, 11, 13)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.array_equal(build(model, (x,), "x86", progress=False)(x)[0], want)  # max: exact


def test_adaptive_max_pool_indices_are_a_clear_error():
    with pytest.raises(BackendError, match="indices of adaptive_max_pool2d"):
        build(_AdaptiveMax(return_indices=True).eval(), (torch.randn(1, 4, 11, 13),), "x86",
              progress=False)


# ---------------------------------------------------------------- tuning

def _tasks(works):
    return [TaskInfo(name=f"t{i}", weight=1, flops=w) for i, w in enumerate(works)]


def test_plan_budget_floor_proportions_and_cap():
    tasks = _tasks([200e6, 100e6, 100e6, 1e5, 0.0])
    plan = plan_budget(tasks, 100, floor=8, batch=8, max_trials_per_task=40)
    assert sum(plan) <= 100
    assert all(p >= 8 for p in plan)  # every task gets its floor
    assert plan[3] == 8 and plan[4] == 8  # tiny tasks: the floor only
    assert plan[0] > plan[1] >= plan[2] > 8  # more work, more trials
    assert max(plan) <= 40
    assert all((p - 8) % 8 == 0 for p in plan)  # extra trials in whole phase-2 rounds


def test_plan_budget_small_budgets():
    tasks = _tasks([5e6, 4e6, 3e6, 2e6])
    assert plan_budget(tasks, 2) == [1, 1, 0, 0]  # fewer trials than tasks: the biggest
    assert plan_budget(tasks, 0) == [0, 0, 0, 0]
    floor = choose_floor(10, 4, 8)
    batch = choose_batch(10, 4, floor)
    plan = plan_budget(tasks, 10, floor=floor, batch=batch)
    assert floor == 2 and batch == 2 and sum(plan) == 10 and min(plan) == 2


def test_tune_options_are_validated():
    with pytest.raises(BackendError, match="population"):
        TuneOptions(population=2)


@pytest.mark.slow
def test_tuned_build_matches_and_reuses_database(digits, untuned, tmp_path):
    model, x, ref = digits
    first = build(model, (x,), "x86", tune_trials=12, workdir=tmp_path, progress=False)
    info = first.info
    assert info.tuned is True
    assert 0 < info.trials_measured <= 12
    assert info.tasks >= 5 and info.stopped_by == "done"
    assert Path(info.database).is_relative_to(tmp_path / "tuning")
    assert (Path(info.database) / "database_tuning_record.json").stat().st_size > 0
    assert rel_err(first(x)[0], ref) < RTOL
    # tuned schedules replaced defaults (latency is measured by tools/ and `slimgraph bench`)
    assert len(info.untuned_tasks) < info.tasks

    second = build(model, (x,), "x86", tune_trials=12, workdir=tmp_path, progress=False)
    assert second.info.trials_measured == 0
    assert second.info.stopped_by == "cached"
    # a cached build's kernel table still has each tuned kernel's best time from the database
    firsts = {row["task"]: row for row in info.task_table}
    for row in second.info.task_table:
        assert row["trials"] == 0 and row["in_database"] == firsts[row["task"]]["in_database"]
        assert row["best_us"] == firsts[row["task"]]["best_us"]
        assert (row["best_us"] is not None) == (row["task"] not in info.untuned_tasks)
    assert rel_err(second(x)[0], ref) < RTOL

    # tune_trials=0 with a database: apply its schedules, tune nothing
    applied = build(model, (x,), "x86", tune_trials=0, database=info.database)
    assert applied.info.tuned is True and applied.info.trials_measured == 0
    assert applied.info.untuned_tasks == info.untuned_tasks
    np.testing.assert_allclose(applied(x)[0], second(x)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(BackendError, match="no tuning database"):
        build(model, (x,), "x86", tune_trials=0, database=tmp_path / "missing")


def test_time_budget_stops_tuning_and_build_stays_correct(digits, tmp_path):
    model, x, ref = digits
    compiled = build(model, (x,), "x86", tune_trials=50, workdir=tmp_path, time_budget_s=0.0,
                     progress=False)
    assert compiled.info.stopped_by == "time"
    assert compiled.info.trials_measured == 0
    assert compiled.info.tuned is False
    assert len(compiled.info.untuned_tasks) == compiled.info.tasks
    assert rel_err(compiled(x)[0], ref) < RTOL  # default schedules where nothing was tuned


def test_tuning_needs_a_host_target(digits, tmp_path):
    model, x, _ = digits
    with pytest.raises(TargetError, match="cannot tune for arm64"):
        build(model, (x,), "arm64", tune_trials=4, workdir=tmp_path)


# ---------------------------------------------------------------- artifacts

def test_save_load_round_trip(digits, untuned, tmp_path):
    _, x, ref = digits
    directory = untuned.save(tmp_path / "artifact")
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.json", "model.so"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["target"] == "x86" and manifest["target_kind"] == "x86"
    assert manifest["tvm_target"] == get_target("x86").tvm_target
    assert manifest["inputs"] == [{"name": "x", "shape": [1, 1, 16, 16], "dtype": "float32"}]
    assert manifest["outputs"][0]["shape"] == [1, 10]
    assert manifest["tvm_version"] and manifest["slimgraph_version"]
    assert manifest["tuning"]["tuned"] is False
    assert len(manifest["library_sha256"]) == 64

    loaded = load_compiled(directory)
    assert loaded.input_specs == untuned.input_specs
    out = loaded(x)[0]
    np.testing.assert_array_equal(out, untuned(x)[0])
    assert rel_err(out, ref) < RTOL
    with pytest.raises(ShapeError, match="expected shape"):
        loaded(np.zeros((2, 1, 16, 16), np.float32))
    # a loaded model saves again (the library is copied)
    again = load_compiled(loaded.save(tmp_path / "copy"))
    np.testing.assert_array_equal(again(x)[0], out)


def test_load_missing_artifact(tmp_path):
    with pytest.raises(ArtifactLoadError, match="does not exist") as info:
        load_compiled(tmp_path / "nowhere")
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, BackendError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="manifest.json is missing"):
        load_compiled(tmp_path / "empty")


def test_load_corrupt_or_foreign_artifact(untuned, tmp_path):
    directory = untuned.save(tmp_path / "a")
    lib = directory / "model.so"
    lib.write_bytes(lib.read_bytes()[:1000])
    with pytest.raises(ArtifactLoadError, match="sha256"):
        load_compiled(directory)

    directory = untuned.save(tmp_path / "b")
    (directory / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactLoadError, match="corrupt"):
        load_compiled(directory)

    directory = untuned.save(tmp_path / "c")
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest.update(target="arm64", target_kind="arm64")
    (directory / "manifest.json").write_text(json.dumps(manifest))
    if get_target("arm64").is_host:
        pytest.skip("this machine is arm64")
    with pytest.raises(BackendError, match="built for arm64"):
        load_compiled(directory)


# ---------------------------------------------------------------- slow

@pytest.mark.slow
def test_resnet18_tuning_replaces_default_schedules(tmp_path):
    model = resnet18()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).numpy()
    untuned = build(model, (x,), "x86")
    tuned = build(model, (x,), "x86", tune_trials=60, workdir=tmp_path, progress=False)
    assert rel_err(tuned(x)[0], ref) < RTOL
    assert rel_err(untuned(x)[0], ref) < RTOL
    # every conv stage got a tuned schedule; the speed-up itself is measured by `make bench`
    assert tuned.info.trials_measured > 0
    assert len(tuned.info.untuned_tasks) < tuned.info.tasks


def test_native_log_is_captured_and_python_stderr_still_shows(capfd):
    import sys

    from slimgraph.backends.tvm import nativelog

    with nativelog.captured() as log:
        os.write(2, b"C++ noise from TVM\n")
        print("progress bar line", file=sys.stderr)
    err = capfd.readouterr().err
    assert "progress bar line" in err and "C++ noise" not in err
    with nativelog.captured() as log:
        os.write(2, b"first\nlast words\n")
        assert nativelog.tail(log, 10) == "last words"
    os.write(2, b"after\n")
    assert "after" in capfd.readouterr().err


class _LayoutZoo(torch.nn.Module):
    """Every conv coupling the layout conversion has to carry: depthwise, grouped, strided,
    transposed, pooling, residual add, concat, global pooling into a linear layer."""

    def __init__(self):
        super().__init__()
        c = torch.nn.Conv2d
        self.stem = c(3, 16, 3, padding=1)
        self.dw = c(16, 16, 3, padding=1, groups=16)
        self.grouped = c(16, 16, 1, groups=4)
        self.down = c(32, 24, 3, stride=2, padding=1)
        self.up = torch.nn.ConvTranspose2d(24, 8, 2, stride=2)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = y + self.grouped(torch.relu(self.dw(y)))
        y = torch.cat([y, torch.nn.functional.max_pool2d(y, 3, 1, 1)], dim=1)
        y = torch.nn.functional.avg_pool2d(torch.relu(self.down(y)), 1)
        y = torch.relu(self.up(y))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1)), y


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_conv_layout_conversion_keeps_numerics(layout, tmp_path):
    torch.manual_seed(0)
    net, x = _LayoutZoo().eval(), torch.randn(1, 3, 12, 12)
    compiled = build(net, (x,), "x86", conv_layout=layout, progress=False)
    with torch.no_grad():
        refs = [r.numpy() for r in net(x)]
    outs = compiled(x)
    assert [o.shape for o in outs] == [r.shape for r in refs]  # outputs keep NCHW
    assert max(rel_err(o, r) for o, r in zip(outs, refs, strict=True)) < RTOL
    manifest = json.loads((compiled.save(tmp_path / "a") / "manifest.json").read_text())
    assert manifest["tuning"]["conv_layout"] == layout


def test_cpu_targets_compile_convs_in_nhwc_and_unknown_layouts_are_refused():
    assert get_target("x86").conv_layout == "NHWC"
    assert get_target("arm64").conv_layout == "NHWC"
    assert get_target("cuda:sm_90").conv_layout == "NCHW"
    net = torch.nn.Conv2d(1, 2, 3).eval()
    with pytest.raises(BackendError, match="unknown conv layout 'NCWH'"):
        build(net, (torch.randn(1, 1, 5, 5),), "x86", conv_layout="NCWH", progress=False)
