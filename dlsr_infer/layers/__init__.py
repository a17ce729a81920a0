"""Layers shared by the fixed DLSR network and the search supernet."""
from .cell import CellLink, DistillationCell, Upsampler
from .esa import ESA
from .ops import OPS, conv, lrelu

__all__ = ["CellLink", "DistillationCell", "ESA", "OPS", "Upsampler", "conv", "lrelu"]
