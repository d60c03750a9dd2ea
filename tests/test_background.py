"""Background loads: the newest request wins, and nothing is loaded twice or lost."""
from __future__ import annotations

import threading
import time

from bridge.background import BackgroundLoad


def _wait(load: BackgroundLoad, timeout: float = 5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        finished = load.take()
        if finished is not None:
            return finished
        time.sleep(0.01)
    return None


def test_a_job_runs_and_its_result_is_taken_once():
    load = BackgroundLoad()
    load.submit("a", lambda: 42)
    finished = _wait(load)
    assert (finished.key, finished.result, finished.error) == ("a", 42, None)
    assert load.take() is None and load.pending is None


def test_errors_are_delivered_not_raised():
    load = BackgroundLoad()
    load.submit("bad", lambda: 1 / 0)
    assert isinstance(_wait(load).error, ZeroDivisionError)


def test_only_the_newest_request_is_delivered():
    load, gate, ran = BackgroundLoad(), threading.Event(), []
    load.submit("a", lambda: (gate.wait(5), ran.append("a")))
    time.sleep(0.05)
    load.submit("b", lambda: ran.append("b"))
    load.submit("c", lambda: ran.append("c") or "c")
    gate.set()
    assert _wait(load).key == "c" and ran == ["a", "c"]


def test_asking_again_for_the_running_job_does_not_run_it_twice():
    load, gate, ran = BackgroundLoad(), threading.Event(), []
    load.submit("a", lambda: (gate.wait(5), ran.append("a")))
    time.sleep(0.05)
    load.submit("b", lambda: ran.append("b"))
    load.submit("a", lambda: ran.append("a again"))
    gate.set()
    assert _wait(load).key == "a" and ran == ["a"]


def test_cancel_drops_the_waiting_request():
    load, gate, ran = BackgroundLoad(), threading.Event(), []
    load.submit("a", lambda: (gate.wait(5), ran.append("a")))
    time.sleep(0.05)
    load.submit("b", lambda: ran.append("b"))
    load.cancel()
    gate.set()
    assert _wait(load).key == "a" and ran == ["a"]


def test_many_requests_in_a_row_are_all_served():
    load = BackgroundLoad()
    for i in range(200):
        load.submit(i, lambda i=i: i)
        finished = _wait(load)
        assert finished is not None and finished.result == i
