"""The journal's writer: one thread that runs journal calls in order, as group commits.

:class:`JournalWriter` feeds :meth:`coordinator.journal.Journal.commit_group` from the event
loop: every call queued while the previous group committed goes into the next group (one
``COMMIT``), and the callers hear back only once that group's log is synced, which a second
thread does while the next group runs (one sync for every group committed meanwhile). A call is a
function, or the name of a method of the journal (looked up on the writer's thread when it
runs, on the journal open at that moment).

A told call (:meth:`JournalWriter.tell`) has nobody to hear of its failure, so the writer logs
it -- except a failure its owner's ``stale`` predicate calls the expected end of a race, not a
fault (for the coordinator: :func:`coordinator.journal.item_ended`, a step of an item that
ended before the call ran); those it counts (``stale_tells``) and logs at debug level only.

A failed sync is its owner's to act on: the journal's log may have lost commits already
answered as taken, and a sticky journal (:meth:`coordinator.journal.Journal.sync`) fails every
later sync. The first failure is handed to ``on_sync_failed``, once, on the loop (the
coordinator stops: see :attr:`coordinator.service.Coordinator.failure`), before the callers of
the groups it failed hear of it; later sync failures, and told calls failed by a sync, are
logged as warnings only (the first one was the news).

What the writer needs of a journal beyond the calls themselves is two optional parts, each a
protocol: :class:`GroupCommits` (``commit_group``: without it the calls of a group run one by
one, each committing on its own) and :class:`Syncs` (``sync``: with it the writer's second
thread syncs what a group committed, beside the next group; without it a ``commit_group``
keeps its own sync, and a stand-in's calls are answered as they return).
:class:`~coordinator.journal.Journal` has both; a stand-in for tests or benchmarks (the
bench's ``NullJournal``) may have neither.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import NoReturn, Protocol, runtime_checkable

from coordinator.journal_types import CallOutcome
from meshinfer.errors import ConfigError, LocalProtocolError, MeshInferError

__all__ = ["GroupCommits", "JournalWriter", "Syncs"]

log = logging.getLogger(__name__)

#: A journal call: a function, or the name of a method of the journal.
JournalCall = Callable[..., object] | str


@runtime_checkable
class GroupCommits(Protocol):
    """A journal that runs several calls as one transaction (optional: see the module
    docstring); :meth:`coordinator.journal.Journal.commit_group` says what it must do."""

    def commit_group(
        self,
        calls: Sequence[Callable[[], object]],
        *,
        before_commit: Callable[[list[CallOutcome]], None] | None = None,
        sync: bool = True,
    ) -> list[CallOutcome]:
        """Run ``calls`` in one transaction; with ``sync=False``, return before the sync."""
        ...


@runtime_checkable
class Syncs(Protocol):
    """A journal whose commits are durable only once :meth:`sync` returned (optional: see the
    module docstring); thread-safe, it runs beside the next group's calls."""

    def sync(self) -> None:
        """Make every commit so far durable (raise ``OSError`` if that failed)."""
        ...


@dataclass(slots=True)
class _Call:
    fn: JournalCall
    args: tuple[object, ...]
    kwargs: dict[str, object] = field(default_factory=dict)
    future: asyncio.Future[object] | None = None  # None: nobody waits (a failure is logged)
    alone: bool = False
    decided: Callable[[CallOutcome], None] | None = None  # see JournalWriter.call; once

    def bound(self, journal: object) -> Callable[[], object]:
        """The call, ready to run on ``journal`` (a name is looked up there; one it lacks
        makes a call that raises ``AttributeError``: that call fails, not its group)."""
        fn = self.fn
        if isinstance(fn, str):
            try:
                fn = getattr(journal, fn)
            except AttributeError:
                return partial(_missing, journal, fn)
        return partial(fn, *self.args, **self.kwargs)


