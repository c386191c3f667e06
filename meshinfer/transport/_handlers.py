"""The tasks a listener runs its stream handlers in (shared by the TCP and in-memory transports).

Ownership rules, the same for every listener in this package:

* each accepted stream gets one task, owned by the listener and tracked in a set until it ends;
* a handler that raises has the exception logged and its stream closed; the listener goes on;
* a handler that returns normally keeps ownership of its stream: the listener does not close
  it, so a handler may hand the stream to another task (the session layer closes its sessions);
* ``Listener.aclose()`` leaves running handlers alone; ``aclose(cancel_handlers=True)`` cancels
  them, closes their streams and waits for them to finish (all but the calling handler's own).
"""

from __future__ import annotations

import asyncio
import logging

from meshinfer.transport.base import Stream, StreamHandler

log = logging.getLogger("meshinfer.transport")


class HandlerTasks:
    """The set of handler tasks one listener owns. Methods run on the loop."""

    def __init__(self, handler: StreamHandler, name: str) -> None:
        self._handler = handler
        self._name = name
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, stream: Stream) -> None:
        """Start ``handler(stream)`` in a new task owned by this set."""
        task = asyncio.get_running_loop().create_task(
            self._run(stream), name=f"{self._name} handler for {stream.remote_address}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, stream: Stream) -> None:
        try:
            await self._handler(stream)
        except asyncio.CancelledError:
            await stream.aclose()
            raise
        except Exception:
            log.exception("%s: handler for %s failed", self._name, stream.remote_address)
            await stream.aclose()

    async def cancel_all(self) -> None:
        """Cancel every running handler (closing its stream) and wait until all have ended.
        Called from a handler, this leaves that handler alone (it would cancel itself half-way
        and wait for none of the others)."""
        tasks = [task for task in self._tasks if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
