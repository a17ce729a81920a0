"""dlsr_infer: lightweight single-image super-resolution with DLSR networks.

    from dlsr_infer import upscale, DLSR
    big = upscale("photo.png", scale=4)          # bundled weights, tiled, CPU or CUDA
    model = DLSR.from_pretrained("x4")

This package never imports `dlsr_search` (the search/training code depends on us, not the reverse).
"""
from __future__ import annotations

from typing import Any

from .genotype import Genotype, GenotypeError
from .model import DLSR
from .pretrained import ModelLoadError

__version__ = "0.1.0"

#: names served lazily (upscaling pulls in PIL and the tiling code; keep `import dlsr_infer` light) -> module
_LAZY = {"upscale": "upscaling", "upscale_file": "upscaling", "Upscaler": "upscaling",
         "ImageLoadError": "imageio", "ImageTooLargeError": "imageio", "OutputExistsError": "imageio",
         "ColorConversionWarning": "imageio"}

__all__ = ["DLSR", "Genotype", "GenotypeError", "ModelLoadError", *_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dlsr_infer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
