"""The base of orch's pydantic models: each model's validator is built when it is first used.

Pydantic builds a model's validator and serializer when the class is created, ~1-5 ms
each. Creating all of orch's models at import cost a trivial ``orch run -n 2`` ~40 ms
before its ranks got their configuration, for models that run never touches (the
Thunderbolt planner's, ``orch stage``'s, most of the summary's until the run ends).
``defer_build`` moves that work to a model's first validation or dump, where
only the models a command really uses pay for themselves.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Model(BaseModel):
    """``BaseModel`` built on first use; a subclass's own ``model_config`` adds to this one."""

    model_config = ConfigDict(defer_build=True)
