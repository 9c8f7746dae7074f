"""Settings shared by the tests' tiny training runs (imported by the test modules)."""

from __future__ import annotations

from typing import Any

import diffusers_breakscene as bas


def tiny_config(resolution: int, /, **changes: Any) -> bas.BreakASceneConfig:
    """3 + 3 steps, LoRA rank 4, at ``resolution`` (``changes`` override any of these, the
    resolution too); no validation pictures at the phase ends (they are tested on their own in
    test_trainer.py; elsewhere they only cost time)."""
    base = {
        "phase1_steps": 3,
        "phase2_steps": 3,
        "resolution": resolution,
        "lora_rank": 4,
        "validate_phase_ends": False,
    }
    return bas.BreakASceneConfig(**{**base, **changes})
