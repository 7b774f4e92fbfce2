"""Work on a background thread, ahead of its consumer (napari_wbc.threads.Prefetched)."""

import threading
import time

import pytest

from napari_wbc.threads import Prefetched


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("napari-wbc-prefetch")]


def test_results_come_in_order_and_are_computed_ahead_on_another_thread():
    started = []
    where = set()

    def slow_square(x):
        where.add(threading.current_thread().name)
        started.append(x)
        time.sleep(0.01 * (5 - x))  # later items finish sooner: order must hold anyway
        return x * x

    out = Prefetched(slow_square, range(5), ahead=2)
    assert next(out) == 0
    time.sleep(0.1)
    # While the consumer held the first result, the next ones were computed.
    assert started[:3] == [0, 1, 2]
    assert list(out) == [1, 4, 9, 16]
    assert all(name.startswith("napari-wbc-prefetch") for name in where)
    assert not _prefetch_threads()


def test_without_lookahead_it_is_a_plain_loop_on_the_callers_thread():
    where = []
    out = list(Prefetched(lambda x: where.append(threading.current_thread()) or x, "ab", 0))
    assert out == ["a", "b"]
    assert where == [threading.current_thread()] * 2


def test_an_error_is_raised_at_its_item_and_the_thread_ends():
    def fails_at_two(x):
        if x == 2:
            raise ValueError("bad block 2")
        return x

    out = Prefetched(fails_at_two, range(10), ahead=3)
    assert [next(out), next(out)] == [0, 1]
    with pytest.raises(ValueError, match="bad block 2"):
        next(out)
    assert not _prefetch_threads()


def test_closing_cancels_what_has_not_started_and_leaves_no_thread():
    done = []

    def work(x):
        time.sleep(0.02)
        done.append(x)
        return x

    out = Prefetched(work, range(100), ahead=4)
    assert next(out) == 0
    out.close()  # Cancel
    assert not _prefetch_threads()
    finished = len(done)
    time.sleep(0.1)
    assert len(done) == finished <= 6  # nothing ran after the close
