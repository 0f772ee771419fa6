"""Atomic checkpoints: a kill at any moment leaves the previous one loadable.

Layout under ``$ORCH_RUN_DIR/checkpoints/``::

    step-00000010/
        model.safetensors        tree_flatten(model.parameters())
        optimizer.safetensors    tree_flatten(optimizer.state)   (Adam's m, v, step, lr)
        state.json               step, epoch, offset, seed, world size, hparams, file sizes
    latest.json                  {"format": 1, "step": 10, "path": "step-00000010"}

How a checkpoint is written (only by rank 0):

1. everything goes into a fresh ``.tmp-step-...`` directory; each file is
   fsynced, ``state.json`` (which lists every file with its size) last, then
   the directory itself is fsynced;
2. the directory is renamed to ``step-XXXXXXXX`` (atomic on POSIX) and the
   parent fsynced;
3. ``latest.json`` is written to a temp file, fsynced and renamed over the
   old one, and the parent fsynced again;
4. old checkpoints beyond ``keep`` are renamed away, then deleted — only
   checkpoints *this run* wrote: ``state.json`` records the writer's run id
   (``$ORCH_RUN_ID``, the same for every attempt of one ``orch run``; else one
   per process), and pruning never touches a checkpoint with another id or
   none, so a run continued in an old run directory, or a second writer,
   never loses another run's checkpoints to ``--keep-checkpoints``.

Every fsync is ``F_FULLFSYNC`` where the platform has it: on macOS ``fsync``
only hands the data to the drive, whose cache can still lose it on power
loss, which would break the guarantee below.

So a ``step-*`` directory either does not exist or is complete, and
``latest.json`` only ever names a directory that was complete when it was
written. Readers still *validate* (state.json parses, every listed file exists
with its size) and fall back to the newest complete checkpoint, which covers a
manifest lost in a crash, a checkpoint half-deleted by pruning, or files
damaged later.

Discovery and validation need no MLX; only :func:`save` and :func:`load` import it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator import protocol

FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "latest.json"
STATE_FILE = "state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
DEFAULT_RUN_DIR = Path("runs") / "local"

_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
RUN_ID_FIELD = "run_id"
_PROCESS_RUN_ID = uuid.uuid4().hex  # a writer started without orch is its own run


def current_run_id() -> str:
    """Who is writing: ``$ORCH_RUN_ID`` (set by the controller for the whole run), else this process."""
    return os.environ.get(protocol.ENV_RUN_ID) or _PROCESS_RUN_ID


class CheckpointError(Exception):
    """A checkpoint is incomplete, damaged, or cannot be found."""


def run_dir() -> Path:
    """Where this run writes: ``$ORCH_RUN_DIR`` (set by the launcher) or ``./runs/local``."""
    return Path(os.environ.get(protocol.ENV_RUN_DIR) or DEFAULT_RUN_DIR)


def checkpoints_dir(base: Path | None = None) -> Path:
    return (base if base is not None else run_dir()) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: dict  # the parsed state.json

    @property
    def step(self) -> int:
        return int(self.state["step"])


# ----------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync(fd: int) -> None:
    """Make ``fd``'s data durable: ``F_FULLFSYNC`` (macOS: through the drive's cache), else ``fsync``."""
    full = getattr(fcntl, "F_FULLFSYNC", None)
    if full is not None:
        try:
            fcntl.fcntl(fd, full)
            return
        except OSError:  # a filesystem without it (some network or FUSE mounts): fsync is the best there is
            pass
    os.fsync(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes renames and new entries durable; not supported everywhere.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        _sync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers see either the old or the new file, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; readers (the controller, ssh) expect the usual mode
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1, sort_keys=True)
            fh.flush()
            _sync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(root: Path, step: int, model_arrays: dict, optimizer_arrays: dict, meta: dict, keep: int = 0) -> Path:
    """Write one checkpoint atomically under ``root`` and return its directory.

    ``model_arrays`` / ``optimizer_arrays`` are flat ``{name: mx.array}`` dicts
    (``dict(tree_flatten(...))``); ``meta`` is JSON-able training state.
    """
    import mlx.core as mx

    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{final.name}.", dir=root))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        sizes = {}
        for name, arrays in ((MODEL_FILE, model_arrays), (OPTIMIZER_FILE, optimizer_arrays)):
            mx.save_safetensors(str(tmp / name), arrays)
            _fsync_file(tmp / name)
            sizes[name] = (tmp / name).stat().st_size
        state = {RUN_ID_FIELD: current_run_id(), **meta, "format": FORMAT_VERSION, "step": step, "files": sizes}
        with open(tmp / STATE_FILE, "w") as fh:
            json.dump(state, fh, indent=1, sort_keys=True)
            fh.flush()
            _sync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # The same step written again (e.g. a fresh run in an old run dir): move the old one aside first.
            _remove_dir(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_json_atomic(root / MANIFEST, {"format": FORMAT_VERSION, "step": step, "path": final.name})
    if keep > 0:
        prune(root, keep, protect=final, run_id=state[RUN_ID_FIELD])
    return final


def _remove_dir(path: Path) -> None:
    """Rename away first so a kill mid-delete never leaves a half-deleted ``step-*`` directory."""
    trash = path.with_name(f"{_TRASH_PREFIX}{path.name}.{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: int, protect: Path | None = None, run_id: str | None = None) -> None:
    """Delete all but the ``keep`` newest of the step directories that run ``run_id`` (default: this run) wrote.

    A checkpoint whose ``state.json`` names another run, or none, or cannot be
    read, is not this run's to delete.
    """
    run_id = run_id or current_run_id()
    mine = [p for p in step_dirs(root) if _writer(p) == run_id]
    for path in mine[keep:]:
        if protect is not None and path == protect:
            continue
        _remove_dir(path)


def _writer(path: Path) -> str | None:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    writer = state.get(RUN_ID_FIELD) if isinstance(state, dict) else None
    return writer if isinstance(writer, str) else None


def clean_stale(root: Path) -> None:
    """Remove leftovers of writers that were killed (temp and trash directories/files)."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- finding and validating


