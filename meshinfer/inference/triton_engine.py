"""The Triton engine: batches run on a Triton Inference Server via tritonclient's asyncio clients.

``TritonEngine("127.0.0.1:8000")`` speaks HTTP/REST, ``protocol="grpc"`` speaks gRPC (port 8001
by default on a server). A :class:`~meshinfer.inference.base.ModelRef` maps to Triton's model
name (``model_id``) and version (``version``, an integer string). ``load`` checks that the server
and the model are ready and reads the model's metadata (input/output names, datatype) and config
(``max_batch_size``); ``infer`` sends one batch as that input and returns the first output.

Failures, and what the caller sees:

* connection refused / reset, server gone (HTTP ``aiohttp`` connection errors, gRPC
  ``UNAVAILABLE``): the client is closed and recreated and the call retried, at most
  ``retries`` times with exponential backoff (``backoff_s``, doubling) on the loop's clock;
  then :class:`InferenceError` naming the server. Inference is a pure function of its input,
  so retrying a batch is safe. ``capacity().ready`` turns False until a call succeeds again.
* unknown or not-ready model (HTTP 404, gRPC ``NOT_FOUND``): :class:`ModelNotFoundError`. A
  loaded model the server stops knowing (it restarted and is loading its models again) is
  looked up again, as ``load`` does, by the next ``infer``: it serves again once the server
  has it back, without a new ``load``.
* the server refuses the batch as malformed (HTTP 400, gRPC ``INVALID_ARGUMENT``: wrong shape,
  more rows than the model's ``max_batch_size``): :class:`BatchShapeError` (bad input).
* every other server error (backend failure): :class:`InferenceError`.
* the engine closed while the call was in flight: :class:`LocalProtocolError` ("closed"), for
  either protocol (grpc.aio cancels the calls on a channel it closes; that CancelledError is
  not passed on to a caller that was not cancelled).
* no answer within ``timeout_s``: :class:`InferenceError` (not retried: the time is spent).
  ``timeout_s`` bounds the whole call from when it is made: the wait for a free request slot,
  every attempt and the backoffs between them (a retry whose backoff would end past it is not
  made: the call fails as unreachable).
* an answer the engine cannot use (metadata without a tensor's name or datatype; an output
  missing, malformed, not numeric, or with other than one row per sample of a batching
  model): :class:`InferenceError` naming the server.

Concurrency: coroutines run on the event loop; at most ``max_in_flight`` requests are in flight
at once (a semaphore). The tritonclient asyncio clients never block the loop. Calls share one
client; one replaced after a connection error is closed when the last call using it ends, so
that calls still on it are not cut off (closing the engine closes it at once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from meshinfer.errors import (
    BatchShapeError,
    InferenceError,
    LocalProtocolError,
    ModelNotFoundError,
)
from meshinfer.inference.base import EngineCapacity, ModelRef, TensorSpec

T = TypeVar("T")
_NOT_FOUND_STATUSES = {"404", "StatusCode.NOT_FOUND"}
_BAD_INPUT_STATUSES = {"400", "StatusCode.INVALID_ARGUMENT"}  # shape, batch size, datatype


@dataclass(frozen=True, slots=True)
class TritonModel:
    """What ``load`` learned about a served model."""

    ref: ModelRef
    input_name: str
    input_datatype: str
    output_name: str
    max_batch_size: int
    input_spec: TensorSpec | None = None  # when the server reports a batch-led shape


class _Protocol:
    """The small differences between tritonclient's HTTP and gRPC asyncio clients."""

    def __init__(self, protocol: str) -> None:
        if protocol == "http":
            import tritonclient.http.aio as module

            self.metadata_kwargs: dict[str, Any] = {}
        elif protocol == "grpc":
            import tritonclient.grpc.aio as module

            self.metadata_kwargs = {"as_json": True}
        else:
            raise LocalProtocolError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self.name = protocol
        self.module = module

    def client(self, url: str, timeout_s: float) -> Any:
        if self.name == "http":
            return self.module.InferenceServerClient(url, conn_timeout=timeout_s)
        return self.module.InferenceServerClient(url)

    def max_batch_size(self, config: dict[str, Any]) -> int:
        config = config.get("config", config)  # gRPC wraps the model config
        return int(config.get("max_batch_size", 0))

    def requested_output(self, name: str) -> Any:
        if self.name == "http":
            return self.module.InferRequestedOutput(name, binary_data=True)
        return self.module.InferRequestedOutput(name)


