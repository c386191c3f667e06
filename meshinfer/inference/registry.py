"""The model registry: which models a node can load, their schemas, hashes and loaders.

:func:`default_registry` holds the shipped, trained digits classifiers ``digits-mlp@1``,
``digits-mlp-wide@1`` and ``digits-mlp-deep@1`` (:data:`DIGITS_REFS`: three architectures trained
on one split, so they share one held-out set and can be ensembled; weights, metadata and the
held-out set live in ``meshinfer/inference/models/``) and a few synthetic MLPs. A node
advertises ``(model_id, version, sha256)`` of what it has loaded; for file-backed models the
sha256 is that of the weights file and is checked on every load, so a corrupted file is refused
with :class:`ModelIntegrityError` instead of producing wrong answers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meshinfer.errors import InferenceError, LocalProtocolError, ModelNotFoundError
from meshinfer.inference.base import ModelRef, TensorSpec
from meshinfer.inference.mlp import MLPWeights, sha256_hex, weights_from_bytes
from meshinfer.inference.synthetic import SyntheticSpec, make_weights
from meshinfer.proto.models import model_name_problem

MODELS_DIR = Path(__file__).resolve().parent / "models"
DIGITS_REF = ModelRef("digits-mlp", "1")
DIGITS_WIDE_REF = ModelRef("digits-mlp-wide", "1")
DIGITS_DEEP_REF = ModelRef("digits-mlp-deep", "1")
DIGITS_REFS = (DIGITS_REF, DIGITS_WIDE_REF, DIGITS_DEEP_REF)
#: Synthetic MLPs: throughput models (64/1024/4096 wide) and two small heads that take 10 and 20
#: features, so pipelines can chain them after the digit classifiers (10 outputs each).
DEFAULT_SYNTHETIC = (
    SyntheticSpec(64, 2),
    SyntheticSpec(1024, 4),
    SyntheticSpec(4096, 8),
    SyntheticSpec(10, 1),
    SyntheticSpec(20, 1),
)


class ModelIntegrityError(InferenceError):
    """A model file is missing, malformed, or its sha256 differs from the registered one."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A registered model. ``loader`` returns its weights (blocking: call it off the loop)."""

    ref: ModelRef
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    loader: Callable[[], MLPWeights] = field(repr=False)
    description: str = ""
    path: Path | None = None

    def load_weights(self) -> MLPWeights:
        """Load the weights and check them against the schema. Blocking."""
        weights = self.loader()
        want = (self.inputs[0].shape[1], self.outputs[0].shape[1])
        if (weights.input_dim, weights.output_dim) != want:
            raise ModelIntegrityError(f"{self.ref}: weights do not match the registered schema")
        return weights


class ModelRegistry:
    """Models by :class:`ModelRef`. Not thread-safe: register on the loop, read anywhere."""

    def __init__(self, models: tuple[ModelInfo, ...] = ()) -> None:
        self._models: dict[ModelRef, ModelInfo] = {}
        for info in models:
            self.register(info)

    def register(self, info: ModelInfo) -> None:
        """Add ``info``; re-registering the same ref with another hash is an error, and so is
        an id or version holding ``@`` (``"id@version"`` would not name it alone)."""
        ref = info.ref
        if (problem := model_name_problem(ref.model_id, ref.version)) is not None:
            raise LocalProtocolError(f"model {ref!s:.200} cannot be registered: {problem}")
        known = self._models.get(info.ref)
        if known is not None and known.sha256 != info.sha256:
            raise LocalProtocolError(f"{info.ref} is already registered with another hash")
        self._models[info.ref] = info

    def get(self, ref: ModelRef) -> ModelInfo:
        """The model registered as ``ref``. Raises ModelNotFoundError."""
        try:
            return self._models[ref]
        except KeyError:
            raise ModelNotFoundError(f"no model {ref} in the registry") from None

    def refs(self) -> tuple[ModelRef, ...]:
        """All registered references, in registration order."""
        return tuple(self._models)

    def __contains__(self, ref: object) -> bool:
        return ref in self._models

    def __iter__(self) -> Iterator[ModelInfo]:
        return iter(tuple(self._models.values()))

    def __len__(self) -> int:
        return len(self._models)


