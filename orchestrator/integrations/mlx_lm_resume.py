"""Exact restarts for mlx-lm's LoRA trainer: what mlx-lm does not save, orch saves beside its adapters.

Why: mlx-lm's ``--resume-adapter-file`` loads adapter weights and nothing else,
so a restarted run starts again at iteration 1 with a fresh Adam, a fresh
learning-rate schedule and a new data order (mlx-lm's own PR to save that
state was closed unmerged). Under orch the rank runs mlx-lm unchanged, but
wrapped through its public entry point ``mlx_lm.tuner.trainer.train`` (its
``iterate_batches`` parameter is the one hook needed):

* **Saving.** At each of mlx-lm's own saves (``--save-every``), right after it
  wrote ``NNNNNNN_adapters.safetensors``, rank 0 also writes an orch checkpoint
  (``runtime/checkpoint.py``'s format and steps: temp directory, fsync, rename;
  its bytes are made on the training thread, a writer thread puts them on disk,
  one save in flight, so training does not wait for fsync) into
  ``$ORCH_RUN_DIR/checkpoints/step-NNNNNNNN``: the adapter weights, the
  optimizer state (its ``step`` included, so a schedule continues), the
  iteration, MLX's random key, numpy's global random state, and where the
  training data iterator is (the numpy state its current epoch's permutation
  was drawn from, and how many batches of that epoch were taken). The hook is
  the data iterator itself: the trainer asks it for batch ``k + 1`` only after
  iteration ``k`` finished (its step evaluated, mlx-lm's save done), so the
  state is exactly "after iteration ``k``", on every rank alike.
* **Resuming.** The controller adds ``--resume`` to a restarted attempt's
  arguments when the run directory has a complete checkpoint (as for orch's own
  trainer, and for ``orch run --resume``); this module takes that word off
  before mlx-lm parses its arguments, loads the newest complete checkpoint
  that it wrote, restores all of the above and starts mlx-lm's loop at the
  iteration after it (the loop's ``range(1, iters + 1)`` starts later; every
  report, evaluation and save keeps its iteration number). Rank 0 reads the
  checkpoint; ranks that cannot read the same one on their own host (over SSH
  only rank 0's host gets it back) receive it from rank 0 through one
  ``all_sum``.
* The result, same world size: adapters bit-identical to the uninterrupted
  run. With fewer ranks (``--exclude-failed-host``) the iteration, optimizer,
  schedule and batch order continue, but each global batch is split over
  fewer ranks, so the gradient sums run in another order: close, not exact.

Only for mlx-lm versions this was verified against (``VERIFIED``): another
version runs as before, with one ``orch:`` line saying so. ``ORCH_MLX_LM_RESUME=0``
turns it off. What it cannot keep: mlx-lm's running report counters (trained
tokens, the loss averaged since the last report) restart with the attempt;
they are printed, not trained on.
"""

from __future__ import annotations

import io
import os
import sys
import threading
from typing import TYPE_CHECKING, Callable, Optional

from orchestrator import protocol
from orchestrator.integrations.mlx_lm_program import (VERIFIED, installed_version, is_lora,  # noqa: F401
                                                      say, verified)

if TYPE_CHECKING:
    from orchestrator.runtime import checkpoint

RESUME_WORD = "--resume"  # what the controller adds to a restarted attempt's arguments
MARK = "mlx_lm"  # the key in state.json that says an mlx-lm checkpoint of this module wrote it
KEEP = 2  # complete checkpoints of this run kept on disk (a kill mid-save still leaves one)


def hook(kind: str, target: str, argv: list[str]) -> None:
    """The bootstrap's one call before the program runs: ``install``, and nothing it raises stops the rank."""
    try:
        install(kind, target, argv)
    except Exception as e:  # a broken integration must not cost the user their run: mlx-lm runs as it is
        say(f"exact mlx-lm restarts are off for this attempt ({type(e).__name__}: {e})")


