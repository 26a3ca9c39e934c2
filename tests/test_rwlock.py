"""The service's readers-writer lock: readers share, a writer is alone, and requests are
admitted in arrival order, so back-to-back writers cannot starve a waiting reader."""

from __future__ import annotations

import threading
import time

from editkit.rwlock import RWLock


def start(fn) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def wait_for(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_readers_share_and_a_writer_waits_for_them():
    lock, inside, release = RWLock(), [], threading.Event()

    def reader():
        with lock.read():
            inside.append("r")
            release.wait()

    readers = [start(reader) for _ in range(3)]
    wait_for(lambda: len(inside) == 3)  # three readers at once
    def writer():
        with lock.write():
            inside.append("w")

    writer = start(writer)
    time.sleep(0.1)
    assert inside == ["r"] * 3  # the writer waits for the readers
    release.set()
    for t in [*readers, writer]:
        t.join(5)
    assert inside[-1] == "w"


def test_requests_are_served_in_arrival_order():
    """A reader that arrives while writers queue gets in before writers that come after it."""
    lock, order, hold = RWLock(), [], threading.Event()

    def writer(name):
        def run():
            with lock.write():
                order.append(name)
                if name == "w0":
                    hold.wait()
        return run

    def reader():
        with lock.read():
            order.append("r")

    threads = [start(writer("w0"))]
    wait_for(lambda: order == ["w0"])
    threads.append(start(writer("w1")))
    time.sleep(0.05)
    threads.append(start(reader))
    time.sleep(0.05)
    threads += [start(writer(f"w{i}")) for i in (2, 3)]
    time.sleep(0.05)
    hold.set()
    for t in threads:
        t.join(5)
    assert order[:3] == ["w0", "w1", "r"], order  # writer preference let every writer in before r
