"""segment_anything's model parts, imported without running its package `__init__`.

`segment_anything/__init__.py` imports its predictor and automatic mask generator, and
through them torchvision: about 1.25 s that no samoe command needs. Its `modeling`
subpackage needs only torch. So `segment_anything` is registered as a package whose
`__init__` runs on first use of one of its own attributes (`sam_model_registry`, ...):
`segment_anything.modeling.*` import at once, and code that does want the whole
package (tests that compare with SAM's builders) still gets it.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any


def _package_on_first_use(name: str) -> None:
    """Register package `name` with its `__path__` (so submodules import) but run its `__init__` only when an
    attribute it defines is first asked for."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module named {name!r}: install segment-anything", name=name)
    package: ModuleType = importlib.util.module_from_spec(spec)

    def complete(attr: str) -> Any:
        del package.__getattr__  # type: ignore[attr-defined]
        spec.loader.exec_module(package)
        return getattr(package, attr)

    package.__getattr__ = complete  # type: ignore[attr-defined]
    sys.modules[name] = package


_package_on_first_use("segment_anything")

from segment_anything.modeling.common import LayerNorm2d, MLPBlock  # noqa: E402
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT  # noqa: E402
from segment_anything.modeling.mask_decoder import MLP  # noqa: E402
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom  # noqa: E402
from segment_anything.modeling.transformer import TwoWayTransformer  # noqa: E402

__all__ = ["Block", "ImageEncoderViT", "LayerNorm2d", "MLP", "MLPBlock", "PositionEmbeddingRandom", "TwoWayTransformer"]
