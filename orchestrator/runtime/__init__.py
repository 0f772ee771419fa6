"""What runs inside every trainer rank. Recipes import from here::

    from orchestrator.runtime import Hparams, Recipe, optimizer_from, run

Importing this package is cheap: names are resolved on first use, so MLX is
imported only when a recipe touches ``Recipe``/``run`` (which need it), and
pydantic never is. This package never imports the controller side of
``orchestrator``; ``orchestrator.protocol`` is the only shared module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS = {
    "Recipe": "trainer",
    "RunResult": "trainer",
    "Trainer": "trainer",
    "run": "trainer",
    "optimizer_from": "trainer",
    "init_group": "trainer",
    "Hparams": "config",
    "parse_hparams": "config",
    "ArrayDataset": "data",
    "Dataset": "data",
    "train_test_split": "data",
    "emit": "events",
}

__all__ = [
    "ArrayDataset", "Dataset", "Hparams", "Recipe", "RunResult", "Trainer",
    "emit", "init_group", "optimizer_from", "parse_hparams", "run", "train_test_split",
]
assert sorted(__all__) == sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and IDEs only
    from orchestrator.runtime.config import Hparams, parse_hparams
    from orchestrator.runtime.data import ArrayDataset, Dataset, train_test_split
    from orchestrator.runtime.events import emit
    from orchestrator.runtime.trainer import Recipe, RunResult, Trainer, init_group, optimizer_from, run


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'orchestrator.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"orchestrator.runtime.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