def step_dirs(root: Path) -> list[Path]:
    """``step-*`` directories under ``root``, newest (highest step) first; no validation."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            found.append((int(m.group(1)), entry))
    return [p for _, p in sorted(found, reverse=True)]


def validate(path: Path) -> Checkpoint:
    """Return the checkpoint at ``path`` or raise :class:`CheckpointError` saying what is wrong."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {STATE_FILE}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: {STATE_FILE} is not a format-{FORMAT_VERSION} checkpoint state")
    files = state.get("files")
    if not isinstance(files, dict) or set(files) != {MODEL_FILE, OPTIMIZER_FILE}:
        raise CheckpointError(f"{path}: {STATE_FILE} does not list the checkpoint files")
    for name, size in files.items():
        try:
            actual = (path / name).stat().st_size
        except OSError:
            raise CheckpointError(f"{path}: missing {name}") from None
        if actual != size:
            raise CheckpointError(f"{path}: {name} has {actual} bytes, expected {size}")
    return Checkpoint(path=path, state=state)


def read_manifest(root: Path) -> Path | None:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        name = manifest["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(name, str) or not _STEP_DIR.match(name):
        return None
    return root / name


def latest_complete(root: Path) -> Checkpoint | None:
    """The checkpoint ``latest.json`` names if it is complete, else the newest complete one."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def complete_checkpoints(root: Path) -> list[Checkpoint]:
    """Every complete checkpoint under ``root``, newest first (manifest target first)."""
    manifest_target = read_manifest(root)
    seen, result = set(), []
    for path in ([manifest_target] if manifest_target else []) + step_dirs(root):
        if path in seen:
            continue
        seen.add(path)
        try:
            result.append(validate(path))
        except CheckpointError:
            pass
    return result


def resolve_resume(arg: str, base: Path | None = None) -> list[Checkpoint]:
    """Candidates for ``--resume ARG``, best first; empty if there is nothing to resume from.

    ``ARG`` is ``latest`` (the run dir's checkpoints), a checkpoint directory
    (must be complete: an explicit choice is never silently replaced), a
    ``checkpoints/`` directory, or a run directory.
    """
    from orchestrator.runtime.config import RESUME_LATEST

    if arg == RESUME_LATEST:
        return complete_checkpoints(checkpoints_dir(base))
    path = Path(arg)
    if (path / STATE_FILE).exists():
        return [validate(path)]
    if not path.exists():
        raise CheckpointError(f"--resume {arg}: no such file or directory")
    if (path / CHECKPOINTS_DIR).is_dir():
        path = path / CHECKPOINTS_DIR
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"--resume {arg}: no complete checkpoint there")
    return found


# ----------------------------------------------------------------------------- loading


def load(ckpt: Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(model_arrays, optimizer_arrays)`` as flat dicts of ``mx.array``."""
    import mlx.core as mx

    try:
        model = mx.load(str(ckpt.path / MODEL_FILE))
        optimizer = mx.load(str(ckpt.path / OPTIMIZER_FILE))
    except Exception as e:  # MLX raises RuntimeError/ValueError for damaged files
        raise CheckpointError(f"{ckpt.path}: cannot load arrays: {e}") from e
    return model, optimizer
