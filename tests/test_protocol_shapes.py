"""protocol.py's event shapes: cheap for ranks to import, validated by the controller unchanged."""

from __future__ import annotations

import subprocess
import sys

from orchestrator import events, protocol


def test_importing_the_protocol_does_not_import_typing_extensions():
    """Every rank (and the CLI before it pre-starts local ranks) imports protocol: ~7 ms saved each."""
    code = "import sys, orchestrator.protocol, orchestrator.runtime.bootstrap; print('typing_extensions' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_good_and_bad_payloads():
    step = {"kind": "step", "rank": 0, "t": 1.0, "step": 1, "epoch": 0, "loss": 0.5, "samples_per_s": 1.0,
            "tokens_per_s": None, "step_time_s": 0.1, "total_steps": None}
    assert events.validate(step) == step
    assert events.validate({**step, "step": "x"}) is None
    assert events.validate({"kind": "listening", "rank": 0, "t": 1.0, "address": "127.0.0.1:1"}) is not None
    assert events.validate({"kind": "listening", "rank": 0, "t": 1.0}) is None
    assert events.validate({"kind": "nope", "rank": 0, "t": 1.0}) is None