def _tensor_specs(docs: list[dict]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(d["name"], d["dtype"], tuple(int(n) for n in d["shape"])) for d in docs)


def _verified_bytes(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelIntegrityError(f"cannot read model file {path}: {exc}") from exc
    actual = sha256_hex(data)
    if actual != sha256:
        raise ModelIntegrityError(f"{path}: sha256 {actual} does not match registered {sha256}")
    return data


def _metadata(metadata_path: Path) -> dict:
    try:
        doc = json.loads(metadata_path.read_bytes())
    except (OSError, ValueError) as exc:  # unreadable, a directory, not UTF-8 or not JSON
        raise ModelIntegrityError(f"cannot read model metadata {metadata_path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise ModelIntegrityError(f"model metadata {metadata_path} is not a JSON object")
    return doc


def file_model(metadata_path: Path) -> ModelInfo:
    """A :class:`ModelInfo` from a metadata JSON written by ``examples/train_digits.py``.

    Raises ModelIntegrityError naming the file if it cannot be read or lacks a field."""
    metadata_path = Path(metadata_path)
    doc = _metadata(metadata_path)
    try:
        return _file_model(metadata_path, doc)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise ModelIntegrityError(f"model metadata {metadata_path}: bad or missing {exc}") from exc


def _file_model(metadata_path: Path, doc: dict) -> ModelInfo:
    weights_path = metadata_path.parent / doc["weights_file"]
    sha = doc["sha256"]
    if not isinstance(sha, str):
        raise TypeError(f"sha256 {sha!r}")

    def load() -> MLPWeights:
        data = _verified_bytes(weights_path, sha)
        try:
            return weights_from_bytes(data)
        except InferenceError as exc:
            raise ModelIntegrityError(f"{weights_path}: {exc}") from exc

    inputs, outputs = _tensor_specs(doc["inputs"]), _tensor_specs(doc["outputs"])
    if not (_is_matrix(inputs) and _is_matrix(outputs)):
        raise ValueError("inputs/outputs: one [-1, n] tensor each")
    ref = ModelRef(str(doc["model_id"]), str(doc["version"]))
    if (problem := model_name_problem(ref.model_id, ref.version)) is not None:
        raise ValueError(f"model {problem}")
    return ModelInfo(
        ref=ref,
        sha256=sha,
        inputs=inputs,
        outputs=outputs,
        loader=load,
        description=str(doc.get("description", "")),
        path=weights_path,
    )


def _is_matrix(specs: tuple[TensorSpec, ...]) -> bool:
    return len(specs) >= 1 and len(specs[0].shape) == 2 and specs[0].shape[1] >= 1


def synthetic_model(spec: SyntheticSpec) -> ModelInfo:
    """A :class:`ModelInfo` for a synthetic MLP (weights generated on load)."""
    return ModelInfo(
        ref=spec.ref,
        sha256=spec.recipe_sha256(),
        inputs=spec.inputs,
        outputs=spec.outputs,
        loader=lambda: make_weights(spec),
        description=f"synthetic MLP, {spec.parameter_count:,} parameters, seed {spec.seed}",
    )


def digits_metadata_path(ref: ModelRef) -> Path:
    """Where the metadata JSON of a shipped digits model (one of :data:`DIGITS_REFS`) lives."""
    return MODELS_DIR / f"{ref.model_id}-{ref.version}.json"


def default_registry() -> ModelRegistry:
    """A fresh registry with the shipped digits classifiers and the default synthetic models."""
    infos = [file_model(digits_metadata_path(ref)) for ref in DIGITS_REFS]
    infos += [synthetic_model(spec) for spec in DEFAULT_SYNTHETIC]
    return ModelRegistry(tuple(infos))


def load_digits_holdout() -> tuple[np.ndarray, np.ndarray]:
    """The shipped held-out digits: (inputs float32 [n, 64] in [0, 1], labels int64 [n]).

    Held out for every model in :data:`DIGITS_REFS` (they share one training split)."""
    doc = _metadata(digits_metadata_path(DIGITS_REF))
    data = _verified_bytes(MODELS_DIR / doc["heldout_file"], doc["heldout_sha256"])
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        pixels, labels = archive["pixels"], archive["labels"]
    return pixels.astype(np.float32) / np.float32(16.0), labels.astype(np.int64)
