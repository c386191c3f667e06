"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest

from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport


@pytest.fixture(params=["memory", "tcp"])
def transport_and_addr(request):
    """A transport and the address to listen on: in memory, then real TCP on loopback."""
    if request.param == "memory":
        return MemoryTransport(MemoryNetwork()), Address("bravo", 0)
    return TcpTransport(), Address("127.0.0.1", 0)
