"""Keep TVM's C++ log out of the user's terminal unless something fails.

TVM's C++ code logs to file descriptor 2 directly: a "Scope Saving:" warning for every kernel
an export writes, an "Unknown schedule rule meta_schedule.pool_max" warning for every pooling
task MetaSchedule visits. None of it is actionable for a slimgraph user, and it scrolls the
progress bar away. ``captured()`` points fd 2 at a temporary file for a block while Python's
``sys.stderr`` (tqdm, warnings, logging) keeps writing to where fd 2 pointed before; callers
put the log's tail into the error they raise when the block fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile


@contextlib.contextmanager
def captured():
    """Redirect fd 2 to a temp file for the block; yields the file (text mode)."""
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1)
    python_stderr = sys.stderr
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 2)
        sys.stderr = console
        try:
            yield log
        finally:
            with contextlib.suppress(Exception):
                console.flush()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            console.close()


def tail(log, chars: int = 2000) -> str:
    """The last ``chars`` characters the block logged ('' if nothing)."""
    try:
        log.flush()
        log.seek(0)
        text = log.read()
    except (OSError, ValueError):
        return ""
    return text.strip()[-chars:]
