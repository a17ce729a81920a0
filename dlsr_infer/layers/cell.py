"""The DLSR distillation cell and the link that gathers a cell's inputs.

Both serve the fixed network (ops chosen by a genotype) and the supernet (each op a mixed op, each
link weighted by softmax(beta)): the cell takes its three MRB ops as ready-made modules.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .esa import ESA
from .ops import conv, lrelu


class DistillationCell(nn.Module):
    """RFDB-style cell: three Mixed Residual Blocks with information distillation, then ESA.

    At each step a 1x1 conv distils half the channels off while the MRB (op + residual + LeakyReLU)
    refines the full width; a 3x3 conv distils the last step; the four distilled parts are
    concatenated, fused by a 1x1 conv and re-weighted by ESA.
    """

    def __init__(self, channels: int, mrb_ops: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(mrb_ops) != 3:
            raise ValueError(f"a cell takes exactly 3 MRB ops, got {len(mrb_ops)}")
        distilled = channels // 2
        self.distill = nn.ModuleList(conv(channels, distilled, 1) for _ in range(3))
        self.mrb = nn.ModuleList(mrb_ops)
        self.refine = conv(channels, distilled, 3)
        self.fuse = conv(distilled * 4, channels, 1)
        self.esa = ESA(channels)
        self.act = lrelu()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for distill, op in zip(self.distill, self.mrb):
            parts.append(self.act(distill(x)))
            x = self.act(op(x) + x)
        parts.append(self.act(self.refine(x)))
        return self.esa(self.fuse(torch.cat(parts, dim=1)))


class CellLink(nn.Module):
    """A cell's input: the concatenation of several earlier tensors through a 1x1 conv + LeakyReLU.

    `weights` (one scalar per input, e.g. softmax(beta) in the supernet) scale the inputs before
    concatenation; the fixed network passes none.
    """

    def __init__(self, channels: int, num_inputs: int) -> None:
        super().__init__()
        self.num_inputs = num_inputs
        self.conv = conv(channels * num_inputs, channels, 1)
        self.act = lrelu()

    def forward(self, inputs: Sequence[torch.Tensor], weights: torch.Tensor | None = None) -> torch.Tensor:
        if weights is not None:
            inputs = [w * t for w, t in zip(weights, inputs)]
        return self.act(self.conv(torch.cat(list(inputs), dim=1)))


class Upsampler(nn.Module):
    """3x3 conv to out_channels * scale^2, then pixel shuffle."""

    def __init__(self, channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.conv = conv(channels, out_channels * scale * scale, 3)
        self.shuffle = nn.PixelShuffle(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))
