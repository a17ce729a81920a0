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

from dlsr_infer.evaluate import NonFiniteOutput, dataset_images, super_resolve_fp32
from dlsr_infer.metrics import psnr_y

from .data import DataError, ImagePair, list_images, load_pairs


class ValidationSet:
    def __init__(self, pairs: Sequence[ImagePair], scale: int) -> None:
        self.pairs, self.scale = list(pairs), scale

    @classmethod
    def from_files(cls, files: Sequence[Path], scale: int, *, max_images: int | None = None,
                   cache_dir: str | os.PathLike | None = None) -> "ValidationSet":
        files = list(files)[:max_images] if max_images else list(files)
        pairs, skipped = load_pairs(files, scale, min_lr_size=1, cache_dir=cache_dir,
                                    role="the validation set (--val, or the held-out images)")
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

    def psnr(self, model: nn.Module, device: torch.device) -> float:
        """Mean PSNR-Y (dB) of ``model`` over the set, by dlsr-eval's own forward (fp32 whatever the
        training autocasts to); NaN when an output is not finite. The model is left in the mode it was in."""
        was_training = model.training
        model.eval()
        scores = []
        try:
            for pair in self.pairs:
                try:
                    sr = super_resolve_fp32(model, pair.lr, scale=self.scale, device=str(device))
                except NonFiniteOutput:
                    return math.nan
                scores.append(psnr_y(sr, pair.hr, crop=self.scale))
        finally:
            model.train(was_training)
        return float(np.mean(scores))


__all__ = ["ValidationSet"]
