"""Stream framing: length-prefixed records and chunking of large messages (sans-I/O).

Layering, sender side (the session in :mod:`meshinfer.runtime.session` composes these with the
Noise ``CipherState``; the receiver runs the same steps backwards)::

    message (dataclass)
      -> msgpack bytes                         meshinfer.proto.messages.encode
      -> chunks: 1 flag byte + <= MAX_CHUNK     split_message, or frame_messages for several
                                               (Reassembler.feed / feed_all on receipt)
      -> each chunk encrypted by Noise (+16 byte tag, so <= 65535 bytes)
      -> record: 2-byte big-endian length + ciphertext   encode_record (RecordDecoder on receipt)

Flag byte: ``0`` = final chunk of the message, ``1`` = more chunks follow, ``2`` = a *packed*
chunk: several whole small messages, each behind its 2-byte big-endian length
(:func:`frame_messages` makes them for a peer that announced the ``packed`` feature; one Noise
message, one AEAD call and one record for a burst of small messages instead of one each).
Anything else is a :class:`~meshinfer.errors.RemoteProtocolError`, and so are a zero-length
record, an empty chunk, an empty non-final chunk (which would let a peer grow our buffers without
sending data), a packed chunk with no message, an empty message or a length running past its
end, and a packed chunk between the chunks of a larger message.

State: :class:`RecordDecoder` holds at most one partial record; :class:`Reassembler` holds the
chunks of at most one unfinished message, never more than ``max_message_size`` bytes of them.
Both are *failed* for good after they raise: a session closes on the first protocol error, so
every later ``feed`` raises again rather than try to resynchronise.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from meshinfer.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "FLAG_FINAL",
    "FLAG_MORE",
    "FLAG_PACKED",
    "MAX_CHUNK",
    "MAX_RECORD",
    "RECORD_HEADER_SIZE",
    "TAG_SIZE",
    "Reassembler",
    "RecordDecoder",
    "encode_record",
    "frame_messages",
    "split_message",
]

RECORD_HEADER_SIZE = 2
#: Largest Noise message, hence largest record body.
MAX_RECORD = 0xFFFF
#: ChaCha20-Poly1305 authentication tag appended to every Noise transport message.
TAG_SIZE = 16
FLAG_FINAL = 0
FLAG_MORE = 1
FLAG_PACKED = 2
#: Largest chunk of application data that fits one Noise message with its flag byte.
MAX_CHUNK = MAX_RECORD - TAG_SIZE - 1
DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

_HEADER = struct.Struct(">H")
_FINAL_BYTE = bytes((FLAG_FINAL,))
_MORE_BYTE = bytes((FLAG_MORE,))
_PACKED_BYTE = bytes((FLAG_PACKED,))


def encode_record(ciphertext: bytes) -> bytes:
    """Prefix one Noise message with its 2-byte big-endian length."""
    size = len(ciphertext)
    if not 0 < size <= MAX_RECORD:
        raise LocalProtocolError(f"record body must be 1..{MAX_RECORD} bytes, got {size}")
    return _HEADER.pack(size) + ciphertext


class RecordDecoder:
    """Cut a received byte stream into record bodies (Noise ciphertexts).

    ``feed`` returns every record completed by the new bytes, in order. Bytes of an unfinished
    record stay in one bytearray; a consumed prefix is dropped once per ``feed``, so large inputs
    and byte-at-a-time inputs both cost linear time.
    """

    __slots__ = ("_buffer", "_failed")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet form a complete record."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Take newly received bytes; return the record bodies they complete."""
        if self._failed:
            raise RemoteProtocolError("record stream already failed")
        if not self._buffer:
            if len(data) > RECORD_HEADER_SIZE and (data[0] << 8 | data[1]) == len(data) - 2:
                return [bytes(data[RECORD_HEADER_SIZE:])]  # fast path: exactly one record
            return self._cut(data)
        self._buffer += data
        return self._cut(self._buffer, buffered=True)

    def _cut(self, source: bytes | bytearray, *, buffered: bool = False) -> list[bytes]:
        records: list[bytes] = []
        pos, end, size = 0, len(source), -1
        with memoryview(source) as view:
            while end - pos >= RECORD_HEADER_SIZE:
                size = (view[pos] << 8) | view[pos + 1]
                start = pos + RECORD_HEADER_SIZE
                if size == 0 or end - start < size:
                    break
                records.append(bytes(view[start : start + size]))
                pos = start + size
        if size == 0:
            self._fail()
        self._keep(source, pos, buffered)
        return records

    def _keep(self, source: bytes | bytearray, pos: int, buffered: bool) -> None:
        """Leave exactly the unconsumed tail ``source[pos:]`` in the buffer."""
        if buffered:
            del self._buffer[:pos]
        elif pos < len(source):
            self._buffer += memoryview(source)[pos:]

    def _fail(self) -> None:
        self._failed = True
        self._buffer.clear()
        raise RemoteProtocolError("zero-length record")


