"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshinfer.transport.base import Address
from meshinfer.transport.memory import MemoryNetwork, MemoryTransport
from meshinfer.transport.tcp import TcpTransport
from tests.loopguard import GUARD, Allowance, GuardLimits, LoopGuardPlugin


@pytest.fixture(params=["memory", "tcp"])
def transport_and_addr(request):
    """A transport and the address to listen on: in memory, then real TCP on loopback."""
    if request.param == "memory":
        return MemoryTransport(MemoryNetwork()), Address("bravo", 0)
    return TcpTransport(), Address("127.0.0.1", 0)


# --- the loop guard (STYLE rule 11): a test fails when it leaks a task or blocks its loop ---
#
# tests/loopguard.py says how. LOOPGUARD_REPORT=<file> turns it into a survey: nothing fails,
# every finding under lowered limits (50 ms) goes to <file> as JSON lines. LOOPGUARD=off
# leaves asyncio alone (to measure the guard's overhead).

_KEEPALIVE_HANDLER_OF_A_MODULE_SCOPED_CLIENT = (
    r"\(left pending after its test\): \S+ running RequestHandler\.start\(\), "
    r"created at \S*aiohttp/web_protocol\.py"
)

LOOPGUARD_ALLOWANCES: tuple[Allowance, ...] = (
    # Not a leak: these modules share one loop, one API server and one aiohttp client session
    # per module. A test whose requests overlap opens another pooled keep-alive connection,
    # and aiohttp's server task for that connection lives as long as the pool, i.e. until the
    # module's fixtures close (the check at loop close still sees anything left then).
    Allowance(
        "tests/test_coordinator_api.py::",
        _KEEPALIVE_HANDLER_OF_A_MODULE_SCOPED_CLIENT,
        "pooled connection of the module-scoped client",
    ),
    Allowance(
        "tests/test_coordinator_api_fuzz.py::",
        _KEEPALIVE_HANDLER_OF_A_MODULE_SCOPED_CLIENT,
        "pooled connection of the module-scoped client",
    ),
)
"""Findings the guard lets pass, each with why (or where it is reported to its owner)."""


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get("LOOPGUARD") == "off":
        return
    report_to = os.environ.get("LOOPGUARD_REPORT")
    if report_to:
        GUARD.meter.limits = GuardLimits(cpu_limit_s=0.05, blocked_limit_s=0.05)
    plugin = LoopGuardPlugin(GUARD, LOOPGUARD_ALLOWANCES, Path(report_to) if report_to else None)
    config.pluginmanager.register(plugin, "loopguard")
