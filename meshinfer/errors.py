"""One error hierarchy, split by who is at fault.

* :class:`LocalProtocolError` -- we misused an API (a wrong-turn call, sending on a closed
  session). This is a bug in our own code or in the caller's.
* :class:`RemoteProtocolError` -- a peer sent something malformed or forbidden. Drop that peer
  (close the one session), count it, and keep serving everyone else.

Every error a peer can provoke must be a :class:`RemoteProtocolError` (or a subclass), never a
bare ``ValueError``/``KeyError`` leaking out of a decoder: the fuzz tests hold us to that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio


class MeshInferError(Exception):
    """Base class for every error meshinfer raises on purpose."""


class LocalProtocolError(MeshInferError):
    """We (or our caller) used an API in a way its state does not allow."""


class RemoteProtocolError(MeshInferError):
    """A peer sent bytes or a message that violates the protocol."""


class ConfigError(MeshInferError, ValueError):
    """A configuration file, CLI argument or config object is invalid. The message names the key."""


# --- Noise -----------------------------------------------------------------------------------


class NoiseError(MeshInferError):
    """Base class for Noise protocol failures."""


class HandshakeError(NoiseError, RemoteProtocolError):
    """A handshake message could not be processed (malformed, wrong length, failed to decrypt)."""


class HandshakeStateError(NoiseError, LocalProtocolError):
    """A handshake method was called out of turn, or on a failed/finished handshake."""


class DecryptError(NoiseError, RemoteProtocolError):
    """An authenticated ciphertext failed its tag check, or was too short to hold a tag."""


class MessageTooLargeError(NoiseError, LocalProtocolError):
    """We tried to write a Noise message longer than 65535 bytes."""


class NonceExhaustedError(NoiseError, LocalProtocolError):
    """A cipher state used up its 2**64-1 nonces; the session must be torn down (a rekey keeps
    the nonce)."""


# --- Admission (fleet identity) --------------------------------------------------------------


class AdmissionError(RemoteProtocolError):
    """A peer's certificate was refused. ``reason`` is a short stable code used in metrics."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"admission refused ({reason}){': ' + detail if detail else ''}")


class RevocationError(RemoteProtocolError):
    """A revocation list or entry from a peer is malformed, foreign or badly signed."""


class IdentityError(MeshInferError):
    """A local key, certificate or revocation file is missing, malformed or unusable."""


# --- Transport / sessions --------------------------------------------------------------------


class TransportError(MeshInferError, ConnectionError):
    """A dial, listen or stream operation failed at the transport layer."""


class StreamClosed(TransportError):
    """The stream or session was closed (by either side) while an operation was pending."""


class SessionTimeout(TransportError, TimeoutError):
    """A handshake, idle or keep-alive timer fired."""


class FrameTooLarge(RemoteProtocolError):
    """A peer announced or sent a message larger than the configured cap."""


# --- Inference -------------------------------------------------------------------------------


class InferenceError(MeshInferError):
    """An engine failed to run a batch."""


class ModelNotFoundError(InferenceError, LookupError):
    """No model with that id (and version) is registered or loaded."""


class BatchShapeError(InferenceError):
    """A batch does not fit the model's input schema or the engine's batch-size limit."""


class NonFiniteInputError(BatchShapeError):
    """A batch holds NaN or infinity (as float32), which no model can give an answer for.

    Bad input like a wrong shape, hence a :class:`BatchShapeError`."""


class OverloadedError(InferenceError):
    """The queue in front of an engine is full: try later or elsewhere."""


class DeadlineExceededError(InferenceError, TimeoutError):
    """A request's deadline passed before it could run; it was not run."""


def log_failure(
    log: logging.Logger, what: str, ended: str = "failed"
) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback that logs how a background task failed (no task fails silently), as
    ``"{what} {ended}: {exception}"``: a warning for a :class:`MeshInferError` (a peer, the
    input, the network), an error with its traceback for anything else (our bug). A cancelled
    task did not fail. For a short step, which may run again; a watch that runs until it is
    cancelled takes :func:`log_stopped`. Here, at the bottom of the layers, so that every layer
    can use it (:mod:`meshinfer.runtime.loop` re-exports it)."""

    def logged(task: asyncio.Task[Any]) -> None:
        if task.cancelled() or (exc := task.exception()) is None:
            return
        level = logging.WARNING if isinstance(exc, MeshInferError) else logging.ERROR
        log.log(level, "%s %s: %s", what, ended, exc, exc_info=exc)

    return logged


def log_stopped(
    log: logging.Logger, what: str, keeps: Callable[[], str]
) -> Callable[[asyncio.Task[Any]], None]:
    """A done-callback for a watch that runs until it is cancelled: ended any other way, it
    stopped for good and nothing follows the host any more, so that is an ERROR with the
    traceback, whatever the exception (a :class:`MeshInferError` included; :func:`log_failure`
    would say WARNING), as ``"{what} stopped for good: {exception}; {keeps()}"``. ``keeps`` is
    read when the watch stops: what the node goes on with (the address it stays at). The
    watch logs its own transient failures (one look that failed) and goes on."""

    def logged(task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        why = exc if exc is not None else "it returned"
        log.error("%s stopped for good: %s; %s", what, why, keeps(), exc_info=exc)

    return logged
