"""free_port hands out a port that can be bound at once, and a different one while the first is held."""

import socket

from megatron_rl.ports import free_port


def test_a_free_port_can_be_bound_and_a_held_one_is_not_handed_out():
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen()
        assert free_port() != port
