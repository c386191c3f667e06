"""Train the shipped digits classifiers on scikit-learn's 8x8 handwritten digits.

Three models, one held-out set (the digits stand in for a camera-frame classifier):

* ``digits-mlp@1``       64 -> 128 -> 64 -> 10
* ``digits-mlp-wide@1``  64 -> 256 -> 10
* ``digits-mlp-deep@1``  64 -> 96 -> 96 -> 10

All three train on the same stratified split (random_state ``SPLIT_SEED``), so the shipped
held-out set is held out for every one of them and they can be ensembled honestly. Each model
has its own training seed. Training is plain NumPy (mini-batch Adam, float64 maths, float32
export): the same seed on the same machine gives a byte-identical weights file. scikit-learn is
needed here only for the bundled data set and the split; the runtime never imports it.

It writes ``<id>-<version>.npz`` (weights), ``<id>-<version>.json`` (metadata: the registry's
model file, with the held-out accuracy it prints) and ``digits-mlp-heldout.npz`` into ``--out``
(default: the shipped models' folder), each file replaced atomically. A file already there is
refused before any training, unless ``--force``:

    python examples/train_digits.py --force         # rewrite meshinfer/inference/models/*
    python examples/train_digits.py --model digits-mlp-wide@1 --out /tmp/m --seed 7
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from meshinfer.atomic_files import replace_file
from meshinfer.inference.mlp import (
    MLPWeights,
    forward,
    npz_bytes,
    save_weights,
    sha256_hex,
)

MODEL_ID = "digits-mlp"
MODEL_VERSION = "1"
SIZES = (64, 128, 64, 10)
DEFAULT_SEED = 20250
SPLIT_SEED = DEFAULT_SEED  # digits-mlp@1 was split with its own training seed; all share it
TEST_FRACTION = 0.2
HELDOUT_FILE = f"{MODEL_ID}-heldout.npz"
DESCRIPTION = "8x8 handwritten-digit classifier (stand-in for a camera-frame classifier)"
MODELS_DIR = Path(__file__).resolve().parents[1] / "meshinfer" / "inference" / "models"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (``sizes``: layer widths, input first)."""

    seed: int = DEFAULT_SEED
    epochs: int = 80
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    sizes: tuple[int, ...] = SIZES


@dataclass(frozen=True)
class Recipe:
    """One shipped model: its registry id and version, and how it is trained."""

    model_id: str
    version: str
    config: TrainConfig = field(default_factory=TrainConfig)
    description: str = DESCRIPTION

    @property
    def name(self) -> str:
        """``id@version``, as the registry prints a ModelRef."""
        return f"{self.model_id}@{self.version}"

    @property
    def stem(self) -> str:
        """File name stem of the weights and metadata files."""
        return f"{self.model_id}-{self.version}"


RECIPES = (
    Recipe(MODEL_ID, MODEL_VERSION),
    Recipe(
        "digits-mlp-wide",
        "1",
        TrainConfig(seed=20251, sizes=(64, 256, 10)),
        DESCRIPTION + ", one wide hidden layer",
    ),
    Recipe(
        "digits-mlp-deep",
        "1",
        TrainConfig(seed=20252, sizes=(64, 96, 96, 10)),
        DESCRIPTION + ", two narrower hidden layers",
    ),
)


def recipe_named(name: str) -> Recipe:
    """The recipe whose ``id@version`` is ``name``. Raises KeyError naming the known ones."""
    for recipe in RECIPES:
        if recipe.name == name:
            return recipe
    raise KeyError(f"unknown model {name!r}; known: {', '.join(r.name for r in RECIPES)}")


def load_split(seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Stratified split of the digits: (X_train, y_train, X_test, y_test), X as uint8 0..16."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.data.astype(np.uint8)
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        pixels, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    return x_tr, y_tr, x_te, y_te


def scale_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixel intensities 0..16 -> float32 in [0, 1], the model's input."""
    return (pixels.astype(np.float32) / np.float32(16.0)).astype(np.float32)


def init_params(rng: np.random.Generator, sizes: tuple[int, ...] = SIZES) -> list[np.ndarray]:
    """He-initialised weights and zero biases, [W0, b0, W1, b1, ...], float64."""
    params: list[np.ndarray] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        params.append(rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in))
        params.append(np.zeros(fan_out))
    return params


