"""The shipped, trained digits classifiers: accuracy, integrity, and reproducibility of their data.

Every test that concerns one model runs over all of :data:`DIGITS_REFS`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from meshinfer.inference.base import ModelRef
from meshinfer.inference.mlp import weights_to_bytes
from meshinfer.inference.numpy_engine import NumpyEngine
from meshinfer.inference.registry import (
    DIGITS_REF,
    DIGITS_REFS,
    MODELS_DIR,
    ModelIntegrityError,
    ModelRegistry,
    default_registry,
    digits_metadata_path,
    file_model,
    load_digits_holdout,
)

ROOT = Path(__file__).resolve().parents[1]
each_model = pytest.mark.parametrize("ref", DIGITS_REFS, ids=str)


def load_training_script():
    """Import examples/train_digits.py as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location("train_digits", ROOT / "examples/train_digits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while defining classes
    spec.loader.exec_module(module)
    return module


def metadata_of(ref: ModelRef) -> dict:
    return json.loads(digits_metadata_path(ref).read_text())


def split_seed_of(doc: dict) -> int:
    """The split's random_state; digits-mlp@1 records it as its training seed."""
    return doc["training"].get("split_seed", doc["training"]["seed"])


@each_model
async def test_heldout_accuracy_is_at_least_95_percent(ref: ModelRef) -> None:
    inputs, labels = load_digits_holdout()
    assert inputs.shape == (360, 64) and labels.shape == (360,)
    assert 0.0 <= inputs.min() and inputs.max() <= 1.0
    async with NumpyEngine() as engine:
        await engine.load(ref)
        probs = await engine.infer(ref, inputs)
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(metadata_of(ref)["heldout_accuracy"], abs=1e-6)


def test_heldout_covers_every_class() -> None:
    _, labels = load_digits_holdout()
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 360 and counts.min() >= 35  # stratified: ~36 per digit


@each_model
def test_metadata_hash_matches_the_weights_file(ref: ModelRef) -> None:
    doc = metadata_of(ref)
    weights_file = MODELS_DIR / doc["weights_file"]
    assert hashlib.sha256(weights_file.read_bytes()).hexdigest() == doc["sha256"]
    heldout_file = MODELS_DIR / doc["heldout_file"]
    assert hashlib.sha256(heldout_file.read_bytes()).hexdigest() == doc["heldout_sha256"]
    info = file_model(digits_metadata_path(ref))
    assert info.ref == ref and info.sha256 == doc["sha256"]
    assert info.inputs[0].shape == (-1, 64) and info.outputs[0].shape == (-1, 10)
    assert default_registry().get(ref).sha256 == doc["sha256"]


@each_model
def test_weights_match_the_recorded_architecture(ref: ModelRef) -> None:
    doc = metadata_of(ref)
    layers = file_model(digits_metadata_path(ref)).load_weights().layers
    widths = [layers[0].weight.shape[0]] + [layer.weight.shape[1] for layer in layers]
    assert widths == doc["architecture"]["sizes"]


def test_models_are_distinct_and_share_one_heldout_split() -> None:
    docs = [metadata_of(ref) for ref in DIGITS_REFS]
    assert len({doc["sha256"] for doc in docs}) == len(DIGITS_REFS)
    assert len({(doc["heldout_file"], doc["heldout_sha256"]) for doc in docs}) == 1
    assert len({split_seed_of(doc) for doc in docs}) == 1
    assert len({doc["training"]["test_fraction"] for doc in docs}) == 1


@each_model
def test_weights_file_is_canonical(ref: ModelRef) -> None:
    """Re-serialising the loaded weights reproduces the file byte for byte."""
    info = file_model(digits_metadata_path(ref))
    assert weights_to_bytes(info.load_weights()) == info.path.read_bytes()


@each_model
async def test_corrupted_weights_file_is_refused(ref: ModelRef, tmp_path: Path) -> None:
    metadata = digits_metadata_path(ref)
    weights_name = metadata_of(ref)["weights_file"]
    for name in (metadata.name, weights_name):
        shutil.copy(MODELS_DIR / name, tmp_path / name)
    weights_path = tmp_path / weights_name
    data = bytearray(weights_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights_path.write_bytes(bytes(data))
    registry = ModelRegistry((file_model(tmp_path / metadata.name),))
    async with NumpyEngine(registry) as engine:
        with pytest.raises(ModelIntegrityError, match="sha256"):
            await engine.load(ref)
        assert not engine.is_loaded(ref)


@each_model
def test_missing_weights_file_is_refused(ref: ModelRef, tmp_path: Path) -> None:
    metadata = digits_metadata_path(ref)
    shutil.copy(metadata, tmp_path / metadata.name)
    with pytest.raises(ModelIntegrityError, match="cannot read"):
        file_model(tmp_path / metadata.name).load_weights()


@each_model
def test_shipped_heldout_equals_the_training_split(ref: ModelRef) -> None:
    pytest.importorskip("sklearn", reason="scikit-learn (dev extra) re-derives the split")
    script = load_training_script()
    x_train, _, x_test, y_test = script.load_split(split_seed_of(metadata_of(ref)))
    inputs, labels = load_digits_holdout()
    np.testing.assert_array_equal(labels, y_test)
    np.testing.assert_array_equal(inputs, script.scale_pixels(x_test))
    assert len(x_train) + len(x_test) == 1797  # the whole data set, nothing else


@each_model
def test_training_recipe_matches_the_shipped_metadata(ref: ModelRef) -> None:
    """The script's recipe for ``ref`` is what the shipped metadata says was trained."""
    script = load_training_script()
    recipe = script.recipe_named(str(ref))
    doc = metadata_of(ref)
    assert list(recipe.config.sizes) == doc["architecture"]["sizes"]
    assert (
        script.metadata(recipe, doc["sha256"], doc["heldout_sha256"], 1.0, 360)["training"]
        == doc["training"]
    )


@each_model
def test_training_is_reproducible_from_its_seed(ref: ModelRef) -> None:
    """Two short runs with one seed give identical weight bytes; another seed does not."""
    script = load_training_script()
    sizes = script.recipe_named(str(ref)).config.sizes
    inputs, labels = load_digits_holdout()  # a small training set that needs no scikit-learn

    def run(seed: int) -> str:
        config = script.TrainConfig(seed=seed, epochs=2, sizes=sizes)
        return hashlib.sha256(weights_to_bytes(script.train(inputs, labels, config))).hexdigest()

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_training_script_writes_a_loadable_model_and_the_shipped_heldout(tmp_path: Path) -> None:
    """One short run of the CLI: the held-out set it writes is the shipped one, byte for byte,
    and the metadata it writes describes the weights file next to it."""
    pytest.importorskip("sklearn", reason="scikit-learn (dev extra) re-derives the split")
    script = load_training_script()
    script.main(["--model", "digits-mlp-wide@1", "--epochs", "1", "--out", str(tmp_path)])
    shipped = MODELS_DIR / "digits-mlp-heldout.npz"
    assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
    info = file_model(tmp_path / "digits-mlp-wide-1.json")
    assert info.ref == ModelRef("digits-mlp-wide", "1")
    assert info.load_weights().layers[0].weight.shape == (64, 256)
    assert not (tmp_path / "digits-mlp-1.json").exists()  # --model trains that one only


def test_digits_ref_is_the_first_shipped_model() -> None:
    assert DIGITS_REFS[0] == DIGITS_REF == ModelRef("digits-mlp", "1")
