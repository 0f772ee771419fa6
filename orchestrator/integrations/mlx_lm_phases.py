"""mlx-lm's validation as a named phase, so the step-cadence watchdog does not call it a hang.

mlx-lm's LoRA trainer reports a row every ``--steps-per-report`` iterations and, every
``--steps-per-eval``, runs a validation pass that can last many report intervals. The
controller cannot see it start: mlx-lm prints the validation row only when it ends. Here
the trainer module's ``evaluate`` (which ``train`` calls through its module global) is
wrapped in ``report.phase("validation")``, so every rank sends ``phase_start`` /
``phase`` around it and the cadence rule waits (``--hang-timeout`` still bounds it).
Only the public function is wrapped, never its code; a missing name leaves mlx-lm as it is.
"""

from __future__ import annotations

import functools


def install(kind: str, target: str, argv: list[str]) -> bool:
    """Wrap ``mlx_lm.tuner.trainer.evaluate`` when the rank runs mlx-lm's LoRA trainer; True if it did."""
    from orchestrator.integrations.mlx_lm_program import is_lora
    from orchestrator.runtime import events

    if not events.enabled() or not is_lora(kind, target, argv):
        return False
    try:
        from mlx_lm.tuner import trainer
    except ImportError:
        return False
    real = getattr(trainer, "evaluate", None)
    if real is None or getattr(real, "_orch_phase", False):
        return False

    from orchestrator.runtime import report

    @functools.wraps(real)
    def evaluate(*args, **kwargs):
        with report.phase("validation"):
            return real(*args, **kwargs)

    evaluate._orch_phase = True
    trainer.evaluate = evaluate
    return True
