"""`tofa stack up`'s port check: a port some process holds is refused; connections that a
stopped server left in TIME_WAIT are not a reason to refuse (`down` then `up` at once)."""

from __future__ import annotations

import socket

from flows.stack.processes import _try_bind, port_taken


def time_wait_on_a_closed_port() -> int:
    """A port whose listener is closed, with its server side of a connection in TIME_WAIT
    (the side that closes first keeps it, as a stopped server does)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server closes first: 127.0.0.1:port enters TIME_WAIT
    client.recv(1)  # the FIN arrived
    client.close()
    listener.close()
    return port


def test_a_listening_port_is_taken_and_a_free_one_is_not():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    assert port_taken(port)
    listener.close()
    assert not port_taken(port)


def test_a_port_left_in_time_wait_by_a_stopped_server_is_not_taken():
    port = time_wait_on_a_closed_port()
    assert _try_bind(port) is None  # a plain bind is refused: the check used to say "in use"
    assert not port_taken(port)
    again = socket.create_server(("127.0.0.1", port))  # what a service does (SO_REUSEADDR) works
    again.close()
