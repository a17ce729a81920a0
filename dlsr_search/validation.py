"""Validation PSNR-Y on whole images, by the benchmark protocol of `dlsr_infer.evaluate`.

The same images as `dlsr-eval` (a dataset folder's HR/ when it has one, not its LR_bicubic/), the
same LR (MATLAB-bicubic of the mod-cropped HR, computed once and kept in memory), the same forward (fp32,
whatever the training autocasts to; an LR under the network's minimum size padded, the output cropped
back), SR rounded to uint8 and PSNR on Y with ``scale`` border pixels cropped
(`dlsr_infer.metrics.psnr_y`). So the figure that picks a run's best/ is the figure dlsr-eval reports.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from dlsr_infer.evaluate import dataset_images
from dlsr_infer.metrics import psnr_y
from dlsr_infer.tiling import pad_small

from .data import DataError, ImagePair, list_images, load_pairs


class ValidationSet:
    def __init__(self, pairs: Sequence[ImagePair], scale: int) -> None:
        self.pairs, self.scale = list(pairs), scale

    @classmethod
    def from_files(cls, files: Sequence[Path], scale: int, *, max_images: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> "ValidationSet":
        files = list(files)[:max_images] if max_images else list(files)
        pairs, skipped = load_pairs(files, scale, min_lr_size=1, cache_dir=cache_dir)
        if skipped:  # dlsr-eval refuses these too: a validation figure never quietly leaves an image out
            raise DataError(f"validation images smaller than the scale ({scale}): {', '.join(skipped)}")
        return cls(pairs, scale)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, scale: int, **kw) -> "ValidationSet":
        """A benchmark folder (one with HR/): its HR images, as dlsr-eval reads them (never the LR_bicubic/
        beside them); any other folder (searched recursively) or image file: its images."""
        try:
            files = dataset_images(folder) if (Path(folder) / "HR").is_dir() else list_images([folder])
        except ValueError as e:  # (DataError is a ValueError too)
            raise DataError(f"--val: {e}") from None
        return cls.from_files(files, scale, **kw)

    def __len__(self) -> int:
        return len(self.pairs)

    @torch.no_grad()
    def psnr(self, model: nn.Module, device: torch.device) -> float:
        """Mean PSNR-Y (dB) of ``model`` over the set, in fp32 (NaN when an output is not finite: clamped
        and rounded it would score as a black image); the model is left in the mode it was in."""
        was_training = model.training
        model.eval()
        scores = []
        try:
            for pair in self.pairs:
                x = torch.from_numpy(np.ascontiguousarray(pair.lr.transpose(2, 0, 1))).unsqueeze(0)
                x = x.to(device).float().div_(255.0)
                h, w = x.shape[-2:]
                with torch.autocast(device.type, enabled=False):  # fp32 even inside a caller's autocast
                    y = model(pad_small(x))[..., :h * self.scale, :w * self.scale]
                if not bool(torch.isfinite(y).all()):
                    return math.nan
                sr = y[0].float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                scores.append(psnr_y(sr, pair.hr, crop=self.scale))
        finally:
            model.train(was_training)
        return float(np.mean(scores))


__all__ = ["ValidationSet"]
