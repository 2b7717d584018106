"""The pipe protocol and the supervisor's own event loop, on real pipes."""

import os
import threading

from celery_asyncpool import wire as protocol
from celery_asyncpool.parent.driver import LoopDriver


def test_messages_survive_any_split_of_the_byte_stream():
    messages = [(protocol.JOB, 1, print, ("a" * 70_000,), {}), (protocol.STOP,),
                (protocol.ACK, 1, 123, 4.5)]
    stream = b"".join(protocol.encode(m) for m in messages)
    for piece in (1, 7, 4096, len(stream)):
        decoder = protocol.Decoder()
        got = []
        for start in range(0, len(stream), piece):
            got += decoder.feed(stream[start:start + piece])
        assert got == messages


def test_reading_a_pipe_gives_whole_messages_then_none_at_eof():
    read_fd, write_fd = protocol.make_pipe()
    os.set_blocking(read_fd, False)
    decoder = protocol.Decoder()
    assert protocol.read_available(read_fd, decoder) == []
    protocol.write_all(write_fd, protocol.encode((protocol.UP, 42)))
    assert protocol.read_available(read_fd, decoder) == [(protocol.UP, 42)]
    os.close(write_fd)
    assert protocol.read_available(read_fd, decoder) is None
    os.close(read_fd)


def test_driver_runs_readers_and_timers_in_order_and_cancels_timers():
    driver = LoopDriver()
    read_fd, write_fd = os.pipe()
    seen = []
    driver.add_reader(read_fd, lambda: seen.append(("read", os.read(read_fd, 10))))
    driver.call_later(0.05, seen.append, "late")
    driver.call_later(0.01, seen.append, "early")
    driver.call_later(0.02, seen.append, "cancelled").cancel()
    os.write(write_fd, b"x")
    assert driver.run_until(lambda: "late" in seen, timeout_s=5)
    assert seen == [("read", b"x"), "early", "late"]
    driver.remove_reader(read_fd)
    assert not driver.run_until(lambda: False, timeout_s=0.05)
    driver.close()
    os.close(read_fd)
    os.close(write_fd)


def test_driver_thread_wakes_for_work_added_from_another_thread():
    driver = LoopDriver()
    driver.start_thread(tick_s=60)  # without the wake-up, the timer would wait a minute
    fired = threading.Event()
    driver.call_later(0, fired.set)
    assert fired.wait(10), "the thread slept through a new timer"
    driver.stop_thread()
    driver.close()
