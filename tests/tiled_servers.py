"""Small helpers for tests that stop and restart real Tiled servers on fixed ports."""

import socket


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(server_class, **kwargs):
    """Start a Tiled server; its start-up wait is a fixed 20 s, which a loaded 2-core machine can miss."""
    for attempt in range(3):
        try:
            return server_class(**kwargs)
        except TimeoutError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
