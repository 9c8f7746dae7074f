"""The optimizer class the trainer uses: torch's AdamW, or bitsandbytes' 8-bit AdamW.

bitsandbytes is optional (``pip install 'diffusers-breakscene[bnb]'``); asking for it without
it installed is refused when the trainer is built, before anything is trained or written.

Example:
    >>> adamw_class(use_8bit=False).__name__
    'AdamW'
"""

from __future__ import annotations

from typing import Any

from .errors import InvalidConfigError

__all__ = ["MIN_BITSANDBYTES", "adamw_class"]

MIN_BITSANDBYTES = "0.50"
"""The oldest bitsandbytes this library uses: its 8-bit optimizers run on CPUs from 0.50 on."""


def adamw_class(use_8bit: bool) -> Any:
    """``torch.optim.AdamW``, or ``bitsandbytes.optim.AdamW8bit`` when ``use_8bit`` (the
    ``use_8bit_adam`` setting); both take the same arguments.

    Raises:
        InvalidConfigError: ``use_8bit`` without bitsandbytes >= 0.50 installed.
    """
    import torch

    if not use_8bit:
        return torch.optim.AdamW
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise InvalidConfigError(
            f"use_8bit_adam=True needs bitsandbytes >= {MIN_BITSANDBYTES} ({err}); install it "
            "with pip install 'diffusers-breakscene[bnb]', or set use_8bit_adam=False "
            "(--no-use-8bit-adam)."
        ) from None
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < tuple(int(p) for p in MIN_BITSANDBYTES.split(".")):
        raise InvalidConfigError(
            f"use_8bit_adam=True needs bitsandbytes >= {MIN_BITSANDBYTES}, found "
            f"{bnb.__version__}; upgrade with pip install -U bitsandbytes."
        )
    return bnb.optim.AdamW8bit
