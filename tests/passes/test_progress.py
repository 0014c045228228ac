"""Progress lines: silent for short work, periodic and final lines for long work."""

import logging

from slimgraph.passes.toolkit.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_short_work_is_silent_and_long_work_says_where_it_is(caplog):
    caplog.set_level(logging.INFO, logger="slimgraph")
    clock = Clock()
    quick = Progress("sensitivity: layer", 3, clock=clock)
    for name in "abc":
        clock.t += 0.5
        quick.step(name)
    quick.close()
    assert caplog.messages == []
    slow = Progress("sensitivity: layer", 10, clock=clock)
    for i in range(10):
        clock.t += 2.0
        slow.step(f"conv{i}")
    slow.close()
    assert caplog.messages[0].strip() == "sensitivity: layer 3/10: conv2 (6 s)"
    assert caplog.messages[-1].strip() == "sensitivity: layer 10/10: done (20 s)"
    assert 3 <= len(caplog.messages) <= 5  # one line every 5 s at most, then the last
