"""Writing an output directory as a whole: a kill at any moment leaves the old or the new one.

``replace_outputs(directory, write, owned)`` has ``write(tmp)`` fill a fresh temporary sibling
directory, then swaps it with ``directory`` in one step: Linux's ``renameat2(RENAME_EXCHANGE)``
(called through ctypes: Python's ``os`` has no binding for it). A reader therefore sees either
every old file or every new one, never a new library beside an old report. The files slimgraph
does not own (``owned`` lists the ones it does) are carried over: regular files as hard links
before the swap, directories moved back right after it. Where the exchange is not available
(another OS, an old kernel, a file system without it) the files are moved one by one, the
manifest last, as before.

A save that was killed leaves a ``.NAME.slimgraph-PID-*`` sibling; the next save moves any user
entry it still holds back into ``directory`` and removes it (unless its process is alive).

The steps are a generator (``replace_outputs_steps``) so tests can stop a save after any step,
as a kill would, and check what a reader then sees.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def default_mode(directory: bool = False) -> int:
    """The mode a plain ``open``/``mkdir`` would give under the current umask (mkstemp and
    mkdtemp use 0600/0700, which would hide outputs from other users)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` atomically; False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"exchanging {a} and {b}: {os.strerror(err)}")


def replace_outputs(directory: str | os.PathLike, write: Callable[[Path], None],
                    owned: Collection[str], last: str | None = None) -> Path:
    """Replace slimgraph's outputs in ``directory`` by what ``write(tmp)`` writes; see above.

    ``last``: in the file-by-file fallback, the file moved last (the manifest)."""
    for _ in replace_outputs_steps(Path(directory), write, owned, last):
        pass
    return Path(directory)


def replace_outputs_steps(directory: Path, write: Callable[[Path], None],
                          owned: Collection[str], last: str | None = None) -> Iterator[str]:
    """``replace_outputs`` one step at a time (yields the name of each step done)."""
    if directory.is_symlink():
        directory = directory.resolve()
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_stale(directory, owned)
    yield "recovered"
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.slimgraph-{os.getpid()}-",
                                dir=directory.parent))
    try:
        write(tmp)
        os.chmod(tmp, stat.S_IMODE(directory.stat().st_mode) if directory.is_dir()
                 else default_mode(directory=True))
        for path in tmp.iterdir():
            if path.is_file():
                os.chmod(path, default_mode())
        yield "written"
        if not directory.exists():
            os.rename(tmp, directory)
            yield "renamed"
            return
        later = _link_user_files(directory, tmp, owned)
        yield "linked"
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not exchange(tmp, directory):
        yield from _move_files(tmp, directory, owned, last)
        return
    yield "exchanged"
    for name in later:  # the user's directories, from the old copy (now at tmp) back
        if not (directory / name).exists():
            os.rename(tmp / name, directory / name)
    yield "moved back"
    shutil.rmtree(tmp, ignore_errors=True)
    yield "removed"


def _link_user_files(directory: Path, tmp: Path, owned: Collection[str]) -> list[str]:
    """Hard-link (or copy) the user's files into ``tmp``; returns the user's directories."""
    later = []
    for entry in directory.iterdir():
        if entry.name in owned or (tmp / entry.name).exists() or _is_temp_of(entry, directory):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), tmp / entry.name)
        elif entry.is_dir():
            later.append(entry.name)
        else:
            try:
                os.link(entry, tmp / entry.name)
            except OSError:
                shutil.copy2(entry, tmp / entry.name)
    return later


def _move_files(tmp: Path, directory: Path, owned: Collection[str], last: str | None) -> Iterator[str]:
    """The fallback: move each file into place (``last`` last), drop owned files not rewritten."""
    written = sorted((p.name for p in tmp.iterdir() if p.name in owned), key=lambda n: n == last)
    for name in written:
        os.replace(tmp / name, directory / name)
        yield f"moved {name}"
    for name in set(owned) - set(written):
        (directory / name).unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    yield "removed"


def _is_temp_of(entry: Path, directory: Path) -> bool:
    return re.fullmatch(rf"\.{re.escape(directory.name)}\.slimgraph-\d+-.*", entry.name) is not None


def recover_stale(directory: Path, owned: Collection[str]) -> list[Path]:
    """Finish what killed saves into ``directory`` left: user entries back, temp dirs removed."""
    removed = []
    if not directory.parent.is_dir():
        return removed
    for stale in directory.parent.iterdir():
        m = re.fullmatch(rf"\.{re.escape(directory.name)}\.slimgraph-(\d+)-.*", stale.name)
        if m is None or not stale.is_dir() or _alive(int(m.group(1))):
            continue
        if directory.is_dir():
            for entry in stale.iterdir():
                if entry.name not in owned and not os.path.lexists(directory / entry.name):
                    os.rename(entry, directory / entry.name)
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a save of this process that stopped (an exception, a test) is over
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
