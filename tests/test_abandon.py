"""The stop switch of a run's LM work (``lm/abandon.py``): a connection it shuts down is
closed exactly once by someone, whichever of the stopping thread and the run's own
thread gets there first. A connection left open is a socket the garbage collector
reports later, inside whatever test runs then."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from dspex_tasks.errors import RunCancelled
from dspex_tasks.lm import abandon


class Conn:
    """A connection as the HTTP transport holds it: a socket and a close()."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closes = 0

    def close(self) -> None:
        self.closes += 1
        self.sock.close()


class WakingSocket:
    """A socket whose shutdown wakes the reader at once, as a real one does: ``on_shutdown``
    runs inside shutdown(), before the stopping thread gets control back."""

    def __init__(self, sock: socket.socket, on_shutdown: Callable[[], None]) -> None:
        self._sock = sock
        self._on_shutdown = on_shutdown

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)
        self._on_shutdown()

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_stop_then_release_closes_the_connection_in_flight(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stop, conn = abandon.RunStop(), Conn(pair[0])
    stop._in_flight(conn)
    stop.stop()
    assert conn.closes == 0  # the reader may still be in it: not closed under its feet
    assert pair[1].recv(1) == b""  # but shut down: the other side sees the client go
    stop.release()
    assert conn.closes == 1 and pair[0].fileno() == -1
    assert stop.stopped


def test_a_reader_that_ends_and_releases_inside_the_shutdown_still_gets_it_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stop = abandon.RunStop()
    conn = Conn(pair[0])
    conn.sock = WakingSocket(pair[0], stop.release)  # type: ignore[assignment]
    stop._in_flight(conn)
    stop.stop()
    assert conn.closes == 1 and pair[0].fileno() == -1


def test_a_stop_after_the_run_thread_released_closes_what_it_shuts_down(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stop, conn = abandon.RunStop(), Conn(pair[0])
    stop._in_flight(conn)  # a request that failed without reaching _done
    stop.release()
    stop.stop()
    assert conn.closes == 1 and pair[0].fileno() == -1


def test_a_finished_request_is_neither_shut_down_nor_closed(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stop, conn = abandon.RunStop(), Conn(pair[0])
    stop._in_flight(conn)
    stop._done(conn)  # the answer was read: the connection went back to the pool
    stop.stop()
    stop.release()
    assert conn.closes == 0 and pair[0].fileno() != -1
    pair[1].sendall(b"x")
    assert pair[0].recv(1) == b"x"


def test_a_request_sent_after_the_stop_is_shut_down_at_once(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    stop, conn = abandon.RunStop(), Conn(pair[0])
    stop.stop()
    stop._in_flight(conn)
    assert pair[1].recv(1) == b""
    stop.release()
    assert conn.closes == 1


def test_check_raises_only_on_the_thread_bound_to_a_stopped_switch() -> None:
    stop = abandon.RunStop()
    abandon.bind(stop)
    try:
        abandon.check()
        stop.stop()
        with pytest.raises(RunCancelled) as caught:
            abandon.check()
        assert caught.value.code == "run_cancelled"
    finally:
        abandon.bind(None)
    abandon.check()


def test_pause_is_cut_short_by_a_stop_of_its_run() -> None:
    """A run's own waits (its rate-limit turn, a shared cache entry) end at its stop."""
    abandon.pause(0.001)  # no run bound: a plain sleep
    stop = abandon.RunStop()
    abandon.bind(stop)
    try:
        stopper = threading.Thread(target=stop.stop)
        started = time.monotonic()
        stopper.start()
        with pytest.raises(RunCancelled):
            abandon.pause(30)
        assert time.monotonic() - started < 5
        stopper.join()
    finally:
        abandon.bind(None)
