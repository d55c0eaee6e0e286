"""A free TCP port for a server or a rendezvous that this process is about to start.

    port = free_port()   # a port nothing listens on at 127.0.0.1, now

The port is free when asked: another process can still take it before it is bound (the sweep retries a run that
lost such a race: sweep/launch.py).
"""

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS has just handed out as free on `host` (bound once to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
