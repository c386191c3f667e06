"""Encrypted, authenticated sessions: Noise handshake + fleet admission + typed messages.

Theory of operation
-------------------
A session runs over any :class:`~meshinfer.transport.base.Stream`. It has three phases:

``handshake``
    The dialler picks the pattern: ``XX`` by default, ``IK`` when it already knows the peer's
    static key (from discovery). The first record carries one byte naming the pattern, so the
    listener can answer either. Each side's :class:`~meshinfer.proto.messages.Hello` rides in an
    encrypted handshake payload: protocol version, node id and the certificate that the fleet
    authority signed. A session exists only when :func:`~meshinfer.proto.identity.admit` accepts
    the peer's certificate for the very static key the handshake proved. The Noise prologue binds
    protocol version and fleet id, so a node of another fleet fails the handshake cryptographically.
    The whole handshake runs under ``handshake_timeout``. A refused peer learns why only
    where the handshake completes (XX: the listener's ``Close``, ``ADMISSION_REFUSED``, goes
    encrypted once the dialler's Hello is in), with one exception: a peer refused because its
    certificate is revoked, whose Hello announces ``revocation-notice``, is answered (IK too,
    the handshake completed for it) with a ``RevocationNotice`` naming the entry that revokes
    it, before that ``Close``: its peers cut it off, so it would otherwise never learn.

``open``
    Messages are msgpack-encoded, split into chunks that fit one Noise message, encrypted and
    written behind a 2-byte length (:mod:`~meshinfer.proto.framing`). When both Hellos list the
    ``packed`` feature, the small messages of one :meth:`Session.send_many` share chunks (one
    Noise message for a burst of them). One reader task per session decrypts, reassembles and
    decodes; session control (``Ping``/``Pong``/``Close``) is handled here, everything else is
    queued for :meth:`Session.recv` (nothing behind a ``Close`` is). When the application does
    not consume, the queue fills (``recv_queue`` messages or ``recv_queue_bytes`` bytes of them),
    the reader stops reading, and TCP pushes back on the peer. A send cancelled while its write
    waits ends the session, as lost (see :meth:`Session._write_records`).
    Both directions rekey after ``rekey_after`` Noise messages; both sides count the same
    records, so no signal is needed. Each side announces its ``rekey_after`` in its Hello
    (the ``rekey-after=N`` feature) and both use the smaller of the two values (one of a peer
    that announces none is taken as ours): nodes configured differently stay in step. Once
    the revocation list in force (the admission's, read at each write) revokes the peer's
    certificate, the session writes no more application messages
    (:attr:`Session.peer_revoked`; it is about to be cut): a send that was waiting for the
    writer then raises StreamClosed. Session control (``Ping``, ``Pong``, ``Close``) still
    goes: it carries no work, and the close and the checks of older sessions need it; so does
    a message :meth:`Session.aclose` sends just before the ``Close`` (a
    :class:`~meshinfer.proto.revocation_wire.RevocationNotice` telling the peer why it is cut).

``closed``
    Reached by :meth:`Session.aclose` (sends ``Close`` first), by the peer's ``Close``, by EOF,
    by an idle timeout, by a protocol error from the peer, by a failure of the session's own
    reader or keep-alive task or of an encryption (a nonce spent: logged once, ended as lost,
    a send raising StreamClosed), or once the peer's certificate has
    expired beyond ``clock_skew`` (judged by the admission's wall clock, as the handshake judged
    it; the keep-alive task wakes for it, so no message reads a clock): the session is then
    closed as lost, with a ``Close`` frame (``CERTIFICATE_EXPIRED``) naming the expiry, and its
    receiver ends it as lost too (what it sent meanwhile went unread; an older peer, which
    does not know the code, ends it as closed with ``PROTOCOL_ERROR``). Pending
    and later ``recv`` calls raise :class:`~meshinfer.errors.StreamClosed` carrying the reason;
    ``aclose`` is idempotent.

Everything time-related uses the running loop's clock (``loop.time()``), so a virtual-time loop
can drive sessions unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from meshinfer import PROTOCOL_VERSION
from meshinfer.errors import (
    AdmissionError,
    HandshakeError,
    LocalProtocolError,
    MeshInferError,
    RemoteProtocolError,
    SessionTimeout,
    StreamClosed,
    TransportError,
)
from meshinfer.proto import framing, messages
from meshinfer.proto.identity import (
    DEFAULT_CLOCK_SKEW_S,
    NodeCertificate,
    NodeIdentity,
    RevocationList,
    admit,
    check_clock_skew,
    prologue,
    utc_text,
)
from meshinfer.proto.messages import Close, CloseCode, Hello, Ping, Pong
from meshinfer.proto.noise import CipherState, HandshakeState
from meshinfer.proto.revocation_wire import NOTICE_FEATURE, RevocationNotice
from meshinfer.transport.base import Stream

log = logging.getLogger(__name__)

#: Most bytes of encoded messages :meth:`Session.send_many` puts in one write (beyond its first
#: message): bounds the copy a burst of large messages makes.
SEND_MANY_BYTES = 1 << 20

#: Most messages the reader handles in one turn of the loop before it lets other tasks run: a
#: read of 256 KiB may hold ~50,000 packed pings, each answered with a write.
DISPATCH_BATCH = 256

#: First byte of the first handshake record: which Noise pattern the dialler chose.
_PATTERN_XX = 0x01
_PATTERN_IK = 0x02
#: Largest handshake record accepted (a Hello, its certificate included, with Noise's keys
#: and tags: about 4.5 KiB for a 4 KiB certificate).
_MAX_HANDSHAKE_RECORD = 8192
#: The Hello feature: several small messages may share one Noise message (framing.FLAG_PACKED).
PACKED_FEATURE = "packed"
#: The Hello feature announcing the sender's ``rekey_after`` (``rekey-after=N``).
REKEY_FEATURE = "rekey-after="
#: The largest ``rekey_after``: a Noise nonce is 64 bits, and a Hello feature is at most 64
#: characters (a 60-digit value made our own Hello invalid: every handshake failed).
MAX_REKEY_AFTER = (1 << 63) - 1


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """Timers and limits of one session. Defaults suit a LAN; radio links want longer timers.

    Attributes:
        xx_protocol: Noise protocol name used when the peer's static key is unknown.
        ik_protocol: Noise protocol name used when discovery already gave the peer's static key.
        handshake_timeout: seconds for the whole handshake; a slow or silent client is cut off.
        idle_timeout: close the session when nothing at all arrived for this long.
        keepalive_interval: send a ``Ping`` when nothing was sent for this long; must be well
            below the peer's ``idle_timeout``.
        rekey_after: rekey each direction after this many Noise messages (the smaller of
            this and the peer's announced value, so both sides rekey at the same record).
        max_message_size: largest reassembled application message accepted (bytes).
        recv_queue: messages buffered for :meth:`Session.recv` before the reader stops reading.
        recv_queue_bytes: encoded bytes of messages buffered for :meth:`Session.recv` before
            the reader stops reading (whichever of the two limits comes first; one message
            always goes in, so at most this plus ``max_message_size`` are held): a peer cannot
            park ``recv_queue`` times ``max_message_size`` bytes (16 GiB) in our memory.
        clock_skew: seconds of tolerance on certificate validity windows (default
            :data:`~meshinfer.proto.identity.DEFAULT_CLOCK_SKEW_S`): at the handshake, and for
            as long as the session lasts (it ends once the peer's certificate expired by more).
        pack: announce the ``packed`` feature (several small messages per Noise message; used
            towards a peer that announces it too, and understood from any peer either way).
        verify_timeout: when a peer opens another session while older ones with it are open
            (it re-dialled after roaming, or both sides dialled at once), each older one must
            answer a ping (or receive anything) within this many seconds or it is abandoned
            as lost (see :class:`~meshinfer.runtime.peers.PeerTable`); 0 keeps them unchecked.
    """

    xx_protocol: str = "Noise_XX_25519_ChaChaPoly_BLAKE2b"
    ik_protocol: str = "Noise_IK_25519_ChaChaPoly_BLAKE2b"
    handshake_timeout: float = 5.0
    idle_timeout: float = 60.0
    keepalive_interval: float = 15.0
    rekey_after: int = 1 << 20
    max_message_size: int = 16 * 1024 * 1024
    recv_queue: int = 1024
    recv_queue_bytes: int = 64 * 1024 * 1024
    clock_skew: float = DEFAULT_CLOCK_SKEW_S
    pack: bool = True
    verify_timeout: float = 1.0

    def __post_init__(self) -> None:
        if self.keepalive_interval >= self.idle_timeout:
            raise ValueError("keepalive_interval must be below idle_timeout")
        if self.verify_timeout < 0:
            raise ValueError("verify_timeout must not be negative")
        check_clock_skew(self.clock_skew)
        limits = (self.rekey_after, self.recv_queue, self.recv_queue_bytes, self.max_message_size)
        if min(limits) < 1:
            raise ValueError(
                "rekey_after, recv_queue, recv_queue_bytes and max_message_size must be positive"
            )
        if self.rekey_after > MAX_REKEY_AFTER:
            raise ValueError(f"rekey_after must be at most {MAX_REKEY_AFTER} (2**63 - 1)")


@dataclass
class SessionMetrics:
    """Counters shared by the sessions of one node; exported as Prometheus metrics later."""

    handshakes_ok: int = 0
    handshake_failures: Counter[str] = field(default_factory=Counter)
    protocol_errors: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    #: Noise messages (records) after the handshake; fewer than messages when sessions pack
    records_sent: int = 0
    records_received: int = 0

    def refuse(self, reason: str) -> None:
        self.handshake_failures[reason] += 1


@dataclass
class Admission:
    """What a node checks peers against: its fleet trust anchor and the current revocations.

    ``revocations`` is replaced as gossip merges newer lists; sessions read it at handshake time,
    and before each write of application messages (:attr:`Session.peer_revoked`).
    ``wallclock`` is the only wall-clock read here: certificate validity is wall-clock time (read
    at the handshake, and by each session's keep-alive task, which ends the session once the
    peer's certificate has expired: :meth:`Session.certificate_left`).
    """

    identity: NodeIdentity
    revocations: RevocationList
    wallclock: Callable[[], float] = time.time

    def check(self, cert_bytes: bytes, proven_static: bytes, skew: float) -> NodeCertificate:
        now = self.wallclock()
        return admit(
            cert_bytes,
            proven_static=proven_static,
            trust=self.identity.trust,
            revocations=self.revocations,
            now=now,
            clock_skew=skew,
        )


class Session:
    """An open, authenticated, encrypted session with one peer. Use :func:`connect`/:func:`accept`.

    ``send`` and ``recv`` are coroutines that must run on the session's loop. Any number of tasks
    may ``send`` concurrently (writes are serialised); one task at a time should ``recv``.
    """

    def __init__(
        self,
        stream: Stream,
        send_cs: CipherState,
        recv_cs: CipherState,
        peer: NodeCertificate,
        config: SessionConfig,
        metrics: SessionMetrics,
        *,
        admission: Admission,
        initiator: bool,
        handshake_hash: bytes,
        leftover: list[bytes],
        pack: bool = False,
        decoder: framing.RecordDecoder | None = None,
        peer_max_message_size: int | None = None,
        rekey_after: int | None = None,
        peer_features: frozenset[str] = frozenset(),
    ) -> None:
        self.stream = stream
        self.peer = peer
        #: the features the peer's Hello announced (what it understands: e.g. ``packed``)
        self.peer_features = peer_features
        #: the largest message this session sends: the smaller of our cap and the one the
        #: peer's Hello announced (its reader ends the session on a larger one, as a protocol
        #: error, and what went with it would be lost unannounced)
        self.send_cap = min(config.max_message_size, peer_max_message_size or (1 << 62))
        #: records per key in each direction: the smaller of ours and the peer's announced one
        self.rekey_after = rekey_after or config.rekey_after
        self._admission = admission
        self._judged_by: RevocationList | None = None  # the list peer_revoked last read
        self._revoked = False
        #: small messages of one send_many share a Noise message (both sides announced it)
        self.pack = pack
        self.config = config
        self.metrics = metrics
        self.initiator = initiator
        self.handshake_hash = handshake_hash
        self._send_cs = send_cs
        self._recv_cs = recv_cs
        self._sent_records = 0
        self._recv_records = 0
        self._write_lock = asyncio.Lock()
        # Unbounded queue plus a high-water mark: the reader pauses at ``recv_queue`` messages
        # or ``recv_queue_bytes`` bytes of them (so TCP pushes back on the peer), while the
        # close sentinel can always be queued. Each message goes in with its encoded size.
        self._inbox: asyncio.Queue[tuple[messages.Message, int] | None] = asyncio.Queue()
        self._inbox_bytes = 0
        self._arriving = 0  # encoded size of the message being dispatched
        self._room = asyncio.Event()
        self._room.set()
        # the handshake's: it may hold the start of a record that came with the last one
        self._decoder = decoder or framing.RecordDecoder()
        self._reassembler = framing.Reassembler(config.max_message_size)
        self._pings: dict[int, asyncio.Future[float]] = {}
        self._ping_seq = 0
        self._handled = 0  # messages dispatched since the reader last yielded the loop
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._last_rx = self._last_tx = loop.time()
        self.close_code: CloseCode | None = None
        self.close_reason = ""
        #: True when the session ended without a Close from either side: the connection hit EOF
        #: or an error (e.g. the peer's process was killed and its kernel reset the socket), or
        #: this side gave up on a peer that stopped answering (:meth:`abandon`, or nothing came
        #: for ``idle_timeout``: then a Close frame is still sent, best effort), or the peer
        #: closed it for its own idle timeout, or this side cut it because the peer's certificate
        #: expired (what the peer had sent meanwhile is dropped unread; its owners' recovery,
        #: e.g. the coordinator's re-dial, finds the node refused and re-dispatches its items),
        #: or the peer cut it because this side's certificate expired (``CERTIFICATE_EXPIRED``).
        self.lost = False
        self._closing = False  # aclose() under way
        self._closed = asyncio.Event()
        self._leftover = leftover
        self._reader = loop.create_task(self._read_loop(), name=f"session-read-{peer.node_id}")
        self._pinger: asyncio.Task[None] | None = None  # the last keep-alive ping's write
        self._keeper = loop.create_task(self._keepalive_loop(), name=f"session-ka-{peer.node_id}")

    # --- public API ------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self.peer.node_id

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    @property
    def peer_revoked(self) -> bool:
        """Whether the revocation list in force (the admission's, read now) revokes the peer's
        certificate: the session is being cut, and writes no application message (nor does a
        peer table hand on what it receives). Cheap enough for every message: lists are
        immutable and replaced whole, so the answer is kept until the admission holds another."""
        listed = self._admission.revocations
        if listed is not self._judged_by:
            self._judged_by = listed
            self._revoked = bool(listed.entries) and listed.is_revoked(self.peer)
        return self._revoked

    async def send(self, msg: messages.Message) -> None:
        """Encrypt and send one message. Raises StreamClosed once the session is closed."""
        await self.send_many((msg,))

    async def send_many(
        self, msgs: Sequence[messages.Message], max_bytes: int = SEND_MANY_BYTES
    ) -> int:
        """Encrypt and send messages from the front of ``msgs``, in order, with one write to the
        stream (small ones packed several to a record if the session packs, else each its own
        record(s)); returns how many were sent. It takes as many as fit in ``max_bytes`` of
        encoded messages, and always the first.

        Raises :class:`LocalProtocolError`, having sent nothing, if the first message exceeds
        the session's message cap, :attr:`send_cap` (a later one that does ends the batch before
        it: the next call raises), or if any message of the batch fails to encode (its type's
        own cap; the peer table then finds which, one message per call); StreamClosed once the
        session is closed, or, having sent nothing, once :attr:`peer_revoked` (checked when the
        writer is free, so a send waiting for it while the revocation came in force sends
        nothing). A write the stream fails ends the session (lost) before its error (TransportError,
        OSError) is raised; so does a cancel of the caller while the write waits (the stream
        may hold part of a record).
        """
        encoded: list[bytes] = []
        total = 0
        for msg in msgs:
            data = messages.encode(msg)
            if len(data) > self.send_cap:
                if encoded:
                    break
                raise LocalProtocolError(
                    f"message of {len(data)} bytes exceeds the session cap of {self.send_cap}"
                    f" bytes (ours or the one {self.peer_id} announced, the smaller)"
                )
            if encoded and total + len(data) > max_bytes:
                break
            encoded.append(data)
            total += len(data)
        await self._write_messages(encoded, control=False)
        return len(encoded)

    async def _send_control(self, msg: Ping | Pong) -> None:
        """Send a session control message: it goes to a revoked peer too (see the module
        docstring)."""
        await self._write_messages([messages.encode(msg)], control=True)

    async def _write_messages(self, encoded: list[bytes], *, control: bool) -> None:
        if self._closed.is_set():
            raise StreamClosed(f"session with {self.peer_id} is closed: {self.close_reason}")
        async with self._write_lock:
            if not control and self.peer_revoked:
                raise StreamClosed(
                    f"session with {self.peer_id} carries nothing more: its certificate"
                    f" (serial {self.peer.serial}) is revoked"
                )
            await self._write_records(framing.frame_messages(encoded, pack=self.pack))
        self.metrics.messages_sent += len(encoded)

    async def recv(self) -> messages.Message:
        """Return the next application message; raises StreamClosed once the session ends."""
        item = await self._inbox.get()
        if item is None:
            self._inbox.put_nowait(None)  # keep waking later callers
            raise StreamClosed(f"session with {self.peer_id} closed: {self.close_reason}")
        msg, size = item
        self._inbox_bytes -= size
        if not self._room.is_set() and not self._inbox_full():
            self._room.set()
        return msg

    def _inbox_full(self) -> bool:
        cfg = self.config
        return self._inbox.qsize() >= cfg.recv_queue or self._inbox_bytes >= cfg.recv_queue_bytes

    def __aiter__(self) -> Session:
        return self

    async def __anext__(self) -> messages.Message:
        try:
            return await self.recv()
        except StreamClosed:
            raise StopAsyncIteration from None

    async def ping(self, timeout: float = 5.0) -> float:
        """Measure one round trip (seconds) with a Ping/Pong exchange."""
        self._ping_seq += 1
        nonce = self._ping_seq
        fut: asyncio.Future[float] = self._loop.create_future()
        self._pings[nonce] = fut
        started = self._loop.time()
        try:
            await self._send_control(Ping(nonce=nonce))
            async with asyncio.timeout(timeout):
                return await fut - started
        finally:
            self._pings.pop(nonce, None)
            if fut.done() and not fut.cancelled():
                # a failed write ends the session, which fails the waiter before the write's
                # own error is raised here: the waiter's copy is retrieved, not reported
                fut.exception()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def aclose(
        self,
        code: CloseCode = CloseCode.NORMAL,
        reason: str = "closed",
        *,
        before: messages.Message | None = None,
    ) -> None:
        """Send ``Close`` (best effort), then close the stream. Idempotent. ``before``: a
        message sent just before the ``Close``, in the same write, even to a revoked peer
        (the caller checks that the peer understands it: :attr:`peer_features`); one that
        does not encode is left out (logged), the ``Close`` still goes."""
        self._closing = True
        if not self._closed.is_set():
            chunks = self._last_words(before)
            try:
                with contextlib.suppress(MeshInferError, OSError, TimeoutError):
                    close = messages.encode(Close(code=int(code), reason=reason))
                    async with asyncio.timeout(1.0), self._write_lock:
                        await self._write_records(chunks + framing.split_message(close))
                        self.metrics.messages_sent += 1 + (1 if chunks else 0)
            except asyncio.CancelledError:
                # cancelled while the Close waited for the writer or the stream: the session
                # ends all the same (it used to stay open, its abandon() a no-op), its stream
                # reset (the Close may be cut part-way); its tasks end on their own
                self._mark_closed(code, reason)
                with contextlib.suppress(Exception):
                    self.stream.abort()
                raise
            self._mark_closed(code, reason)
        await self._shutdown()

    def _last_words(self, msg: messages.Message | None) -> list[bytes]:
        """The chunks of ``msg`` (see :meth:`aclose`), none if it is None or cannot go."""
        if msg is None:
            return []
        try:
            data = messages.encode(msg)
        except LocalProtocolError as exc:  # our bug, but the Close must still go
            log.warning("session with %s: message before the close left out: %s", self.peer_id, exc)
            return []
        if len(data) > self.send_cap:
            log.warning("session with %s: message before the close over the cap", self.peer_id)
            return []
        return framing.split_message(data)

    async def abandon(self, reason: str) -> None:
        """End the session as lost, at once and with no ``Close`` frame: for a peer that
        stopped answering. What went over it may never have arrived (``lost`` tells the
        session's watchers so), and a frame written into a dead connection would arrive no
        more surely, nor wait behind a stuck write. The stream is reset where it can be
        (``abort``: TCP, memory): what is still queued on it is dropped, not delivered late
        beside what the watchers send again over another session. Idempotent; a no-op once
        closed or while a deliberate close (:meth:`aclose`) is under way."""
        if self._closing:
            return
        self._mark_lost(reason)
        await self._shutdown(abort=True)

    def certificate_left(self) -> float:
        """Seconds until the peer's certificate expires beyond ``clock_skew``, by the admission's
        wall clock (negative once it has): the session then ends (see the module docstring)."""
        return self.peer.seconds_left(self._admission.wallclock(), self.config.clock_skew)

    @property
    def last_received(self) -> float:
        """The loop time at which bytes last arrived on the session."""
        return self._last_rx

    async def __aenter__(self) -> Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- internals -------------------------------------------------------------------------

    async def _write_records(self, chunks: list[bytes]) -> None:
        """Encrypt ``chunks`` and write them (the caller holds the writer). Once encrypted,
        their nonces are spent: if the caller is cancelled while the stream write waits, how
        much of them went is unknown (none: the peer could decrypt nothing after; part: the
        stream is cut mid-record), so the session ends, as lost, its stream reset (what part
        went is dropped, not followed by more records), unless it is being closed anyway.
        An encryption that fails (the send nonce is exhausted) ends the session too, as lost,
        and raises StreamClosed: the records encrypted before it spent their nonces unsent,
        and no later one would encrypt (a LocalProtocolError would read as "this message
        is bad" to a sender, which would drop each message queued for the peer in turn)."""
        out = bytearray()
        try:
            for chunk in chunks:
                out += framing.encode_record(self._send_cs.encrypt(chunk))
                self._sent_records += 1
                self.metrics.records_sent += 1
                if self._sent_records % self.rekey_after == 0:
                    self._send_cs.rekey()
        except MeshInferError as exc:
            self._mark_lost(f"cannot encrypt: {exc}")
            await self._shutdown(abort=True)
            raise StreamClosed(f"session with {self.peer_id} ended: {exc}") from exc
        try:
            await self.stream.write(bytes(out))
        except asyncio.CancelledError:
            if not self._closing:
                self._mark_lost("a write was cancelled part-way")
                with contextlib.suppress(Exception):
                    self.stream.abort()
            raise
        except (StreamClosed, TransportError, OSError) as exc:
            # the connection is gone: end the session (lost: no Close frame can go) now, its
            # tasks and stream too, not when the reader gets round to it (a sender retrying an
            # "open" session whose writes fail at once never lets it run)
            self._mark_lost(f"transport error: {exc}")
            await self._shutdown()
            raise
        self._last_tx = self._loop.time()

    def _open_record(self, record: bytes) -> list[tuple[messages.Message, int]]:
        """The messages one record completes, each with its encoded size: none (a part of a
        larger one), one, or several (a packed chunk)."""
        plaintext = self._recv_cs.decrypt(record)
        self._recv_records += 1
        self.metrics.records_received += 1
        if self._recv_records % self.rekey_after == 0:
            self._recv_cs.rekey()
        wholes = self._reassembler.feed_all(plaintext)
        return [(messages.decode(whole), len(whole)) for whole in wholes]

    async def _read_loop(self) -> None:
        try:
            await self._handle_records(self._leftover)
            self._leftover = []
            while not self._closed.is_set():
                data = await self.stream.read(262144)
                if not data:
                    self._mark_lost("peer closed the connection")
                    break
                self._last_rx = self._loop.time()
                await self._handle_records(self._decoder.feed(data))
        except RemoteProtocolError as exc:
            self.metrics.protocol_errors += 1
            log.warning("session with %s: protocol error from peer: %s", self.peer_id, exc)
            self._mark_closed(CloseCode.PROTOCOL_ERROR, f"protocol error: {exc}")
        except (TransportError, OSError) as exc:
            self._mark_lost(f"transport error: {exc}")
        except Exception as exc:  # our bug (or a receive nonce spent): end it, with a reason
            self._fail_internally("reader", exc)
        finally:
            self._mark_closed(CloseCode.GOING_AWAY, "reader stopped")
            with contextlib.suppress(Exception):
                await self.stream.aclose()

    async def _handle_records(self, records: list[bytes]) -> None:
        """Open and dispatch ``records``, yielding the loop every ``DISPATCH_BATCH`` messages
        (a peer's flood of small messages must not starve the node's other sessions), counted
        across reads: a read that finds bytes waiting returns without yielding. Nothing after
        the session closed (the peer's ``Close``, or ours) is opened or delivered: it would
        reach :meth:`recv` after a StreamClosed."""
        for record in records:
            if self._closed.is_set():
                return
            for msg, size in self._open_record(record):
                if self._closed.is_set():
                    return
                self._arriving = size
                await self._dispatch(msg)
                self._handled += 1
                if self._handled >= DISPATCH_BATCH:
                    self._handled = 0
                    await asyncio.sleep(0)

    async def _dispatch(self, msg: messages.Message) -> None:
        """Handle session control here; queue anything else (``_arriving``: its size)."""
        self.metrics.messages_received += 1
        if isinstance(msg, Ping):
            with contextlib.suppress(StreamClosed):
                await self._send_control(Pong(nonce=msg.nonce))
        elif isinstance(msg, Pong):
            fut = self._pings.get(msg.nonce)
            if fut is not None and not fut.done():
                fut.set_result(self._loop.time())
        elif isinstance(msg, Close):
            if msg.code in _LOST_CLOSE_CODES:  # what the peer missed may be lost too
                self.lost = True
            self._mark_closed(_close_code(msg.code), f"peer closed: {msg.reason}")
        else:
            size = self._arriving
            self._inbox.put_nowait((msg, size))
            self._inbox_bytes += size
            if self._inbox_full():
                self._room.clear()
                await self._room.wait()

    def _fail_internally(self, task: str, exc: Exception) -> None:
        """End the session, as lost (what it carried meanwhile may be dropped), when its
        ``task`` failed on something that is not the peer's fault: logged once here, the
        task then ends normally, so nothing is left unretrieved and the session never stays
        "open" without its reader or its idle check."""
        log.error("session with %s: %s failed: %r", self.peer_id, task, exc, exc_info=exc)
        self._mark_lost(f"internal error in the session's {task}: {exc!r}")
        with contextlib.suppress(Exception):
            self.stream.abort()

    async def _keepalive_loop(self) -> None:
        try:
            await self._keep_alive()
        except Exception as exc:  # e.g. the admission's wall clock raised
            self._fail_internally("keep-alive", exc)

    async def _keep_alive(self) -> None:
        cfg = self.config
        while not self._closed.is_set():
            now = self._loop.time()
            # Wall-clock seconds turned into loop time, read again at each wake-up: the two
            # clocks drift (or the wall clock is stepped), so a wake-up that comes early sleeps
            # again, for what is left by the wall clock.
            left = self.certificate_left()
            if not left >= 0:  # NodeCertificate.validity_problem's "expired", as admit() judges
                await self._expire()
                return
            expires_at = now + left
            if now - self._last_rx >= cfg.idle_timeout:
                log.info(
                    "session with %s idle for %.1fs: closing", self.peer_id, now - self._last_rx
                )
                # Lost: the peer stopped answering (not even the keep-alives came), so what
                # went over the session may never have arrived; the Close frame goes for a
                # peer whose link comes back.
                self.lost = True
                await self.aclose(CloseCode.IDLE_TIMEOUT, "idle timeout")
                return
            next_tx = self._last_tx + cfg.keepalive_interval
            if now >= next_tx and self._write_lock.locked():
                # a write is under way, maybe stuck behind a dead link: waiting for it here
                # would keep the idle check from ever running
                next_tx = now + cfg.keepalive_interval
            elif now >= next_tx:
                self._start_keepalive_ping()
                next_tx = now + cfg.keepalive_interval
            next_rx = self._last_rx + cfg.idle_timeout
            await self._closed_or_timeout(min(next_rx, next_tx, expires_at) - self._loop.time())

    def _start_keepalive_ping(self) -> None:
        """Send a keep-alive ``Ping`` in a task of its own, never awaited here: its write may
        itself get stuck behind a dead link (the send buffer full, no reset), and the
        keep-alive task must still wake for the idle timeout. The write is not cancelled (a
        record cut off part-way would break the stream); it ends with the session, and the
        task's outcome is retrieved by :func:`_retrieve_write`."""
        self._ping_seq += 1
        task = self._loop.create_task(
            self._send_control(Ping(nonce=self._ping_seq)), name=f"session-ping-{self.peer_id}"
        )
        task.add_done_callback(_retrieve_write)
        self._pinger = task

    async def _expire(self) -> None:
        """The peer's certificate has expired beyond the clock skew (no handshake would admit it
        now): end the session, as lost, since what the peer sent meanwhile is dropped unread
        (see :attr:`lost`); the Close frame names the expiry."""
        peer = self.peer
        expired = utc_text(peer.not_after)
        reason = f"certificate of {peer.node_id} (serial {peer.serial}) expired at {expired} UTC"
        log.warning("session with %s: %s: closing", self.peer_id, reason)
        self.lost = True
        await self.aclose(CloseCode.CERTIFICATE_EXPIRED, reason)

    async def _closed_or_timeout(self, seconds: float) -> None:
        """Sleep ``seconds``, waking at once when the session closes (so that a session the
        peer closed leaves no keep-alive task behind, whether or not anyone calls aclose)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._closed.wait()

    def _mark_lost(self, reason: str) -> None:
        if not self._closed.is_set():
            self.lost = True
        self._mark_closed(CloseCode.GOING_AWAY, reason)

    def _mark_closed(self, code: CloseCode, reason: str) -> None:
        if self._closed.is_set():
            return
        self.close_code, self.close_reason = code, reason
        self._closed.set()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(StreamClosed(reason))
        self._inbox.put_nowait(None)  # wakes every recv() once the queued messages are read
        self._room.set()

    async def _shutdown(self, *, abort: bool = False) -> None:
        """Stop the session's reader and keep-alive tasks (but the one running this) and close
        its stream; ``abort``: drop what is still queued on it (a TCP reset) rather than flush
        it. A cancel of the caller itself still goes through (``asyncio.wait`` does not swallow
        it, as awaiting the cancelled tasks under a suppress would)."""
        if abort:  # first: a queued write must not go out meanwhile
            with contextlib.suppress(Exception):
                self.stream.abort()
        current = asyncio.current_task()
        mine = (self._keeper, self._reader, self._pinger)
        others = [task for task in mine if task is not None and task is not current]
        for task in others:
            task.cancel()
        await asyncio.wait(others)
        for task in others:  # their own end is theirs: retrieved, so never reported unretrieved
            if not task.cancelled():
                task.exception()
        with contextlib.suppress(Exception):
            await self.stream.aclose()


#: Close codes whose receiver ends the session as lost: the sender stopped reading it before
#: the close (it heard nothing for ``idle_timeout``; it judged the receiver's certificate
#: expired), so what the receiver sent meanwhile may never have been read. ADMISSION_REFUSED
#: is not one: it answers a handshake (nothing else was sent yet), and a refused dialler that
#: took it as lost would dial again and again.
_LOST_CLOSE_CODES = frozenset({CloseCode.IDLE_TIMEOUT, CloseCode.CERTIFICATE_EXPIRED})


def _retrieve_write(task: asyncio.Task[None]) -> None:
    """Mark a keep-alive ping's outcome as seen: a write that failed ended the session (the
    reason is the session's); anything else is our bug and is logged."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not isinstance(exc, StreamClosed | TransportError | OSError):
        log.error("keep-alive ping failed", exc_info=exc)


def _close_code(code: int) -> CloseCode:
    try:
        return CloseCode(code)
    except ValueError:
        return CloseCode.PROTOCOL_ERROR


# --- the handshake ---------------------------------------------------------------------------


class _Handshake:
    """Drives one Noise handshake over a stream: reads length-prefixed records, keeps leftovers."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.decoder = framing.RecordDecoder()
        self.pending: list[bytes] = []

    async def read_record(self) -> bytes:
        """The next handshake record. What came after it (the peer's first transport records,
        sent right behind its last handshake message, whole or in part) stays in ``pending``
        and ``decoder`` for the session; a handshake record over ``_MAX_HANDSHAKE_RECORD``
        is refused as soon as that many of its bytes are in."""
        while not self.pending:
            data = await self.stream.read(65536)
            if not data:
                raise HandshakeError("peer closed the connection during the handshake")
            self.pending.extend(self.decoder.feed(data))
            incomplete = self.decoder.buffered - framing.RECORD_HEADER_SIZE
            if not self.pending and incomplete > _MAX_HANDSHAKE_RECORD:
                raise HandshakeError("handshake record too large")
        record = self.pending.pop(0)
        if len(record) > _MAX_HANDSHAKE_RECORD:
            raise HandshakeError("handshake record too large")
        return record

    async def write_record(self, record: bytes) -> None:
        await self.stream.write(framing.encode_record(record))


def _hello(identity: NodeIdentity, config: SessionConfig) -> bytes:
    cert = identity.certificate
    return messages.encode(
        Hello(
            protocol_version=PROTOCOL_VERSION,
            node_id=identity.node_id,
            certificate=cert.to_bytes(),
            roles=tuple(sorted(cert.roles)),
            features=(
                *((PACKED_FEATURE,) if config.pack else ()),
                _rekey_feature(config),
                NOTICE_FEATURE,
            ),
            max_message_size=config.max_message_size,
        )
    )


def _read_hello(payload: bytes) -> Hello:
    msg = messages.decode(payload)
    if not isinstance(msg, Hello):
        raise HandshakeError(f"expected Hello in the handshake payload, got {type(msg).__name__}")
    if msg.protocol_version != PROTOCOL_VERSION:
        raise AdmissionError(
            "protocol-version", f"peer speaks {msg.protocol_version}, we speak {PROTOCOL_VERSION}"
        )
    return msg


def _admit(
    hello: Hello, hs: HandshakeState, admission: Admission, config: SessionConfig
) -> NodeCertificate:
    remote = hs.remote_static
    if remote is None:  # pragma: no cover - XX and IK always prove a static key
        raise HandshakeError("handshake proved no static key")
    cert = admission.check(hello.certificate, remote, config.clock_skew)
    if cert.node_id != hello.node_id:
        raise AdmissionError("key-mismatch", "Hello node id differs from the certificate's")
    return cert


def _noise_prologue(admission: Admission) -> bytes:
    return prologue(admission.identity.trust.fleet_id, PROTOCOL_VERSION)


async def _initiate(
    hsio: _Handshake,
    admission: Admission,
    config: SessionConfig,
    expected_static: bytes | None,
) -> tuple[HandshakeState, NodeCertificate, Hello]:
    ident = admission.identity
    pattern = _PATTERN_IK if expected_static is not None else _PATTERN_XX
    name = config.ik_protocol if expected_static is not None else config.xx_protocol
    hs = HandshakeState(
        name, True, _noise_prologue(admission), s=ident.static_private, rs=expected_static
    )
    if pattern == _PATTERN_IK:
        await hsio.write_record(bytes([pattern]) + hs.write_message(_hello(ident, config)))
        hello = _read_hello(hs.read_message(await hsio.read_record()))
        return hs, _admit(hello, hs, admission, config), hello
    await hsio.write_record(bytes([pattern]) + hs.write_message())
    hello = _read_hello(hs.read_message(await hsio.read_record()))
    cert = _admit(hello, hs, admission, config)
    await hsio.write_record(hs.write_message(_hello(ident, config)))
    return hs, cert, hello


async def _respond(
    hsio: _Handshake, admission: Admission, config: SessionConfig
) -> tuple[HandshakeState, NodeCertificate, Hello]:
    ident = admission.identity
    first = await hsio.read_record()
    pattern, body = first[0], first[1:]
    if pattern not in (_PATTERN_XX, _PATTERN_IK):
        raise HandshakeError(f"unknown handshake pattern byte 0x{pattern:02x}")
    name = config.ik_protocol if pattern == _PATTERN_IK else config.xx_protocol
    hs = HandshakeState(name, False, _noise_prologue(admission), s=ident.static_private)
    if pattern == _PATTERN_IK:
        hello = _read_hello(hs.read_message(body))
        try:
            cert = _admit(hello, hs, admission, config)
        except AdmissionError as exc:
            notice = _notice_for(hello, exc, admission)
            if notice is not None:  # complete the handshake only to tell the peer why
                with contextlib.suppress(MeshInferError, OSError):
                    await hsio.write_record(hs.write_message(_hello(ident, config)))
                    await _send_refusal(hsio, hs, exc, notice)
            raise
        await hsio.write_record(hs.write_message(_hello(ident, config)))
        return hs, cert, hello
    hs.read_message(body)
    await hsio.write_record(hs.write_message(_hello(ident, config)))
    hello = _read_hello(hs.read_message(await hsio.read_record()))
    try:
        return hs, _admit(hello, hs, admission, config), hello
    except AdmissionError as exc:
        # The handshake is complete, so the refusal can travel encrypted with its reason.
        await _send_refusal(hsio, hs, exc, _notice_for(hello, exc, admission))
        raise


def _notice_for(hello: Hello, exc: AdmissionError, admission: Admission) -> RevocationNotice | None:
    """What tells a peer refused as revoked which entry revokes it, if its Hello announced
    that it understands one (else None). It gives nothing away: ``admit`` judges revocation
    last, so the peer proved the static key of that very certificate, and the entry is about
    that certificate alone."""
    if exc.reason != "revoked" or NOTICE_FEATURE not in hello.features:
        return None
    cert = NodeCertificate.from_bytes(hello.certificate)  # (admit parsed and verified it)
    entry = admission.revocations.revocation_for(cert)  # (lists only grow: still there)
    return None if entry is None else RevocationNotice(entry.to_bytes())


async def _send_refusal(
    hsio: _Handshake,
    hs: HandshakeState,
    exc: AdmissionError,
    notice: RevocationNotice | None = None,
) -> None:
    """Send the refusal over the completed handshake's keys, ``notice`` first if any."""
    send_cs, _ = hs.transport()
    refusal = Close(
        code=int(CloseCode.ADMISSION_REFUSED), reason=f"admission refused: {exc.reason}"
    )
    with contextlib.suppress(MeshInferError, OSError):
        said = [notice, refusal] if notice is not None else [refusal]
        for msg in said:
            for chunk in framing.split_message(messages.encode(msg)):
                await hsio.write_record(send_cs.encrypt(chunk))


async def _establish(
    stream: Stream,
    admission: Admission,
    config: SessionConfig,
    metrics: SessionMetrics,
    *,
    initiator: bool,
    expected_static: bytes | None = None,
    expected_node_id: str | None = None,
) -> Session:
    hsio = _Handshake(stream)
    try:
        async with asyncio.timeout(config.handshake_timeout):
            if initiator:
                hs, cert, hello = await _initiate(hsio, admission, config, expected_static)
            else:
                hs, cert, hello = await _respond(hsio, admission, config)
        if expected_node_id is not None and cert.node_id != expected_node_id:
            raise AdmissionError(
                "unexpected-node", f"wanted {expected_node_id}, got {cert.node_id}"
            )
    except BaseException as exc:
        _count_failure(metrics, exc)
        with contextlib.suppress(Exception):
            await stream.aclose()
        if isinstance(exc, TimeoutError) and not isinstance(exc, SessionTimeout):
            raise SessionTimeout(f"handshake timed out after {config.handshake_timeout}s") from exc
        raise
    metrics.handshakes_ok += 1
    send_cs, recv_cs = hs.transport()
    return Session(
        stream,
        send_cs,
        recv_cs,
        cert,
        config,
        metrics,
        admission=admission,
        initiator=initiator,
        handshake_hash=hs.handshake_hash,
        leftover=hsio.pending,
        pack=config.pack and PACKED_FEATURE in hello.features,
        decoder=hsio.decoder,
        peer_max_message_size=hello.max_message_size,
        rekey_after=min(config.rekey_after, peer_rekey_after(hello) or config.rekey_after),
        peer_features=frozenset(hello.features),
    )


def _rekey_feature(config: SessionConfig) -> str:
    return f"{REKEY_FEATURE}{config.rekey_after}"


def peer_rekey_after(hello: Hello) -> int | None:
    """The ``rekey_after`` a peer's Hello announces (the first well-formed one), else None:
    a peer that announces none (an older node), or only malformed values, is taken to use
    ours."""
    for feature in hello.features:
        if feature.startswith(REKEY_FEATURE):
            value = feature[len(REKEY_FEATURE) :]
            if value.isascii() and value.isdigit() and 0 < (n := int(value)) <= MAX_REKEY_AFTER:
                return n
    return None


def _count_failure(metrics: SessionMetrics, exc: BaseException) -> None:
    if isinstance(exc, AdmissionError):
        reason = exc.reason
    elif isinstance(exc, TimeoutError):
        reason = "timeout"
    elif isinstance(exc, RemoteProtocolError):
        reason = "handshake-error"
    elif isinstance(exc, TransportError | OSError):
        reason = "transport"
    elif isinstance(exc, asyncio.CancelledError):
        reason = "cancelled"
    else:
        reason = "internal"
    metrics.refuse(reason)
    log.info("handshake refused (%s): %s", reason, exc)


async def connect(
    stream: Stream,
    admission: Admission,
    *,
    config: SessionConfig | None = None,
    metrics: SessionMetrics | None = None,
    expected_static: bytes | None = None,
    expected_node_id: str | None = None,
) -> Session:
    """Run the initiator's handshake on ``stream`` (IK if ``expected_static`` is known, else XX).

    Raises :class:`HandshakeError`, :class:`AdmissionError` or :class:`SessionTimeout`; the stream
    is closed on failure.
    """
    return await _establish(
        stream,
        admission,
        config or SessionConfig(),
        metrics or SessionMetrics(),
        initiator=True,
        expected_static=expected_static,
        expected_node_id=expected_node_id,
    )


async def accept(
    stream: Stream,
    admission: Admission,
    *,
    config: SessionConfig | None = None,
    metrics: SessionMetrics | None = None,
) -> Session:
    """Run the responder's handshake on an accepted ``stream``; see :func:`connect`."""
    return await _establish(
        stream, admission, config or SessionConfig(), metrics or SessionMetrics(), initiator=False
    )
