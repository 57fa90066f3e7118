"""clapjax.audio.stream.ordered_map: input order, bounded look-ahead, failures as values."""
import threading
import time

import pytest

from clapjax.audio.stream import Failed, ordered_map, usable_cores


def _slow_square(x):
    time.sleep(0.002 * ((x * 7) % 5))  # out-of-order completion
    return x * x


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_in_input_order(workers):
    assert list(ordered_map(_slow_square, range(40), workers=workers, window=6)) == [x * x for x in range(40)]


def test_failures_come_back_as_values_in_place():
    def fn(x):
        if x % 4 == 1:
            raise ValueError(f"item {x} is bad")
        return x

    out = list(ordered_map(fn, range(9), workers=2))
    assert [o for o in out if not isinstance(o, Failed)] == [0, 2, 3, 4, 6, 7, 8]
    bad = [o for o in out if isinstance(o, Failed)]
    assert [(b.item, b.reason, b.error_type) for b in bad] == [
        (1, "item 1 is bad", "ValueError"), (5, "item 5 is bad", "ValueError")]
    assert isinstance(out[1], Failed) and isinstance(out[5], Failed)


def test_uncaught_errors_propagate():
    def fn(x):
        if x == 3:
            raise KeyError("boom")
        return x

    with pytest.raises(KeyError, match="boom"):
        list(ordered_map(fn, range(10), workers=2, catch=(ValueError,)))


def test_at_most_window_items_in_flight_and_input_read_lazily():
    window, lock = 5, threading.Lock()
    state = {"read": 0, "done": 0, "max_ahead": 0}

    def source():
        for i in range(60):
            state["read"] += 1
            yield i

    def fn(x):
        with lock:
            state["done"] += 1
        return x

    consumed = 0
    for out in ordered_map(fn, source(), workers=3, window=window):
        consumed += 1
        # read but not yet handed to the consumer: never more than the window
        state["max_ahead"] = max(state["max_ahead"], state["read"] - consumed)
        time.sleep(0.001)
    assert consumed == 60
    assert state["max_ahead"] <= window - 1
    assert state["done"] == 60


def test_early_close_cancels_what_has_not_started():
    started = []

    def fn(x):
        started.append(x)
        time.sleep(0.01)
        return x

    it = ordered_map(fn, range(1000), workers=2, window=4)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert len(started) <= 3 + 4


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="workers"):
        list(ordered_map(str, [1], workers=-1))
    with pytest.raises(ValueError, match="window"):
        list(ordered_map(str, [1], window=0))
    assert usable_cores() >= 1
