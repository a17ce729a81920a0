"""Validation PSNR-Y on whole images, by the benchmark protocol of `dlsr_infer.evaluate`.

LR = MATLAB-bicubic of the mod-cropped HR (computed once, kept in memory); SR rounded to uint8;
PSNR on Y with ``scale`` border pixels cropped (`dlsr_infer.metrics.psnr_y`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dlsr_infer.metrics import psnr_y

from .data import ImagePair, list_images, load_pairs


class ValidationSet:
    def __init__(self, pairs: Sequence[ImagePair], scale: int) -> None:
        self.pairs, self.scale = list(pairs), scale

    @classmethod
    def from_files(cls, files: Sequence[Path], scale: int, *, max_images: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> "ValidationSet":
        pairs, _ = load_pairs(list(files)[:max_images] if max_images else list(files), scale, cache_dir=cache_dir)
        return cls(pairs, scale)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, scale: int, **kw) -> "ValidationSet":
        return cls.from_files(list_images([folder]), scale, **kw)

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def psnr(self, model: nn.Module, device: torch.device, *, autocast_dtype: torch.dtype | None = None) -> float:
        """Mean PSNR-Y (dB) of ``model`` over the set (NaN when an output is not finite: clamped and rounded
        it would score as a black image); the model is left in the mode it was in."""
        was_training = model.training
        model.eval()
        scores = []
        try:
            for pair in self.pairs:
                x = torch.from_numpy(np.ascontiguousarray(pair.lr.transpose(2, 0, 1))).unsqueeze(0)
                x = x.to(device).float().div_(255.0)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    y = model(x)
                if not bool(torch.isfinite(y).all()):
                    return math.nan
                sr = y[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                scores.append(psnr_y(sr, pair.hr, crop=self.scale))
        finally:
            model.train(was_training)
        return float(np.mean(scores))


__all__ = ["ValidationSet"]
