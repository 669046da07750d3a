"""The model and how it grows: SamMoE, its MoE layers, growth, and the checkpoint format.

The names below are imported on first use (PEP 562), so `import upscale.config` or
`upscale.checkpoint` does not pay for torch and segment_anything: `samoe --help`,
`inspect-checkpoint` and `plan` never need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Checkpoint": "checkpoint", "load_model": "checkpoint", "save_model": "checkpoint",
    "MoEConfig": "config", "PRESETS": "config", "SamMoEConfig": "config", "get_preset": "config",
    "SamoeError": "errors",
    "SamMoE": "model", "build_model": "model",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
