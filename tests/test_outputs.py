"""slimgraph.outputs: an output directory replaced as a whole, user files kept, kills recovered."""

import os
import subprocess
import sys

import pytest

from slimgraph import outputs
from slimgraph.outputs import replace_outputs, replace_outputs_steps

OWNED = ("a.bin", "manifest.json", "old-only.txt")


def writer(tag, extra=()):
    def write(d):
        (d / "a.bin").write_text(tag)
        (d / "manifest.json").write_text(tag)
        for name in extra:
            (d / name).write_text(tag)
    return write


def state(d):
    return {p.name: p.read_text() for p in d.iterdir() if p.is_file()}


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "file-by-file"])
def test_replace_keeps_user_entries_and_drops_stale_outputs(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(outputs, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    replace_outputs(out, writer("1", ["old-only.txt"]), OWNED, last="manifest.json")
    (out / "mine.txt").write_text("user")
    (out / "sub").mkdir()
    (out / "sub" / "f").write_text("user")
    replace_outputs(out, writer("2"), OWNED, last="manifest.json")
    assert state(out) == {"a.bin": "2", "manifest.json": "2", "mine.txt": "user"}
    assert (out / "sub" / "f").read_text() == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failing_write_leaves_the_old_outputs_and_no_temp(tmp_path):
    out = tmp_path / "out"
    replace_outputs(out, writer("1"), OWNED)

    def broken(d):
        (d / "a.bin").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_outputs(out, broken, OWNED)
    assert state(out) == {"a.bin": "1", "manifest.json": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_every_kill_point_leaves_old_or_new_and_the_next_save_recovers(tmp_path):
    out = tmp_path / "out"
    replace_outputs(out, writer("old"), OWNED)
    (out / "sub").mkdir()
    steps = list(replace_outputs_steps(out, writer("new"), OWNED))
    assert steps == ["recovered", "written", "linked", "exchanged", "moved back", "removed"]
    for stop in range(len(steps)):
        replace_outputs(out, writer("old"), OWNED)
        gen = replace_outputs_steps(out, writer("new"), OWNED)
        for _ in range(stop + 1):
            next(gen)
        del gen  # a kill: nothing after this step runs
        seen = state(out)
        assert seen in ({"a.bin": "old", "manifest.json": "old"}, {"a.bin": "new", "manifest.json": "new"})
        replace_outputs(out, writer("next"), OWNED)
        assert state(out) == {"a.bin": "next", "manifest.json": "next"} and (out / "sub").is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_live_saves_temp_is_left_alone(tmp_path):
    out = tmp_path / "out"
    replace_outputs(out, writer("1"), OWNED)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".out.slimgraph-{proc.pid}-x"
        busy.mkdir()
        replace_outputs(out, writer("2"), OWNED)
        assert busy.is_dir()
    finally:
        proc.kill()
        proc.wait()
    replace_outputs(out, writer("3"), OWNED)
    assert not busy.exists()


def test_a_symlinked_output_directory_stays_a_symlink(tmp_path):
    real = tmp_path / "real"
    replace_outputs(real, writer("1"), OWNED)
    link = tmp_path / "link"
    link.symlink_to(real)
    replace_outputs(link, writer("2"), OWNED)
    assert link.is_symlink() and state(real)["a.bin"] == "2"


def test_outputs_get_the_umask_mode_not_mkstemp_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = replace_outputs(tmp_path / "out", writer("1"), OWNED)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "a.bin").stat().st_mode & 0o777 == 0o644
