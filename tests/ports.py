"""Free loopback ports to bind later, for the tests and the benches. Standard library only:
``bench/seed_driver.py`` imports it in pyLoadBalancer's venv, where lbmqtt is not installed."""

from __future__ import annotations

import random
import socket

__all__ = ["free_port"]

_GIVEN: set[int] = set()


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free loopback port for something to bind later, not one this process was given
    before. Taken below the kernel's ephemeral range (32768-60999 by default): there, a
    port-0 bind or an outgoing connection running in parallel could take it first (it
    happened to tests under ``pytest -n 4``, and to the seed's worker hub in a ``seed`` run)."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, low) if low > 21000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            got = int(s.getsockname()[1])
        if got not in _GIVEN:
            _GIVEN.add(got)
            return got
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