def split_message(plaintext: bytes, max_chunk: int = MAX_CHUNK) -> list[bytes]:
    """Split an encoded message into chunk plaintexts: ``flag byte + up to max_chunk bytes``.

    An empty message gives one final, empty chunk. Each chunk is one copy of its slice.
    """
    _check_max_chunk(max_chunk)
    size = len(plaintext)
    if size <= max_chunk:
        return [_FINAL_BYTE + plaintext]
    view = memoryview(plaintext)
    last = (size - 1) // max_chunk * max_chunk
    chunks = [_MORE_BYTE + view[i : i + max_chunk] for i in range(0, last, max_chunk)]
    chunks.append(_FINAL_BYTE + view[last:])
    return chunks


def _check_max_chunk(max_chunk: int) -> None:
    if type(max_chunk) is not int or not 0 < max_chunk <= MAX_CHUNK:
        raise LocalProtocolError(f"max_chunk must be 1..{MAX_CHUNK}, got {max_chunk!r}")


def frame_messages(
    plaintexts: Sequence[bytes], *, pack: bool, max_chunk: int = MAX_CHUNK
) -> list[bytes]:
    """Chunk plaintexts for encoded messages, in order. ``pack``: runs of small messages share
    packed chunks (a message is small if it fits one with its 2-byte length; a run of one is
    sent as an ordinary final chunk); else each message is :func:`split_message` on its own."""
    if not pack:
        return [chunk for data in plaintexts for chunk in split_message(data, max_chunk)]
    _check_max_chunk(max_chunk)
    chunks: list[bytes] = []
    run: list[bytes] = []  # the messages of the packed chunk being filled
    room = 0  # bytes left in it
    for data in plaintexts:
        need = _HEADER.size + len(data)
        if run and (need > room or not data):
            chunks.append(_packed(run))
            run = []
        if not data or need > max_chunk:  # an empty message is never packed (see Reassembler)
            chunks += split_message(data, max_chunk)
        elif run:
            run.append(data)
            room -= need
        else:
            run, room = [data], max_chunk - need
    if run:
        chunks.append(_packed(run))
    return chunks


def _packed(run: list[bytes]) -> bytes:
    if len(run) == 1:
        return _FINAL_BYTE + run[0]
    return _PACKED_BYTE + b"".join(_HEADER.pack(len(data)) + data for data in run)


#: Parts of a chunked message smaller than this are copied together (see Reassembler._append).
_SMALL_PART = 4096