def gradients(params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Gradients of the mean cross-entropy over the mini-batch (x, y)."""
    activations = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(h, 0.0)
        activations.append(h)
    logits = activations[-1]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    delta = probs
    delta[np.arange(len(y)), y] -= 1.0
    delta /= len(y)
    grads: list[np.ndarray] = [np.empty(0)] * len(params)
    for i in reversed(range(n_layers)):
        grads[2 * i] = activations[i].T @ delta
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = (delta @ params[2 * i].T) * (activations[i] > 0)
    return grads


def train(x: np.ndarray, y: np.ndarray, config: TrainConfig) -> MLPWeights:
    """Adam on mini-batches, shuffled by a generator seeded with ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    params = init_params(rng, config.sizes)
    first = [np.zeros_like(p) for p in params]
    second = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step = 0
    x = x.astype(np.float64)
    for _ in range(config.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            step += 1
            grads = gradients(params, x[idx], y[idx])
            for p, g, m, v in zip(params, grads, first, second, strict=True):
                g = g + config.weight_decay * p
                m *= beta1
                m += (1 - beta1) * g
                v *= beta2
                v += (1 - beta2) * g * g
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                p -= config.learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    pairs = zip(params[0::2], params[1::2], strict=True)
    return MLPWeights.from_arrays(pairs)


def accuracy(weights: MLPWeights, x: np.ndarray, y: np.ndarray) -> float:
    """Share of samples whose arg-max class equals the label."""
    return float(np.mean(forward(weights, x).argmax(axis=1) == y))


def _training_doc(config: TrainConfig) -> dict:
    doc = {
        "seed": config.seed,
        "epochs": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "weight_decay": config.weight_decay,
        "optimizer": "adam",
        "test_fraction": TEST_FRACTION,
        "split": "sklearn.model_selection.train_test_split(stratify=y, random_state=seed)",
    }
    if config.seed != SPLIT_SEED:  # digits-mlp@1's document predates split_seed; keep it as is
        doc["split"] = (
            "sklearn.model_selection.train_test_split(stratify=y, random_state=split_seed)"
        )
        doc["split_seed"] = SPLIT_SEED
    return doc


def metadata(recipe: Recipe, sha: str, holdout_sha: str, acc: float, n_test: int) -> dict:
    """The model's metadata document (shipped next to the weights as JSON)."""
    sizes = recipe.config.sizes
    return {
        "model_id": recipe.model_id,
        "version": recipe.version,
        "description": recipe.description,
        "weights_file": f"{recipe.stem}.npz",
        "sha256": sha,
        "inputs": [{"name": "pixels", "dtype": "float32", "shape": [-1, sizes[0]]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, sizes[-1]]}],
        "input_scaling": "pixel / 16 (raw digits pixels are 0..16)",
        "architecture": {"sizes": list(sizes), "hidden_activation": "relu", "output": "softmax"},
        "training": _training_doc(recipe.config),
        "heldout_file": HELDOUT_FILE,
        "heldout_sha256": holdout_sha,
        "heldout_samples": n_test,
        "heldout_accuracy": round(acc, 6),
    }


def write_heldout(out: Path, x_test: np.ndarray, y_test: np.ndarray) -> str:
    """Write the held-out set (raw uint8 pixels and labels); return its sha256."""
    holdout = npz_bytes({"pixels": x_test, "labels": y_test.astype(np.uint8)})
    replace_file(out / HELDOUT_FILE, holdout)
    return sha256_hex(holdout)


def build(recipe: Recipe, split: tuple, out: Path, holdout_sha: str) -> tuple[float, str]:
    """Train ``recipe`` on ``split``'s training part, write weights and metadata to ``out``;
    return (held-out accuracy, weights sha256)."""
    x_tr, y_tr, x_te, y_te = split
    weights = train(scale_pixels(x_tr), y_tr, recipe.config)
    acc = accuracy(weights, scale_pixels(x_te), y_te)
    sha = save_weights(weights, out / f"{recipe.stem}.npz")
    doc = metadata(recipe, sha, holdout_sha, acc, len(y_te))
    replace_file(out / f"{recipe.stem}.json", (json.dumps(doc, indent=2) + "\n").encode())
    return acc, sha


def main(argv: list[str] | None = None) -> None:
    """Train the chosen models (all by default), evaluate each on the held-out split, and write
    weights, metadata and the held-out set."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[r.name for r in RECIPES], help="default: all")
    parser.add_argument("--seed", type=int, help="training seed (default: the recipe's)")
    parser.add_argument("--epochs", type=int, help="default: the recipe's")
    parser.add_argument("--out", type=Path, default=MODELS_DIR)
    parser.add_argument("--force", action="store_true", help="replace files already in --out")
    args = parser.parse_args(argv)
    recipes = [recipe_named(args.model)] if args.model else list(RECIPES)
    outputs = [HELDOUT_FILE] + [f"{r.stem}{ext}" for r in recipes for ext in (".npz", ".json")]
    existing = [name for name in outputs if (args.out / name).exists()]
    if existing and not args.force:
        parser.error(f"{args.out} already holds {', '.join(existing)}; use --force to replace")
    split = load_split(SPLIT_SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    holdout_sha = write_heldout(args.out, split[2], split[3])
    for recipe in recipes:
        overrides = {"seed": args.seed, "epochs": args.epochs}
        config = replace(recipe.config, **{k: v for k, v in overrides.items() if v is not None})
        acc, sha = build(replace(recipe, config=config), split, args.out, holdout_sha)
        print(f"{recipe.name}: held-out accuracy {acc:.4f} on {len(split[3])} samples")
        print(f"  sha256 {sha}")


if __name__ == "__main__":
    main()
