"""Hyper-parameters: a plain dataclass, parsed from the command line.

Every recipe subclasses :class:`Hparams` and adds its own fields; every field
becomes a flag (``batch_size`` -> ``--batch-size``), so ``orch run recipe.py --
--steps 200 --lr 3e-4`` and ``python recipe.py --steps 200`` both work.

Why a dataclass + argparse and not pydantic: this runs at start-up on every
rank, and importing pydantic costs ~0.2 s per process. The field types we
support are the ones a command line can carry: ``int``, ``float``, ``str``,
``bool`` (``--flag`` / ``--no-flag``) and ``Optional`` of those.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, TypeVar

OPTIMIZERS = ("sgd", "adam", "adamw")

# Dtypes gradients may travel in for the all-reduce (``--grad-dtype``); names as in ``mlx.core``.
GRAD_DTYPES = ("float32", "bfloat16", "float16")

# --balance: equal per-rank batches, or shares proportional to each rank's speed (runtime/balance.py).
BALANCE_MODES = ("none", "speed")

# --quiet-wait: ranks sharing a machine wait for each other asleep before the all-reduce (runtime/quiet_wait.py).
QUIET_WAIT_MODES = ("auto", "on", "off")

# --shard: what each rank keeps 1/N of (runtime/shard.py); "optimizer" is --shard-optimizer (ZeRO-1).
SHARD_STAGES = ("none", "optimizer", "full", "auto")

# Value of --resume given without a path: the newest complete checkpoint.
RESUME_LATEST = "latest"


@dataclass
class Hparams:
    """The flags every recipe gets. Subclass it and change defaults or add fields."""

    steps: int = field(default=100, metadata={"help": "total optimizer steps (a resumed run continues up to this)"})
    batch_size: int = field(default=32, metadata={"help": "samples per rank per micro-batch"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    optimizer: str = field(
        default="adam", metadata={"help": "sgd | adam | adamw (used by optimizer_from)", "choices": OPTIMIZERS}
    )
    seed: int = field(default=0, metadata={"help": "seeds model init, data order and per-step randomness"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches accumulated per optimizer step"})
    checkpoint_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=3, metadata={"help": "complete checkpoints kept (0: keep all)"})
    stats_every: int = field(default=50, metadata={"help": "memory sample every N steps (0: only at the end)"})
    log_every: int = field(
        default=0, metadata={"help": "human progress line every N steps (0: about 10 lines per run)"}
    )
    eval_every: int = field(
        default=0, metadata={"help": "run the recipe's evaluate every N steps (0: only at the end)"}
    )
    resume: Optional[str] = field(
        default=None,
        metadata={
            "help": "resume from a checkpoint; without a value: the newest complete one in the run dir",
            "nargs": "?",
            "const": RESUME_LATEST,
        },
    )
    grad_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype gradients travel in for the all-reduce (half the bytes with bfloat16); "
                    "accumulation and the update stay float32",
            "choices": GRAD_DTYPES,
        },
    )
    shard_optimizer: bool = field(
        default=False,
        metadata={"help": "ZeRO-1: each rank keeps the optimizer state of 1/N of the parameters, "
                          "updates that slice and all-gathers the result"},
    )
    shard: str = field(
        default="none",
        metadata={"help": "full: parameters, gradients and optimizer state 1/N per rank (FSDP through "
                          "nn.fully_shard, layer by layer); optimizer: the same as --shard-optimizer; auto: "
                          "the least of none/optimizer/full whose predicted peak fits every rank's budget",
                  "choices": SHARD_STAGES},
    )
    balance: str = field(
        default="none",
        metadata={"help": "speed: each rank's share of the global batch proportional to its measured speed "
                          "(the global batch, world x --batch-size x --grad-accum, and the update stay the same)",
                  "choices": BALANCE_MODES},
    )
    quiet_wait: str = field(
        default="off",
        metadata={"help": "ranks that share a machine wait for its slowest one asleep before each all-reduce, instead "
                          "of spinning in the collective on cores that rank needs; auto: under orch run",
                  "choices": QUIET_WAIT_MODES},
    )
    memory_check: bool = field(
        default=True,
        metadata={"help": "before the first step, predict each rank's peak memory from two small probe steps and "
                          "refuse (one line) a batch that does not fit its host's budget"},
    )
    fit_memory: bool = field(
        default=False,
        metadata={"help": "instead of refusing, shrink that rank's micro-batch and accumulate more pieces "
                          "(the global batch and the result stay the same)"},
    )
    keep_freed_memory: bool = field(
        default=True,
        metadata={"help": "Linux/glibc: keep freed buffers for the next step instead of returning them to the "
                          "kernel (what Metal's buffer cache does on macOS; saves page faults, keeps peak RSS)"},
    )
    balance_every: int = field(default=10, metadata={"help": "--balance speed: re-check the speeds every N steps"})
    balance_warmup: int = field(
        default=3, metadata={"help": "--balance speed: steps measured (after the first) before the first split"}
    )
    balance_threshold: float = field(
        default=0.1,
        metadata={"help": "--balance speed: re-balance only if the predicted step time drops by more than this fraction"},
    )

H = TypeVar("H", bound=Hparams)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_optional) for an annotation like ``int`` or ``Optional[float]``."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union or (args and type(None) in args):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return tp, False


class _OneLineParser(argparse.ArgumentParser):
    """A recipe's bad argument is one line (with a did-you-mean) and exit 2, not the usage text.

    Every rank parses the same arguments, so a typo after ``orch run recipe.py --`` printed argparse's
    usage once per rank (80 lines at 3 ranks) before the error itself.
    """

    def error(self, message: str):
        import difflib

        hint = ""
        if message.startswith("unrecognized arguments:"):
            known = [o for o in self._option_string_actions if o.startswith("--")]
            wrong = [w.split("=", 1)[0] for w in message.split(":", 1)[1].split() if w.startswith("--")]
            close = [m for w in wrong for m in difflib.get_close_matches(w, known, n=1, cutoff=0.6)]
            hint = f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message}{hint}\n")


class BadHparams(SystemExit):
    """Bad input: its one line on stderr, exit code 2 (like an unknown option), never a traceback."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def build_parser(cls: type[Hparams], prog: str | None = None) -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=prog, description=(cls.__doc__ or "").strip() or None)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, _optional = _scalar_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        help_text = f.metadata.get("help", "")
        kwargs["help"] = f"{help_text} (default: {default!r})" if help_text else f"default: {default!r}"
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            if tp not in (int, float, str):
                raise TypeError(f"hparam {f.name!r}: type {tp!r} cannot come from a command line")
            kwargs["type"] = tp
            for key in ("nargs", "const", "choices"):
                if key in f.metadata:
                    kwargs[key] = f.metadata[key]
        parser.add_argument(flag_name(f.name), **kwargs)
    return parser


