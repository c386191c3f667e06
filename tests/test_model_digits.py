"""The shipped, trained digits classifier: accuracy, integrity, and reproducibility of its data."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from meshinfer.inference.mlp import weights_to_bytes
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import (
    DIGITS_REF,
    MODELS_DIR,
    ModelIntegrityError,
    ModelRegistry,
    file_model,
    load_digits_holdout,
)

ROOT = Path(__file__).resolve().parents[1]
METADATA = MODELS_DIR / "digits-mlp-1.json"


def load_training_script():
    """Import examples/train_digits.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples/train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while defining classes
    spec.loader.exec_module(module)
    return module


async def test_heldout_accuracy_is_at_least_95_percent() -> None:
    inputs, labels = load_digits_holdout()
    assert inputs.shape == (360, 64) and labels.shape == (360,)
    assert 0.0 <= inputs.min() and inputs.max() <= 1.0
    async with NumpyEngine() as engine:
        await engine.load(DIGITS_REF)
        probs = await engine.infer(DIGITS_REF, inputs)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    assert accuracy >= 0.95
    recorded = json.loads(METADATA.read_text())["heldout_accuracy"]
    assert accuracy == pytest.approx(recorded, abs=1e-6)


def test_heldout_covers_every_class() -> None:
    _, labels = load_digits_holdout()
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35  # stratified: ~36 per digit


def test_metadata_hash_matches_the_weights_file() -> None:
    doc = json.loads(METADATA.read_text())
    weights_file = MODELS_DIR / doc["weights_file"]
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == doc["sha256"]
    heldout_file = MODELS_DIR / doc["heldout_file"]
    assert hashlib.sha256(heldout_file.read_bytes()).hexdigest() == doc["heldout_sha256"]
    info = file_model(METADATA)
    assert info.ref == DIGITS_REF and info.sha256 == doc["sha256"]
    assert info.inputs[0].shape == (-1, 64) and info.outputs[0].shape == (-1, 10)


def test_weights_file_is_canonical() -> None:
    """Re-serialising the loaded weights reproduces the file byte for byte."""
    info = file_model(METADATA)
    assert weights_to_bytes(info.load_weights()) == info.path.read_bytes()


async def test_corrupted_weights_file_is_refused(tmp_path: Path) -> None:
    for name in ("digits-mlp-1.json", "digits-mlp-1.npz"):
        shutil.copy(MODELS_DIR / name, tmp_path / name)
    weights_path = tmp_path / "digits-mlp-1.npz"
    data = bytearray(weights_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_path.write_bytes(bytes(data))
    registry = ModelRegistry((file_model(tmp_path / "digits-mlp-1.json"),))
    async with NumpyEngine(registry) as engine:
        with pytest.raises(ModelIntegrityError, match="sha256"):
            await engine.load(DIGITS_REF)
        assert not engine.is_loaded(DIGITS_REF)


def test_missing_weights_file_is_refused(tmp_path: Path) -> None:
    shutil.copy(METADATA, tmp_path / METADATA.name)
    with pytest.raises(ModelIntegrityError, match="cannot read"):
        file_model(tmp_path / METADATA.name).load_weights()


def test_shipped_heldout_equals_the_training_split() -> None:
    pytest.importorskip("sklearn", reason="scikit-learn (dev extra) re-derives the split")
    script = load_training_script()
    seed = json.loads(METADATA.read_text())["training"]["seed"]
    _, _, x_test, y_test = script.load_split(seed)
    inputs, labels = load_digits_holdout()
    np.testing.assert_array_equal(labels, y_test)
    np.testing.assert_array_equal(inputs, script.scale_pixels(x_test))


def test_training_is_reproducible_from_its_seed() -> None:
    """Two short runs with one seed give identical weight bytes; another seed does not."""
    script = load_training_script()
    inputs, labels = load_digits_holdout()  # a small training set that needs no scikit-learn

    def run(seed: int) -> bytes:
        config = script.TrainConfig(seed=seed, epochs=2)
        return weights_to_bytes(script.train(inputs, labels, config))

    assert run(3) == run(3)
    assert run(3) != run(4)
