"""Make an unmodified mlx-lm crash once, right after it saved its first numbered adapter file.

A stand-in for a lost node in the ``--resume-arg`` test: put this directory on
PYTHONPATH and set ``ORCH_TEST_CRASH_MARKER`` to a file that does not exist;
rank 0 then exits with code 3 just after writing ``NNNNNNN_adapters.safetensors``
and records the file in the marker, so the restarted attempt runs normally.
Does nothing without the variable (or once the marker exists, or on other ranks).
"""

import os

_marker = os.environ.get("ORCH_TEST_CRASH_MARKER")
if _marker and not os.path.exists(_marker) and os.environ.get("RANK", "0") == "0":
    import mlx.core as mx

    _save = mx.save_safetensors

    def _save_then_crash(path, *args, **kwargs):
        _save(path, *args, **kwargs)
        name = os.path.basename(str(path))
        if name.endswith("_adapters.safetensors") and name[:1].isdigit():
            with open(_marker, "w") as f:
                f.write(str(path))
            os._exit(3)

    mx.save_safetensors = _save_then_crash
