"""A tiny character-level transformer language model on a public-domain text.

The text (recipes/data/midsummer_acts_1_2.txt, see recipes/data/SOURCE.md) is
split 90/10; training samples are all windows of ``--context`` characters of
the first part, and the model is evaluated (loss, perplexity) on the last
part. Reports tokens/s: every sample is ``--context`` tokens.

    python recipes/char_lm.py
    orch run recipes/char_lm.py -n 2 -- --steps 300 --batch-size 8
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from orchestrator.runtime import Hparams, Recipe, optimizer_from, run

TEXT = Path(__file__).parent / "data" / "midsummer_acts_1_2.txt"


@dataclass
class Config(Hparams):
    # Small on purpose: MLX's CPU backend on Linux uses reference BLAS.
    steps: int = 200
    batch_size: int = 8
    lr: float = 3e-3
    context: int = 32
    dims: int = 48
    heads: int = 4
    layers: int = 2
    text: str = str(TEXT)
    val_fraction: float = 0.1


@lru_cache(maxsize=None)
def load_text(path: str, val_fraction: float):
    """(vocabulary, train token ids, validation token ids); identical on every rank."""
    text = Path(path).read_text(encoding="utf-8")
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
    split = int(len(ids) * (1 - val_fraction))
    return vocab, ids[:split], ids[split:]


class CharWindows:
    """Every window of ``context + 1`` characters; sample i is (ids[i:i+T], ids[i+1:i+T+1])."""

    def __init__(self, ids: np.ndarray, context: int):
        self.ids, self.context = ids, context
        self.offsets = np.arange(context)

    def __len__(self) -> int:
        return len(self.ids) - self.context

    def __getitem__(self, indices: np.ndarray):
        positions = np.asarray(indices)[:, None] + self.offsets
        return self.ids[positions], self.ids[positions + 1]


class Block(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dims), nn.LayerNorm(dims)
        self.attention = nn.MultiHeadAttention(dims, heads)
        self.mlp = nn.Sequential(nn.Linear(dims, 4 * dims), nn.GELU(), nn.Linear(4 * dims, dims))

    def __call__(self, x, mask):
        h = self.norm1(x)
        x = x + self.attention(h, h, h, mask)
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab_size: int, context: int, dims: int, heads: int, layers: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dims)
        self.positions = nn.Embedding(context, dims)
        self.blocks = [Block(dims, heads) for _ in range(layers)]
        self.norm = nn.LayerNorm(dims)
        self.out = nn.Linear(dims, vocab_size)

    def __call__(self, ids):
        length = ids.shape[1]
        mask = nn.MultiHeadAttention.create_additive_causal_mask(length)
        x = self.embedding(ids) + self.positions(mx.arange(length))
        for block in self.blocks:
            x = block(x, mask)
        return self.out(self.norm(x))


def build(hp: Config):
    vocab, _, _ = load_text(hp.text, hp.val_fraction)
    model = CharTransformer(len(vocab), hp.context, hp.dims, hp.heads, hp.layers)
    return model, optimizer_from(hp)


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def dataset(hp: Config):
    return CharWindows(load_text(hp.text, hp.val_fraction)[1], hp.context)


def evaluate(model, hp: Config) -> dict:
    """Mean loss over non-overlapping validation windows, and its perplexity."""
    val = load_text(hp.text, hp.val_fraction)[2]
    n = (len(val) - 1) // hp.context
    x = val[: n * hp.context].reshape(n, hp.context)
    y = val[1: n * hp.context + 1].reshape(n, hp.context)
    loss = loss_fn(model, mx.array(x), mx.array(y)).item()
    return {"val_loss": loss, "perplexity": float(np.exp(loss))}


recipe = Recipe(hparams=Config, build=build, loss=loss_fn, data=dataset, evaluate=evaluate,
                tokens_per_sample=lambda hp: hp.context)

if __name__ == "__main__":
    run(recipe)
