"""Synthetic MLPs with seeded random weights, for throughput benchmarks and engine tests.

A synthetic model is ``synthetic-mlp`` at version ``w{width}-d{depth}`` (e.g. ``w4096-d8``):
``depth`` hidden ReLU layers of ``width`` units on a ``width``-wide input, then ``classes``
outputs through a softmax. The weights are a pure function of (width, depth, classes, seed), so
the model's hash is the sha256 of that recipe: there is no file that could be corrupted. A spec
whose float32 weights would take more than ``MAX_WEIGHTS_BYTES`` (2 GiB, as a weights file may)
is refused when it is made (ValueError), before anything is allocated.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from meshinfer.inference.base import ModelRef, TensorSpec
from meshinfer.inference.mlp import MAX_WEIGHTS_BYTES, MLPWeights, sha256_hex

SYNTHETIC_MODEL_ID = "synthetic-mlp"
_VERSION = re.compile(r"^w([1-9][0-9]{0,5})-d([1-9][0-9]{0,2})$")


@dataclass(frozen=True, slots=True)
class SyntheticSpec:
    """Shape and seed of a synthetic MLP."""

    width: int
    depth: int
    classes: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1 or self.classes < 1:
            raise ValueError(f"width, depth and classes must be >= 1: {self}")
        if self.parameter_count * 4 > MAX_WEIGHTS_BYTES:  # (float32: 4 bytes a parameter)
            raise ValueError(
                f"{self.version} with {self.classes} classes takes {self.parameter_count * 4:,}"
                f" bytes of weights, more than a model may ({MAX_WEIGHTS_BYTES:,})"
            )

    @property
    def version(self) -> str:
        """The registry version string, ``w{width}-d{depth}``."""
        return f"w{self.width}-d{self.depth}"

    @property
    def ref(self) -> ModelRef:
        """The model reference under which this model is registered."""
        return ModelRef(SYNTHETIC_MODEL_ID, self.version)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """One float32 feature vector of ``width`` values per sample."""
        return (TensorSpec("features", "float32", (-1, self.width)),)

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """Class probabilities."""
        return (TensorSpec("probabilities", "float32", (-1, self.classes)),)

    @property
    def parameter_count(self) -> int:
        """Number of weights and biases."""
        hidden = self.depth * (self.width * self.width + self.width)
        return hidden + self.width * self.classes + self.classes

    def recipe_sha256(self) -> str:
        """sha256 of the canonical recipe; identifies the weights that :func:`make` produces."""
        recipe = {
            "generator": "numpy.PCG64/standard_normal/float32/v1",
            "width": self.width,
            "depth": self.depth,
            "classes": self.classes,
            "seed": self.seed,
        }
        return sha256_hex(json.dumps(recipe, sort_keys=True).encode())


def parse_version(version: str) -> tuple[int, int]:
    """``"w4096-d8"`` -> ``(4096, 8)``. Raises ValueError if the version is not of that form."""
    match = _VERSION.match(version)
    if match is None:
        raise ValueError(f"not a synthetic-mlp version (want w<width>-d<depth>): {version!r}")
    return int(match.group(1)), int(match.group(2))


def make_weights(spec: SyntheticSpec) -> MLPWeights:
    """Generate the weights: He-scaled normal hidden layers, a smaller-scaled output layer."""
    rng = np.random.default_rng(spec.seed)
    shapes = [(spec.width, spec.width)] * spec.depth + [(spec.width, spec.classes)]
    pairs = []
    for i, (fan_in, fan_out) in enumerate(shapes):
        gain = 2.0 if i < spec.depth else 1.0
        weight = rng.standard_normal((fan_in, fan_out), dtype=np.float32)
        weight *= np.float32(np.sqrt(gain / fan_in))
        bias = rng.standard_normal(fan_out, dtype=np.float32) * np.float32(0.01)
        pairs.append((weight, bias))
    return MLPWeights.from_arrays(pairs)


def sample_inputs(spec: SyntheticSpec, batch_size: int, seed: int = 1) -> np.ndarray:
    """A reproducible float32 batch of inputs in [0, 1) for ``spec``."""
    rng = np.random.default_rng(seed)
    return rng.random((batch_size, spec.width), dtype=np.float32)