@dataclass(eq=False, slots=True)
class _Client:
    """A tritonclient client and the number of calls using it now. One that failed with a
    connection error is ``retired`` (replaced for later calls) and closed by the last call on
    it, never under another call's feet."""

    client: Any
    users: int = 0
    retired: bool = False
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                await self.client.close()


def _input_spec(tensor: dict[str, Any]) -> TensorSpec | None:
    """A batch-led TensorSpec from a model's metadata input (None if it is not one)."""
    from tritonclient.utils import triton_to_np_dtype

    try:
        shape = tuple(int(n) for n in tensor["shape"])
        dtype = triton_to_np_dtype(tensor["datatype"])  # None for a datatype it does not know
        name = None if dtype is None else np.dtype(dtype).name
    except (KeyError, TypeError, ValueError):
        return None
    if name is None or shape[:1] != (-1,):
        return None
    return TensorSpec(str(tensor["name"]), name, shape)


def _caller_cancelled() -> bool:
    """Whether the running task was asked to stop (not a CancelledError the client library
    raised of its own accord: grpc.aio raises one from each call on a channel it closes)."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


def _is_connection_error(exc: BaseException) -> bool:
    import aiohttp
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError):
        return True
    return isinstance(exc, InferenceServerException) and exc.status() == "StatusCode.UNAVAILABLE"


class TritonEngine:
    """An :class:`~meshinfer.inference.base.InferenceEngine` backed by a Triton server.

    ``default_max_batch_size`` is reported for models whose config allows no batching info.
    """

    name = "triton"

    def __init__(
        self,
        url: str,
        *,
        protocol: str = "http",
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_in_flight: int = 4,
        default_max_batch_size: int = 64,
    ) -> None:
        if retries < 0 or timeout_s <= 0 or max_in_flight < 1:
            raise LocalProtocolError("need retries >= 0, timeout_s > 0 and max_in_flight >= 1")
        if url.startswith(("http://", "https://")):
            raise LocalProtocolError(f"give the Triton url as host:port, without scheme: {url}")
        self.url = url
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.default_max_batch_size = default_max_batch_size
        self._protocol = _Protocol(protocol)
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._client: _Client | None = None
        self._models: dict[ModelRef, TritonModel] = {}
        self._vanished: set[ModelRef] = set()  # loaded, then unknown to the server: look again
        self._ready = False
        self._closed = False

    @property
    def protocol(self) -> str:
        """``"http"`` or ``"grpc"``."""
        return self._protocol.name

    # --- health -------------------------------------------------------------------------------

    async def server_ready(self) -> bool:
        """True if the server is live and ready. Never raises for an unreachable server."""
        try:
            live = await self._call("live check", lambda c: c.is_server_live())
            ready = live and await self._call("ready check", lambda c: c.is_server_ready())
        except InferenceError:
            ready = False
        self._ready = bool(ready)
        return self._ready

    async def model_ready(self, ref: ModelRef) -> bool:
        """True if the server reports ``ref`` ready. Raises InferenceError if unreachable."""
        return bool(
            await self._call(
                f"ready check of {ref}", lambda c: c.is_model_ready(ref.model_id, ref.version)
            )
        )

    # --- InferenceEngine ----------------------------------------------------------------------

    async def load(self, ref: ModelRef) -> None:
        """Check the server and ``ref`` are ready and learn its tensors; idempotent.

        Raises ModelNotFoundError if the model is unknown or not ready, InferenceError if the
        server cannot be reached or serves the model in a shape this engine cannot drive.
        """
        self._check_open()
        if ref in self._models:
            return
        if not await self.server_ready():
            raise InferenceError(f"Triton server {self.url} ({self.protocol}) is not ready")
        if not await self.model_ready(ref):
            raise ModelNotFoundError(
                f"model {ref} is not ready on Triton server {self.url} (unknown, unloaded or "
                "still loading)"
            )
        self._models[ref] = await self._describe(ref)
        self._vanished.discard(ref)

    async def _describe(self, ref: ModelRef) -> TritonModel:
        kwargs = self._protocol.metadata_kwargs
        metadata = await self._call(
            f"metadata of {ref}",
            lambda c: c.get_model_metadata(ref.model_id, ref.version, **kwargs),
            ref,
        )
        config = await self._call(
            f"config of {ref}",
            lambda c: c.get_model_config(ref.model_id, ref.version, **kwargs),
            ref,
        )
        try:  # (a JSON body that is not an object, or tensor lists that are not lists)
            inputs, outputs = list(metadata.get("inputs", [])), list(metadata.get("outputs", []))
        except (TypeError, ValueError, AttributeError):
            raise InferenceError(
                f"model {ref} on Triton server {self.url}: metadata is not an object with "
                f"lists of inputs and outputs: {str(metadata)[:200]!r}"
            ) from None
        if len(inputs) != 1 or not outputs:
            raise InferenceError(
                f"model {ref} on {self.url} has {len(inputs)} inputs and {len(outputs)} outputs; "
                "the Triton engine drives models with one input and at least one output"
            )
        try:
            batching = self._protocol.max_batch_size(config)
            names = (str(inputs[0]["name"]), str(inputs[0]["datatype"]), str(outputs[0]["name"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InferenceError(
                f"model {ref} on Triton server {self.url}: metadata or config lacks {exc!r}"
            ) from None
        max_batch = batching or self.default_max_batch_size
        spec = _input_spec(inputs[0]) if batching else None
        return TritonModel(ref, *names, max_batch, spec)

    def input_spec(self, ref: ModelRef) -> TensorSpec | None:
        """The input tensor of loaded ``ref`` as the server described it (shape ``[-1, ...]``,
        NumPy dtype name), or None if not loaded or not a batching model. Cheap, on the loop."""
        model = self._models.get(ref)
        return None if model is None else model.input_spec

    async def unload(self, ref: ModelRef) -> None:
        """Forget ``ref`` locally (the server keeps serving it); idempotent."""
        self._models.pop(ref, None)
        self._vanished.discard(ref)

    async def infer(self, ref: ModelRef, batch: np.ndarray) -> np.ndarray:
        """Run one batch on the server and return the model's first output.

        Raises BatchShapeError (before any server call) if ``batch`` is not an array with at
        least one sample or cannot be converted to the model's input datatype,
        ModelNotFoundError if ``ref`` was not loaded here or is not (or no longer) on the server,
        InferenceError for any other failure (see the module docstring).
        """
        self._check_open()
        if not isinstance(batch, np.ndarray) or batch.ndim < 1 or batch.shape[0] < 1:
            shape = getattr(batch, "shape", type(batch).__name__)
            raise BatchShapeError(f"a batch must be an array of >= 1 samples, got {shape}")
        model = self._models.get(ref) or await self._reloaded(ref)
        request = self._request_inputs(model, batch)
        outputs = [self._protocol.requested_output(model.output_name)]
        result = await self._call(
            f"inference on {ref}",
            lambda c: c.infer(ref.model_id, request, model_version=ref.version, outputs=outputs),
            ref,
        )
        return self._output(model, result, len(batch))

    async def _reloaded(self, ref: ModelRef) -> TritonModel:
        """A model that vanished from the server (a restart), looked up again as ``load``
        does; ModelNotFoundError if it was never loaded here or is not back yet."""
        if ref not in self._vanished:
            raise ModelNotFoundError(f"model {ref} is not loaded on triton engine {self.url}")
        await self.load(ref)
        return self._models[ref]

    def _output(self, model: TritonModel, result: Any, rows: int) -> np.ndarray:
        """The model's output in ``result``, checked: InferenceError if missing, malformed,
        not numeric, or (a batching model) not one row per sample."""
        what = f"Triton server {self.url} sent for {model.ref}"
        try:
            output = result.as_numpy(model.output_name)
        except Exception as exc:  # data that does not fill its own shape, a bad datatype
            raise InferenceError(f"{what} a malformed {model.output_name!r}: {exc!r}") from None
        if output is None:
            raise InferenceError(f"{what} no {model.output_name!r}")
        batched = model.input_spec is not None
        if output.dtype.kind not in "fiub" or (batched and output.shape[:1] != (rows,)):
            raise InferenceError(
                f"{what} {model.output_name!r} as {output.dtype} {output.shape} for a batch "
                f"of {rows}: not one row of numbers per sample"
            )
        return output

    def _request_inputs(self, model: TritonModel, batch: np.ndarray) -> list[Any]:
        from tritonclient.utils import triton_to_np_dtype

        try:
            array = np.ascontiguousarray(batch, dtype=triton_to_np_dtype(model.input_datatype))
        except (TypeError, ValueError) as exc:
            raise BatchShapeError(
                f"batch of {batch.dtype} does not convert to {model.input_datatype}: {exc}"
            ) from None
        tensor = self._protocol.module.InferInput(
            model.input_name, list(array.shape), model.input_datatype
        )
        tensor.set_data_from_numpy(array)
        return [tensor]

    def capacity(self) -> EngineCapacity:
        """Readiness as of the last server call; never blocks or calls the server."""
        limits = [m.max_batch_size for m in self._models.values()]
        return EngineCapacity(
            device=f"triton:{self.url}",
            max_batch_size=min(limits) if limits else self.default_max_batch_size,
            free_memory_bytes=None,
            loaded_models=tuple(self._models),
            ready=self._ready and not self._closed,
        )

    async def aclose(self) -> None:
        """Close the client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._ready = False
        self._models.clear()
        self._vanished.clear()
        lease, self._client = self._client, None
        if lease is not None:  # calls still on it fail: the engine is closing
            lease.retired = True
            await lease.close()

    async def __aenter__(self) -> TritonEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- calls, retries and error mapping -----------------------------------------------------

    async def _call(
        self, what: str, operation: Callable[[Any], Awaitable[T]], ref: ModelRef | None = None
    ) -> T:
        """Run ``operation(client)`` with reconnect-and-retry and error mapping, all of it (the
        wait for a free slot, every attempt and backoff) within ``timeout_s`` of the call."""
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        await self._take_slot(what, deadline)
        try:
            return await self._attempts(what, operation, ref, deadline)
        finally:
            self._slots.release()

    async def _take_slot(self, what: str, deadline: float) -> None:
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise InferenceError(
                f"{what} on Triton server {self.url} timed out after {self.timeout_s} s waiting "
                f"for one of its {self.max_in_flight} request slots (all busy)"
            ) from None

    async def _attempts(
        self, what: str, operation: Callable[[Any], Awaitable[T]], ref: ModelRef | None,
        deadline: float,
    ) -> T:  # fmt: skip
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            attempt += 1
            lease = self._lease()
            try:
                async with asyncio.timeout_at(deadline):
                    result = await operation(lease.client)
            except TimeoutError:
                raise InferenceError(
                    f"{what} on Triton server {self.url} timed out after {self.timeout_s} s"
                ) from None
            except asyncio.CancelledError:
                if _caller_cancelled():
                    raise
                self._check_open()  # gRPC cancels the calls on a channel that aclose closes
                raise InferenceError(
                    f"{what} on Triton server {self.url}: the client cancelled the call"
                ) from None
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise self._mapped(what, exc, ref) from exc
                last_error = exc
                self._retire(lease)
            else:
                self._ready = True
                return result
            finally:
                await self._give_back(lease)
            delay = self.backoff_s * 2 ** (attempt - 1)
            if attempt > self.retries or loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        raise InferenceError(
            f"{what}: Triton server {self.url} ({self.protocol}) unreachable after "
            f"{attempt} attempts: {last_error}"
        ) from last_error

    def _lease(self) -> _Client:
        """The client to call with, counted as in use until :meth:`_give_back`."""
        self._check_open()
        if self._client is None:
            self._client = _Client(self._protocol.client(self.url, self.timeout_s))
        self._client.users += 1
        return self._client

    def _retire(self, lease: _Client) -> None:
        """A connection error on ``lease``: the next call gets a new client; this one is
        closed once no call uses it (closing it now would fail the calls still on it)."""
        self._ready = False
        lease.retired = True
        if self._client is lease:  # another caller may have replaced it already
            self._client = None

    async def _give_back(self, lease: _Client) -> None:
        lease.users -= 1
        if lease.retired and lease.users == 0:
            await lease.close()

    def _mapped(self, what: str, exc: Exception, ref: ModelRef | None) -> InferenceError:
        from tritonclient.utils import InferenceServerException

        if not isinstance(exc, InferenceServerException):
            return InferenceError(f"{what} on Triton server {self.url} failed: {exc!r}")
        detail = f"{exc.message()} (status {exc.status()})"
        if exc.status() in _NOT_FOUND_STATUSES or "unknown model" in str(exc.message()).lower():
            if ref is not None and self._models.pop(ref, None) is not None:
                self._vanished.add(ref)  # it went away: the next infer looks again
            return ModelNotFoundError(f"{what}: Triton server {self.url}: {detail}")
        if exc.status() in _BAD_INPUT_STATUSES and what.startswith("inference"):
            return BatchShapeError(f"{what} refused by Triton server {self.url}: {detail}")
        return InferenceError(f"{what} failed on Triton server {self.url}: {detail}")

    def _check_open(self) -> None:
        if self._closed:
            raise LocalProtocolError(f"triton engine for {self.url} is closed")