def parse_hparams(cls: type[H], argv: Sequence[str] | None = None, prog: str | None = None) -> H:
    """Parse ``argv`` (default ``sys.argv[1:]``) into an instance of ``cls``.

    A leading ``--`` is dropped so the arguments after ``orch run recipe.py --``
    can be passed through verbatim.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    ns = build_parser(cls, prog=prog).parse_args(args)
    hp = cls(**vars(ns))
    validate(hp)
    return hp


def validate(hp: Hparams) -> None:
    problems = []
    if hp.steps < 0:
        problems.append("--steps must be >= 0")
    if hp.batch_size < 1:
        problems.append("--batch-size must be >= 1")
    if hp.grad_accum < 1:
        problems.append("--grad-accum must be >= 1")
    if hp.balance_every < 1:
        problems.append("--balance-every must be >= 1")
    if hp.balance_warmup < 1:
        problems.append("--balance-warmup must be >= 1")
    if not 0.0 <= hp.balance_threshold < 1.0:
        problems.append("--balance-threshold must be in [0, 1)")
    for name in ("checkpoint_every", "keep_checkpoints", "stats_every", "log_every", "eval_every"):
        if getattr(hp, name) < 0:
            problems.append(f"{flag_name(name)} must be >= 0")
    if hp.shard == "optimizer":
        hp.shard_optimizer = True
    elif hp.shard in ("full", "auto") and hp.shard_optimizer:
        problems.append(f"--shard {hp.shard} already shards the optimizer state (or may): drop --shard-optimizer")
    if hp.shard in ("full", "auto") and hp.balance != "none":
        problems.append(f"--shard {hp.shard}: full sharding reduces gradients inside the backward pass, before "
                        "--balance could weight them: drop --balance")
    if hp.shard in ("full", "auto") and hp.grad_dtype != "float32":
        problems.append(f"--shard {hp.shard}: full sharding reduce-scatters gradients in their own dtype: "
                        "drop --grad-dtype")
    if problems:
        message = "invalid hyper-parameters: " + "; ".join(problems)
        print(message, file=sys.stderr, flush=True)  # SystemExit prints nothing for an int code
        raise BadHparams(message)


def to_dict(hp: Hparams) -> dict:
    return dataclasses.asdict(hp)