def install(kind: str, target: str, argv: list[str], version: Optional[str] = None) -> bool:
    """Wrap mlx-lm's trainer when ``argv`` runs its LoRA trainer under orch; True if it did.

    Takes ``--resume`` (the controller's word for "continue from the run
    directory's checkpoint") out of ``argv`` in place, whatever else happens:
    mlx-lm itself has no such option.
    """
    if not is_lora(kind, target, argv) or not os.environ.get(protocol.ENV_RUN_DIR):
        return False
    resume = RESUME_WORD in argv[1:]
    if resume:
        argv[1:] = [a for a in argv[1:] if a != RESUME_WORD]
    if os.environ.get(protocol.ENV_MLX_LM_RESUME) == "0":
        return False
    version = version or installed_version()
    if not verified(version):
        say(f"mlx-lm {version or '(unknown version)'} is not one orch's exact restarts were verified with "
            f"({', '.join(v + 'x' for v in VERIFIED)}): restarts load adapters only (--resume-from/--resume-arg), "
            "with a fresh optimizer, schedule and data order")
        return False
    from mlx_lm.tuner import trainer

    code = trainer.train.__code__
    if "range" not in code.co_names or "iterate_batches" not in code.co_varnames:
        say(f"mlx-lm {version}: its training loop is not the one orch wraps; restarts load adapters only")
        return False
    wrapped = _wrap_train(trainer, trainer.train, resume)
    trainer.train = wrapped
    lora = sys.modules.get("mlx_lm.lora")
    if lora is not None and getattr(lora, "train", None) is not None:
        lora.train = wrapped  # imported before us: its own name for it too
    return True


# ----------------------------------------------------------------------------- the wrapped trainer


def _wrap_train(trainer_module, real_train: Callable, resume: bool) -> Callable:
    import inspect

    signature = inspect.signature(real_train)

    def train(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        session = _Session(a["model"], a["optimizer"], a["train_dataset"], a["args"], a["iterate_batches"])
        if resume:
            session.restore()
        a["iterate_batches"] = session.iterate_batches
        real_ui = getattr(trainer_module, "TrainUI", None)
        if session.first > 1:
            session.start_at = trainer_module.range = _StartAt(session.first, a["args"].iters + 1)
            if real_ui is not None:
                trainer_module.TrainUI = _resumed_ui(real_ui, session.first - 1)
        try:
            return real_train(*bound.args, **bound.kwargs)
        finally:
            trainer_module.__dict__.pop("range", None)
            if real_ui is not None:
                trainer_module.TrainUI = real_ui
            session.wait_saved()

    train.__wrapped__ = real_train
    train.__doc__ = real_train.__doc__
    return train


def _resumed_ui(real_ui, done: int):
    """mlx-lm's progress bar, starting at the iterations already done (cosmetic; never fails the run)."""

    class ResumedTrainUI(real_ui):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            try:
                self._progress.update(self._task, completed=done)
            except Exception:  # its private names changed: the bar just counts from 0
                pass

    return ResumedTrainUI


class _StartAt:
    """``range`` inside mlx-lm's trainer module while resuming: its loop's ``range(1, iters + 1)`` starts later.

    Only that one call (the first with exactly those arguments) changes; every
    other ``range`` of the module is the builtin's.
    """

    def __init__(self, first: int, stop: int):
        self.first, self.stop, self.armed = first, stop, True

    def __call__(self, *args):
        import builtins

        if self.armed and args == (1, self.stop):
            self.armed = False
            return builtins.range(self.first, self.stop)
        return builtins.range(*args)


def _batches_per_epoch(iterate: Callable, args: tuple, kwargs: dict) -> int:
    """How many batches mlx-lm's ``iterate_batches`` makes of one pass over its dataset (one permutation).

    Its epoch is ``range(0, len(dataset) - batch_size + 1, batch_size)``; knowing it, numpy's state is read
    only where an epoch opens, not at every batch. (Each opening is checked: a permutation must be drawn.)
    """
    import inspect

    bound = inspect.signature(iterate).bind(*args, **kwargs)
    dataset, batch_size = bound.arguments["dataset"], int(bound.arguments["batch_size"])
    return len(range(0, len(dataset) - batch_size + 1, batch_size))


def _np_state_to_json(state) -> dict:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached)}


def _np_state_from_json(d: dict):
    import numpy as np

    return (d["name"], np.array(d["keys"], dtype=np.uint32), d["pos"], d["has_gauss"], d["cached_gaussian"])


def _same_np_state(a, b) -> bool:
    import numpy as np

    return a[2] == b[2] and a[3] == b[3] and np.array_equal(a[1], b[1])


