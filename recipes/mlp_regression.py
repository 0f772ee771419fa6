"""The smallest recipe: fit a small MLP to a synthetic regression target.

    python recipes/mlp_regression.py --steps 200
    orch run recipes/mlp_regression.py -n 2 -- --steps 200 --lr 3e-3
"""

from dataclasses import dataclass

import mlx.nn as nn
import numpy as np

from orchestrator.runtime import Hparams, Recipe, optimizer_from, run


@dataclass
class Config(Hparams):
    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    hidden: int = 32
    dropout: float = 0.0
    samples: int = 4096


class MLP(nn.Module):
    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.layers = [nn.Linear(4, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 1)]
        self.dropout = nn.Dropout(dropout)

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = self.dropout(nn.relu(layer(x)))
        return self.layers[-1](x)


def build(hp: Config):
    return MLP(hp.hidden, hp.dropout), optimizer_from(hp)


def loss_fn(model, x, y):
    return nn.losses.mse_loss(model(x), y, reduction="mean")


def dataset(hp: Config):
    """y = sin(x0) + x1*x2 - 0.5*x3^2 + noise, the same on every rank (seeded)."""
    rng = np.random.default_rng(hp.seed)
    x = rng.uniform(-2, 2, size=(hp.samples, 4)).astype(np.float32)
    y = np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3] - 0.5 * x[:, 3:4] ** 2
    y += 0.05 * rng.standard_normal(y.shape)
    return x, y.astype(np.float32)


recipe = Recipe(hparams=Config, build=build, loss=loss_fn, data=dataset)

if __name__ == "__main__":
    run(recipe)
