"""How many threads the CPU math libraries behind NumPy may use (OpenBLAS, MKL, BLIS, OpenMP).

Each such library keeps its own pool, by default one thread per core, and its threads spin for a
while after each call waiting for the next one. On a node that runs several forward passes at
once (inline on the event loop and on the engine's worker threads, ``[executor]
max_concurrent`` items), every pass brings its library's pool on top: more threads than cores,
and the spinning ones take the cores the event loop needs. ``[inference] cpu_threads`` limits
every pool at daemon start.

NumPy is imported long before the daemon reads its file, so the ``OPENBLAS_NUM_THREADS``-style
variables are read too early to help; the pools are limited at runtime through ``threadpoolctl``,
which finds the libraries loaded in this process. The limit is process-wide state, so this module
holds it for whoever asked (a daemon, or several in one test process): the first
:func:`limit_cpu_threads` remembers the pools' own sizes, and when the last holder calls
:func:`restore_cpu_threads` they are put back. Libraries loaded after the call are not limited.
For an OpenMP runtime the limit is what new parallel regions of the calling thread use (OpenMP
keeps that per thread), and so is it for an OpenBLAS built on OpenMP: there the engine's worker
threads keep the default (the daemon logs the pools as read back). OpenBLAS's pthreads build
(NumPy's wheels) and MKL's settings are global. Limiting outside a ``with`` block makes the
calling thread OpenBLAS's controlling thread for threadpoolctl, so later threadpoolctl calls
from other threads of the process do nothing; the daemon limits once, from its loop thread.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from meshinfer.errors import ConfigError

log = logging.getLogger(__name__)

_lock = threading.Lock()
_originals: dict[str, int] = {}  # library file -> its pool size before the first limit
_holders = 0  # limit_cpu_threads(n > 0) calls not yet undone by restore_cpu_threads()


def limit_cpu_threads(n: int) -> dict[str, int]:
    """Limit each math-library pool of this process to ``n`` threads (0: leave them as they are).

    Returns ``{pool: threads}`` as read back afterwards, one entry per library loaded in this
    process, named by its kind (``"openblas"``, ``"mkl"``, ``"openmp"``; the library's file name
    is added when two are of one kind). Without ``threadpoolctl`` it logs a warning, changes
    nothing and returns ``{}``. Each call with ``n > 0`` that returns is undone by one
    :func:`restore_cpu_threads`; one that raises (a library refused ``n``) holds nothing (held by
    nobody else, the pools are put back).
    """
    global _holders
    if n < 0:
        raise ConfigError(f"cpu threads must be >= 0, got {n}")
    controller = _controller()
    if controller is None:
        return {}
    if n:
        with _lock:
            for lib in controller.lib_controllers:
                _originals.setdefault(lib.filepath, lib.num_threads)
            _holders += 1
            limited = False
            try:
                controller.limit(limits=n)
                limited = True
            finally:
                if not limited:  # (a library refused n): no hold is left for nobody to undo,
                    _release()  # and pools changed before the refusal are put back
    return cpu_thread_pools(controller)


def restore_cpu_threads() -> None:
    """Undo one :func:`limit_cpu_threads` with ``n > 0``; the last one puts every pool back to
    the size it had before the first. Extra calls do nothing."""
    with _lock:
        _release()


def _release() -> None:
    """Drop one hold (under ``_lock``); the last one puts the pools back."""
    global _holders
    if _holders == 0:
        return
    _holders -= 1
    if _holders or not _originals:
        return
    controller = _controller()
    if controller is not None:  # each library by its file (limit() matches those from 3.8)
        for lib in controller.lib_controllers:
            if lib.filepath in _originals:
                lib.set_num_threads(_originals[lib.filepath])
    _originals.clear()


def cpu_thread_pools(controller: Any = None) -> dict[str, int]:
    """``{pool: threads}`` of the math libraries loaded now (``{}`` without threadpoolctl)."""
    controller = controller or _controller()
    if controller is None:
        return {}
    pools: dict[str, int] = {}
    libs = controller.lib_controllers
    kinds = [lib.internal_api for lib in libs]
    for lib in libs:
        name = lib.internal_api
        if kinds.count(name) > 1:
            name = f"{name}:{Path(lib.filepath).name}"
        pools[name] = lib.num_threads
    return pools


_warned = False


def _controller() -> Any:
    """A fresh ThreadpoolController (it lists the libraries loaded now), or None, warned once."""
    global _warned
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        if not _warned:
            _warned = True
            log.warning("threadpoolctl is not installed: math-library threads left as they are")
        return None
    return ThreadpoolController()
