"""The model and how it grows: SamMoE, its MoE layers, growth, and the checkpoint format."""

__version__ = "0.1.0"

from .checkpoint import Checkpoint, load_model, save_model  # noqa: E402
from .config import PRESETS, MoEConfig, SamMoEConfig, get_preset  # noqa: E402
from .errors import SamoeError  # noqa: E402
from .model import SamMoE, build_model  # noqa: E402

__all__ = [
    "Checkpoint", "MoEConfig", "PRESETS", "SamMoE", "SamMoEConfig", "SamoeError",
    "build_model", "get_preset", "load_model", "save_model",
]