class Reassembler:
    """Join chunk plaintexts (as :func:`split_message` and :func:`frame_messages` make them)
    back into whole messages.

    ``feed`` returns the message when its final chunk arrives, else None. A message larger than
    ``max_message_size`` raises :class:`~meshinfer.errors.FrameTooLarge` as soon as the running
    total passes the cap; its parts are dropped and the reassembler refuses further chunks.
    """

    __slots__ = ("_failed", "_parts", "_size", "max_message_size")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if type(max_message_size) is not int or max_message_size < 0:
            raise LocalProtocolError(f"max_message_size must be an int >= 0: {max_message_size!r}")
        self.max_message_size = max_message_size
        self._parts: list[memoryview | bytes | bytearray] = []
        self._size = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held so far."""
        return self._size

    def feed_all(self, chunk: bytes) -> list[bytes]:
        """As :meth:`feed`, for a peer that may pack: the whole messages ``chunk`` completes or
        holds (several for a packed chunk; none while a larger message is still incomplete)."""
        if chunk and chunk[0] == FLAG_PACKED and not self._failed:
            return self._unpack(chunk)
        whole = self.feed(chunk)
        return [] if whole is None else [whole]

    def _unpack(self, chunk: bytes) -> list[bytes]:
        if self._parts:
            self._fail(RemoteProtocolError("packed chunk inside a chunked message"))
        found: list[bytes] = []
        pos, end = 1, len(chunk)
        if pos == end:
            self._fail(RemoteProtocolError("packed chunk with no message"))
        with memoryview(chunk) as view:
            while pos < end:
                if end - pos < _HEADER.size:
                    self._fail(RemoteProtocolError("packed chunk ends inside a length"))
                size = (view[pos] << 8) | view[pos + 1]
                pos += _HEADER.size
                if size == 0:
                    self._fail(RemoteProtocolError("empty message in a packed chunk"))
                if size > end - pos:
                    self._fail(RemoteProtocolError("packed message runs past its chunk"))
                self._check_size(size)
                found.append(bytes(view[pos : pos + size]))
                pos += size
        return found

    def feed(self, chunk: bytes) -> bytes | None:
        """Take one decrypted chunk plaintext; return the whole message once complete (a
        packed chunk is refused here: see :meth:`feed_all`)."""
        if self._failed:
            raise RemoteProtocolError("message reassembly already failed")
        if not chunk:
            self._fail(RemoteProtocolError("empty chunk (no flag byte)"))
        flag, size = chunk[0], len(chunk) - 1
        if flag == FLAG_FINAL and not self._parts:
            self._check_size(size)
            return chunk[1:] if type(chunk) is bytes else bytes(chunk[1:])
        if flag == FLAG_MORE and size == 0:
            self._fail(RemoteProtocolError("empty non-final chunk"))
        if flag not in (FLAG_FINAL, FLAG_MORE):
            self._fail(RemoteProtocolError(f"unknown chunk flag {flag}"))
        self._check_size(self._size + size)
        self._append(chunk)
        return self._finish() if flag == FLAG_FINAL else None

    def _append(self, chunk: bytes) -> None:
        # A view into immutable bytes saves a copy until the join; anything mutable is copied.
        # A small part is copied onto the end of a bytearray instead: a view and its chunk cost
        # ~350 bytes whatever the part's size, so a peer sending 1-byte chunks had us hold ~350
        # times the message cap (a part of _SMALL_PART or more costs under 9% more).
        size = len(chunk) - 1
        if size < _SMALL_PART:
            tail = self._parts[-1] if self._parts else None
            if type(tail) is not bytearray:
                tail = bytearray()
                self._parts.append(tail)
            tail += memoryview(chunk)[1:]
        else:
            self._parts.append(memoryview(chunk)[1:] if type(chunk) is bytes else bytes(chunk[1:]))
        self._size += size

    def _finish(self) -> bytes:
        message = b"".join(self._parts)
        self._parts.clear()
        self._size = 0
        return message

    def _check_size(self, size: int) -> None:
        if size > self.max_message_size:
            self._fail(FrameTooLarge(f"message exceeds the cap of {self.max_message_size} bytes"))

    def _fail(self, error: RemoteProtocolError) -> None:
        self._failed = True
        self._parts.clear()
        self._size = 0
        raise error