class _Session:
    """One call of mlx-lm's ``train``: saves after each ``--save-every`` iteration, restores on a resume."""

    def __init__(self, model, optimizer, train_dataset, args, iterate_batches: Callable):
        import mlx.core as mx
        from pathlib import Path

        from orchestrator.runtime import checkpoint

        self.model, self.optimizer, self.train_dataset, self.args = model, optimizer, train_dataset, args
        self.real_iterate = iterate_batches
        group = mx.distributed.init()
        self.rank, self.world = group.rank(), group.size()
        self.root = checkpoint.checkpoints_dir(Path(os.environ[protocol.ENV_RUN_DIR]))
        self.every = max(1, int(args.steps_per_save))
        self.accum = max(1, int(getattr(args, "grad_accumulation_steps", 1) or 1))
        self.first = 1  # the first iteration this attempt trains
        self.restored: Optional[dict] = None  # state.json of the checkpoint resumed from
        self.sent = 0  # ranks that had no copy of it and got it from rank 0
        self.lost_track = False  # the data iterator did not behave as mlx-lm 0.32's: no more saves
        self.start_at: Optional[_StartAt] = None  # resuming: the loop's range, which must have been taken
        self._writer: Optional[threading.Thread] = None  # rank 0: the save being written
        self._failed: Optional[str] = None
        self._umask = checkpoint._umask()  # read here: os.umask() in the writer thread would race the process
        self.epoch_start = None  # numpy's state right before the current epoch's permutation
        self.position = 0  # batches taken from the current epoch
        if self.every % self.accum:
            say(f"--save-every {self.every} is not a multiple of --grad-accumulation-steps {self.accum}: orch saves "
                "its restart state only at iterations that are both (a gradient being accumulated is not saved)")

    def _saves_at(self, it: int) -> bool:
        return it > 0 and it % self.every == 0 and it % self.accum == 0

    # ---- the data iterator: the hook for saving, and where data order is restored

    def iterate_batches(self, *args, **kwargs):
        loop = kwargs.get("loop", args[3] if len(args) > 3 else False)
        if not loop:  # evaluation: mlx-lm's own, unchanged
            return self.real_iterate(*args, **kwargs)
        return self._training_batches(args, kwargs)

    def _training_batches(self, args, kwargs):
        import numpy as np

        if self.start_at is not None and self.start_at.armed:  # the loop did not call range(1, iters + 1) first
            raise RuntimeError(f"mlx-lm's training loop did not start at iteration {self.first} as orch expected "
                               "(its code differs from the verified one); rerun with --env ORCH_MLX_LM_RESUME=0")

        done = self.first - 1  # iterations finished when the trainer asks for the next batch
        if self.restored is not None:
            data = self.restored[MARK]
            np.random.set_state(_np_state_from_json(data["epoch_start_rng"]))
            inner = self.real_iterate(*args, **kwargs)
            for _ in range(int(data["position"])):  # the epoch's permutation again, then its batches already used
                next(inner)
            self.epoch_start, self.position = _np_state_from_json(data["epoch_start_rng"]), int(data["position"])
            np.random.set_state(_np_state_from_json(data["numpy_rng"]))
        else:
            inner = self.real_iterate(*args, **kwargs)
        per_epoch = _batches_per_epoch(self.real_iterate, args, kwargs)
        while True:
            if done >= self.first and self._saves_at(done) and self.rank == 0 and not self.lost_track:
                self._save(done)
            opening = self.epoch_start is None or self.position == per_epoch
            before = np.random.get_state() if opening else None  # what this epoch's permutation is drawn from
            try:
                batch = next(inner)
            except StopIteration:
                return
            if opening:
                if _same_np_state(before, np.random.get_state()):  # no permutation drawn: not the loop we know
                    self.lost_track = True
                    say("mlx-lm's data iterator did not start an epoch where orch expected one: restart state is "
                        "no longer saved (restarts load adapters only)")
                self.epoch_start, self.position = before, 1
            else:
                self.position += 1
            done += 1
            yield batch

    # ---- saving (rank 0)

    def _save(self, it: int) -> None:
        import mlx.core as mx
        import numpy as np
        from mlx.utils import tree_flatten

        from orchestrator.runtime import checkpoint

        weights = dict(tree_flatten(self.model.trainable_parameters()))
        opt = dict(tree_flatten(self.optimizer.state))
        odd = [k for k, v in opt.items() if not isinstance(v, mx.array)]
        if odd:
            if not getattr(self, "_said_odd", False):
                self._said_odd = True
                say(f"the optimizer's state has values that are not arrays ({', '.join(odd[:3])}): orch cannot save "
                    "it, so a restart loads adapters only")
            return
        meta = {MARK: {
            "iteration": it,
            "mlx_lm_version": installed_version(),
            "world_size": self.world,
            "batch_size": int(self.args.batch_size),
            "train_examples": len(self.train_dataset),
            "iters": int(self.args.iters),
            "save_every": self.every,
            "mlx_key": [int(k) for k in np.array(mx.random.state[0]).tolist()],
            "numpy_rng": _np_state_to_json(np.random.get_state()),
            "epoch_start_rng": _np_state_to_json(self.epoch_start),
            "position": self.position,
            "adapter_file": str(self.args.adapter_file),
        }}
        # The bytes are made here, on the training thread (MLX stays on one thread); writing them, the fsyncs
        # and the rename go to a thread of their own, so training does not wait for the disk.
        blobs = {}
        for name, arrays in ((checkpoint.MODEL_FILE, weights), (checkpoint.OPTIMIZER_FILE, opt)):
            buf = io.BytesIO()
            mx.save_safetensors(buf, arrays)
            blobs[name] = buf.getvalue()
        state = {checkpoint.RUN_ID_FIELD: checkpoint.current_run_id(), **meta, "format": checkpoint.FORMAT_VERSION,
                 "step": it, "files": {name: len(b) for name, b in blobs.items()}}
        self.wait_saved()  # one save in flight at a time
        self._writer = threading.Thread(target=self._commit, args=(it, blobs, state), name="orch-mlx-lm-save")
        self._writer.start()

    def _commit(self, it: int, blobs: dict[str, bytes], state: dict) -> None:
        """``checkpoint.save``'s steps for bytes already made: temp directory, fsyncs, rename, manifest, prune."""
        import json
        import shutil
        import tempfile
        from pathlib import Path

        from orchestrator.runtime import checkpoint

        tmp = None
        try:
            checkpoint.clean_stale(self.root)
            self.root.mkdir(parents=True, exist_ok=True)
            final = self.root / checkpoint.step_dir_name(it)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=self.root))
            os.chmod(tmp, 0o777 & ~self._umask)  # mkdtemp makes 0700
            for name, data in [*blobs.items(), (checkpoint.STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())]:
                with open(tmp / name, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    checkpoint._sync(fh.fileno())  # F_FULLFSYNC where there is one (the runtime's own helper)
            checkpoint._fsync_dir(tmp)
            if final.exists():
                checkpoint._remove_dir(final)
            os.rename(tmp, final)
            tmp = None
            checkpoint._fsync_dir(self.root)
            checkpoint.write_json_atomic(self.root / checkpoint.MANIFEST, {
                "format": checkpoint.FORMAT_VERSION, "step": it, "path": final.name})
            checkpoint.prune(self.root, KEEP, protect=final, run_id=state[checkpoint.RUN_ID_FIELD])
        except Exception as e:  # a full disk must not stop training: say it, the previous save stays the one
            self._failed = f"{type(e).__name__}: {e}"
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def wait_saved(self) -> None:
        """Until the save in flight (if any) is on disk; says once if one failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._failed:
            say(f"could not save the restart state ({self._failed}): a restart resumes from the save before")
            self._failed = None

    # ---- resuming (every rank)

    def restore(self) -> None:
        import mlx.core as mx
        from mlx.utils import tree_unflatten

        got = self._agree()
        if got is None:
            say(f"--resume: no complete mlx-lm checkpoint in {self.root}; training starts at iteration 1")
            return
        state, weights, opt, where = got
        data = state[MARK]
        it = int(data["iteration"])
        misfit = self._misfit(weights)
        if misfit:  # every rank sees the same bytes, so every rank decides the same
            say(f"--resume: {where} does not fit this model ({misfit}): training starts at iteration 1")
            return
        self.model.load_weights(list(weights.items()), strict=False)
        self.optimizer.state = tree_unflatten(list(opt.items()))
        hi, lo = data["mlx_key"]
        mx.random.seed((int(hi) << 32) | int(lo))
        mx.eval(self.model.parameters(), self.optimizer.state)
        self.restored, self.first = state, it + 1
        notes = []
        if data["world_size"] != self.world:
            notes.append(f"saved by {data['world_size']} ranks, resumed on {self.world}: iteration, optimizer, schedule "
                         "and batch order continue, but not bit-identical (each batch is split over a different "
                         "number of ranks, so gradients are summed in another order)")
        if data["batch_size"] != int(self.args.batch_size) or data["train_examples"] != len(self.train_dataset):
            notes.append("the batch size or the training set changed since the save: the data order is not the "
                         "uninterrupted run's")
        if self.sent:
            notes.insert(0, f"rank 0 sent it to the {self.sent} rank{'s' if self.sent > 1 else ''} without a copy")
        step = int(self.optimizer.state["step"].item()) if "step" in self.optimizer.state else None
        say(f"mlx-lm resumes at iteration {it + 1} from {where} (optimizer step {step}, learning-rate schedule, "
            f"data order and random state restored){'; ' + '; '.join(notes) if notes else ''}")

    def _misfit(self, weights: dict) -> Optional[str]:
        """Why saved adapter weights cannot be this model's trainable parameters (another model, rank, layers)."""
        from mlx.utils import tree_flatten

        mine = dict(tree_flatten(self.model.trainable_parameters()))
        if set(mine) != set(weights):
            odd = sorted(set(mine) ^ set(weights))
            return f"{len(odd)} parameter names differ, e.g. {odd[0]}"
        for name, value in mine.items():
            if value.shape != weights[name].shape or value.dtype != weights[name].dtype:
                return f"{name} is {tuple(weights[name].shape)} {weights[name].dtype}, the model's {tuple(value.shape)} {value.dtype}"
        return None

    def _agree(self) -> Optional[tuple[dict, dict, dict, str]]:
        """Rank 0's newest complete mlx-lm checkpoint, on every rank: read locally where the same one is there.

        Every rank calls this (it may run collectives). Returns ``(state, weights,
        optimizer arrays, where)`` or None when rank 0 has none.
        """
        import io
        import json

        import mlx.core as mx
        import numpy as np

        from orchestrator.runtime import checkpoint

        mine = self._newest()
        if self.world == 1:
            return self._read(mine) if mine is not None else None
        # rank 0 says which one (its step and a fingerprint of its state.json); the others check their own copy
        names = (checkpoint.STATE_FILE, checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE)
        header = np.zeros(6, dtype=np.int64)
        if self.rank == 0 and mine is not None:
            crc, n = self._fingerprint(mine)
            header[:] = [1, mine.step, crc, n, *((mine.path / name).stat().st_size for name in names[1:])]
        header = np.array(mx.distributed.all_sum(mx.array(header), stream=mx.cpu)).astype(np.int64)
        if header[0] == 0:
            return None
        step, crc, sizes = int(header[1]), int(header[2]), [int(n) for n in header[3:]]
        local = mine if mine is not None and mine.step == step and self._fingerprint(mine) == (crc, sizes[0]) else None
        need = np.array(mx.distributed.all_sum(mx.array([0 if local is not None else 1]), stream=mx.cpu)).item()
        self.sent = int(need)
        if need:
            if self.rank == 0:
                blob = np.frombuffer(b"".join((mine.path / name).read_bytes() for name in names), dtype=np.uint8)
            else:
                blob = np.zeros(sum(sizes), np.uint8)
            got = np.array(mx.distributed.all_sum(mx.array(blob), stream=mx.cpu)).astype(np.uint8).tobytes()
            if local is None:
                a, b = sizes[0], sizes[0] + sizes[1]
                state = json.loads(got[:a])
                weights = mx.load(io.BytesIO(got[a:b]), format="safetensors")
                opt = mx.load(io.BytesIO(got[b:]), format="safetensors")
                return state, weights, opt, f"rank 0's {checkpoint.step_dir_name(step)}"
        return self._read(local)

    def _newest(self) -> Optional["checkpoint.Checkpoint"]:
        from orchestrator.runtime import checkpoint

        for cp in checkpoint.complete_checkpoints(self.root):
            if isinstance(cp.state.get(MARK), dict):
                return cp
        return None

    @staticmethod
    def _fingerprint(cp: "checkpoint.Checkpoint") -> tuple[int, int]:
        import zlib

        from orchestrator.runtime import checkpoint

        raw = (cp.path / checkpoint.STATE_FILE).read_bytes()
        return zlib.crc32(raw), len(raw)

    @staticmethod
    def _read(cp: "checkpoint.Checkpoint") -> tuple[dict, dict, dict, str]:
        from orchestrator.runtime import checkpoint

        weights, opt = checkpoint.load(cp)
        return cp.state, weights, opt, str(cp.path)