class JournalWriter:
    """The one thread that runs journal calls, in the order they were queued, as group commits.

    It takes every call queued at that moment (up to ``max_group``) and hands them to the
    journal's :meth:`~coordinator.journal.Journal.commit_group` as one transaction. A second
    thread then syncs the journal's log (:meth:`~coordinator.journal.Journal.sync`) while the
    writer runs the next group -- one sync covers every group committed meanwhile -- and only
    then resolves the callers' futures, all of a group in one wake-up of the event loop. So an
    answer still means "durable", and the sync no longer stalls the statements behind it.
    ``journal`` returns the journal to commit on (read at each group; None before it is open):
    any object whose methods the calls name, and that is :class:`GroupCommits` and
    :class:`Syncs` or not (see the module docstring): one without ``commit_group`` gets its
    calls one by one, in order. A queued call always runs; a caller cancelled meanwhile gets
    no answer.

    :meth:`call`, :meth:`tell`, :meth:`run`, :meth:`run_alone` and :meth:`aclose` run on the
    event loop (the first call binds the writer to that loop and starts the thread); the calls
    run on the writer's thread. The hand-over is a lock-free :class:`queue.SimpleQueue`:
    queuing a call never waits for the writer's thread.
    """

    def __init__(
        self,
        journal: Callable[[], object],
        *,
        max_group: int = 256,
        tell_delay_s: float = 0.005,
        name: str = "journal",
        stale: Callable[[BaseException], bool] = lambda error: False,
        on_sync_failed: Callable[[OSError], None] | None = None,
    ) -> None:
        if max_group < 1:
            raise ConfigError("max_group must be >= 1")
        if not 0 <= tell_delay_s <= 1:
            raise ConfigError(f"tell_delay_s must be within 0..1, not {tell_delay_s}")
        self.max_group = max_group
        self.tell_delay_s = tell_delay_s
        self.name = name
        self._stale = stale  # which told-call failures are the expected end of a race
        self._on_sync_failed = on_sync_failed  # see the module docstring
        #: the first sync failure (set on the sync thread; later ones are logged as warnings)
        self.sync_failure: OSError | None = None
        self._journal = journal
        #: (journal, commits groups, syncs) of the last journal looked at (:meth:`_abilities`)
        self._known: tuple[object, bool, bool] | None = None
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()  # None: stop
        self._next: _Call | None = None  # taken from the queue, opens the next group (thread)
        #: calls taken from the queue and not yet handed to the sync thread (writer's thread):
        #: the ones to fail should the thread die (never a group already handed over)
        self._taken: list[_Call] = []
        self._stopping = False  # the thread took the stop mark from the queue
        #: Groups committed by the writer's thread, to sync and answer (None: stop).
        self._committed: queue.Queue[tuple[list[_Call], list[CallOutcome], object] | None]
        self._committed = queue.Queue()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Future[None] | None = None
        self.groups = 0  # groups run, for tests and metrics
        self.calls = 0
        self.stale_tells = 0  # told calls that failed as ``stale`` expects (module doc)

    def call(
        self,
        fn: JournalCall,
        *args: object,
        on_decided: Callable[[CallOutcome], None] | None = None,
        **kwargs: object,
    ) -> asyncio.Future[object]:
        """Queue ``fn(*args, **kwargs)`` now (in order with every other call); a future of its
        outcome once committed (failed with :class:`LocalProtocolError` once the writer is
        closed). ``fn`` may name a method of the journal.

        ``on_decided`` is called on the loop with the call's outcome as soon as its group ran,
        while the ``COMMIT`` still syncs (or with the final outcome if the group never got
        that far): act on what the call decided while it becomes durable, and undo that if
        the future then fails. It is called exactly once, before the future resolves.
        """
        return self._queue_call(_Call(fn, args, kwargs, decided=on_decided))

    def tell(self, fn: JournalCall, *args: object, **kwargs: object) -> None:
        """Queue ``fn(*args, **kwargs)`` now, in order, for nobody to wait for (a dispatch
        or a running mark): no future, one loop wake-up less; a failure is logged, unless
        ``stale`` says it is expected (counted in ``stale_tells``; see the module
        docstring)."""
        if self._closing:
            log.warning("journal writer closed: %s not journaled", getattr(fn, "__name__", fn))
            return
        self._loop or self._start()
        self._queue.put(_Call(fn, args, kwargs))

    async def run(self, fn: JournalCall, *args: object, **kwargs: object) -> object:
        """Queue ``fn(*args, **kwargs)`` and await its outcome (after its group committed)."""
        return await self._queue_call(_Call(fn, args, kwargs))

    async def run_alone(self, fn: JournalCall, *args: object, **kwargs: object) -> object:
        """Run ``fn(*args, **kwargs)`` outside any group (after the calls queued before it
        committed): opening or closing the journal."""
        return await self._queue_call(_Call(fn, args, kwargs, alone=True))

    def _queue_call(self, call: _Call) -> asyncio.Future[object]:
        if self._closing:
            future = asyncio.get_running_loop().create_future()
            error = LocalProtocolError("the journal writer is closed")
            future.set_exception(error)
            future.exception()  # a caller that drops it is told nothing new: logged here once
            log.warning("journal writer closed: %s refused", getattr(call.fn, "__name__", call.fn))
            if call.decided is not None:
                call.decided(CallOutcome(error=error))
            return future
        call.future = future = (self._loop or self._start()).create_future()
        self._queue.put(call)
        return future

    def _start(self) -> asyncio.AbstractEventLoop:
        self._loop = loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        threading.Thread(target=self._serve, name=self.name, daemon=True).start()
        return loop

    async def aclose(self) -> None:
        """Run what is queued, then stop the thread; later calls are refused. Idempotent."""
        if not self._closing:
            self._closing = True
            self._queue.put(None)
        if self._stopped is not None:
            await asyncio.shield(self._stopped)

    # --- on the writer's thread -----------------------------------------------------------

    def _serve(self) -> None:
        died: BaseException | None = None
        syncer = threading.Thread(target=self._sync_and_settle, name=f"{self.name}-sync")
        syncer.start()
        try:
            while group := self._next_group():
                if group[0].alone:  # e.g. closing the journal: after the syncs before it
                    self._committed.join()
                journal = self._journal()
                outcomes = self._execute(group, journal)
                self.groups += 1
                self.calls += len(group)
                self._committed.put((group, outcomes, journal))
                self._taken = []  # the sync thread answers them from here on
        except BaseException as exc:  # a bug here: fail what waits rather than hang it
            log.critical("the journal writer died", exc_info=exc)
            self._closing = True
            died = exc
        finally:
            self._committed.put(None)
            syncer.join()  # every committed group is answered before what follows
            if died is not None:
                self._hand_back(self._settle_all, self._taken, died)
            self._hand_back(_resolve, self._stopped)

    def _sync_and_settle(self) -> None:
        """The sync thread: sync what the writer committed (one sync for every group committed
        meanwhile), then answer those groups' callers, in order. Meanwhile the writer runs the
        next group: its statements overlap this sync."""
        stop = False
        while not stop:
            batch = [self._committed.get()]
            while not self._committed.empty():
                batch.append(self._committed.get_nowait())
            groups = [item for item in batch if item is not None]
            stop = len(groups) < len(batch)
            try:
                self._sync_groups(groups)
            except BaseException as exc:  # a bug here: fail those callers rather than hang them
                log.critical("the journal's sync thread failed", exc_info=exc)
                for group, _, _ in groups:
                    self._hand_back(self._settle, group, [CallOutcome(error=exc)] * len(group))
            finally:
                for _ in batch:
                    self._committed.task_done()

    def _sync_groups(self, groups: list[tuple[list[_Call], list[CallOutcome], object]]) -> None:
        """Sync the journal(s) of ``groups`` once, then hand their outcomes to the loop (each
        one failed with the sync's error if it failed: committed, not known to be durable)."""
        failed = None
        for journal in {id(j): j for _, _, j in groups}.values():  # one, but for tests
            failed = failed or self._sync(journal)
        for group, outcomes, _ in groups:
            if failed is not None:
                outcomes = [CallOutcome(error=failed)] * len(group)
            self._hand_back(self._settle, group, outcomes)

    def _sync(self, journal: object) -> BaseException | None:
        if not self._abilities(journal)[1]:
            return None
        try:
            journal.sync()  # type: ignore[attr-defined]
        except OSError as exc:
            if self.sync_failure is not None:  # told already (a sticky journal fails again)
                log.warning("the journal's log is not synced: %s", exc)
                return exc
            self.sync_failure = exc
            if self._on_sync_failed is None:
                log.critical("the journal could not sync its log: %s", exc)
            else:  # its owner says what it means (once), before any caller hears of it
                self._hand_back(self._on_sync_failed, exc)
            return exc
        except BaseException as exc:
            log.critical("the journal could not sync its log: %s", exc)
            return exc
        return None

    def _settle_all(self, group: list[_Call], error: BaseException) -> None:
        """On the loop, after the thread died: fail the calls it had taken and not handed to
        the sync thread (``group``), and every call queued."""
        pending = [*group, self._next]
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        calls = [call for call in pending if call is not None]
        self._settle(calls, [CallOutcome(error=error)] * len(calls))

    def _next_group(self) -> list[_Call]:
        """Every call queued now, up to ``max_group`` (waits for the first); an alone call
        makes a group by itself. Empty once the writer is closed and drained.

        A group of told calls only (nobody waits for their commit) waits up to
        ``tell_delay_s`` for a call to join it: a dispatch or running mark then shares the
        next call's sync (one sync instead of two when the load is low). Told calls may be
        lost in a crash anyway; the journal's recovery is built for that (see
        :meth:`Journal.mark_dispatched`).
        """
        first, self._next = self._next, None
        if first is None and not self._stopping:
            first = self._queue.get()
        if first is None:
            self._stopping = True
            return []
        self._taken = group = [first]  # failed with the queue should this raise (a bug)
        told_only = first.future is None
        deadline = time.monotonic() + self.tell_delay_s
        while not first.alone and len(group) < self.max_group:
            try:
                if told_only and (wait := deadline - time.monotonic()) > 0:
                    call = self._queue.get(timeout=wait)
                else:
                    call = self._queue.get_nowait()
            except queue.Empty:
                break
            if call is None or call.alone:  # ends this group; opens the next one or stops
                self._next, self._stopping = call, call is None
                break
            group.append(call)
            told_only = told_only and call.future is None
        return group

    def _abilities(self, journal: object) -> tuple[bool, bool]:
        """Whether ``journal`` commits groups and syncs, judged once per journal object (a
        protocol ``isinstance`` costs ~5 us: per group, that is on the single task's path)."""
        known = self._known
        if known is None or known[0] is not journal:
            commits, syncs = isinstance(journal, GroupCommits), isinstance(journal, Syncs)
            self._known = known = (journal, commits, syncs)
        return known[1], known[2]

    def _execute(self, group: list[_Call], journal: object) -> list[CallOutcome]:
        commits, syncs = self._abilities(journal)
        if group[0].alone or not commits:
            return [_outcome_of(call.bound(journal)) for call in group]
        kw = {}
        if any(call.decided is not None for call in group):
            kw["before_commit"] = partial(self._hand_back, self._settle_decided, group)
        if syncs:
            kw["sync"] = False  # the sync thread syncs it, while the next group runs
        try:
            commit_group = journal.commit_group  # type: ignore[attr-defined]
            return commit_group([call.bound(journal) for call in group], **kw)
        except BaseException as exc:  # rolled back: nothing in the group is durable
            return [CallOutcome(error=exc)] * len(group)

    def _hand_back(self, callback: Callable[..., None], *args: object) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    @staticmethod
    def _settle_decided(group: list[_Call], outcomes: list[CallOutcome]) -> None:
        """On the loop: tell the callers that asked what their calls decided (not durable)."""
        for call, outcome in zip(group, outcomes, strict=True):
            decided, call.decided = call.decided, None
            if decided is not None:
                try:
                    decided(outcome)
                except Exception:  # a bug in the callback: the call itself goes on
                    log.exception("on_decided callback of %s failed", call.fn)

    def _settle(self, group: list[_Call], outcomes: list[CallOutcome]) -> None:
        """On the loop: answer every caller of a committed (or failed) group."""
        self._settle_decided(group, outcomes)  # those whose group never reached its COMMIT
        for call, outcome in zip(group, outcomes, strict=True):
            future, error = call.future, outcome.error
            if future is None:
                self._told_failed(call, error)
            elif future.done():  # the caller was cancelled
                continue
            elif isinstance(error, StopIteration):  # a future refuses those, as a coroutine does
                future.set_exception(RuntimeError(f"journal call raised {error!r}"))
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(outcome.value)

    def _told_failed(self, call: _Call, error: BaseException | None) -> None:
        """Log the failure (if any) of a told call: nobody else hears of it. One ``stale``
        expects is counted and logged at debug level (see the module docstring)."""
        if error is None:
            return
        if self._stale(error):
            self.stale_tells += 1
            log.debug("journal call %s skipped: %s", call.fn, error)
            return
        if self.sync_failure is not None and isinstance(error, OSError):  # reported once
            log.warning("journal call %s not known durable: %s", call.fn, error)
            return
        level = logging.WARNING if isinstance(error, MeshInferError) else logging.ERROR
        log.log(level, "journal call %s failed: %s", call.fn, error, exc_info=error)


def _missing(journal: object, name: str) -> NoReturn:
    raise AttributeError(f"the journal ({type(journal).__name__}) has no call {name!r}")


def _outcome_of(fn: Callable[[], object]) -> CallOutcome:
    try:
        return CallOutcome(fn())
    except BaseException as exc:  # handed to the caller, whatever it is
        return CallOutcome(error=exc)


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)
