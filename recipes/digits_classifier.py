"""Classify scikit-learn's bundled 8x8 handwritten digits (1797 images, no download).

Trains on 80% of the images, reports accuracy on the held-out 20% at the end
(a ``metric`` event).

    python recipes/digits_classifier.py
    orch run recipes/digits_classifier.py -n 2 -- --steps 300 --batch-size 16
"""

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from orchestrator.runtime import Hparams, Recipe, optimizer_from, run, train_test_split


@dataclass
class Config(Hparams):
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    hidden: int = 64
    test_fraction: float = 0.2


@lru_cache(maxsize=None)
def load_split(seed: int, test_fraction: float):
    """((X_train, y_train), (X_test, y_test)); the split is the same on every rank."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixels are 0..16
    y = digits.target.astype(np.int32)
    train, test = train_test_split(len(x), test_fraction, seed)
    return (x[train], y[train]), (x[test], y[test])


def build(hp: Config):
    model = nn.Sequential(nn.Linear(64, hp.hidden), nn.ReLU(), nn.Linear(hp.hidden, 10))
    return model, optimizer_from(hp)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def dataset(hp: Config):
    return load_split(hp.seed, hp.test_fraction)[0]


def evaluate(model, hp: Config) -> dict:
    x, y = load_split(hp.seed, hp.test_fraction)[1]
    predictions = mx.argmax(model(mx.array(x)), axis=1)
    return {"accuracy": mx.mean(predictions == mx.array(y)).item(), "test_samples": len(y)}


recipe = Recipe(hparams=Config, build=build, loss=loss_fn, data=dataset, evaluate=evaluate)

if __name__ == "__main__":
    run(recipe)
