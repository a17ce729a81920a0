"""The DLSR network skeleton shared by the fixed network and the supernet.

stem 3x3 conv -> cells (each fed by its link) -> 1x1 fuse of every cell's output -> LR 3x3 conv +
global skip from the stem -> pixel-shuffle upsampler. Subclasses decide what the cells are and how a
cell's input is gathered (`cell_input`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .cell import CellLink, Upsampler
from .ops import conv


class CellNetwork(nn.Module):
    def __init__(self, *, in_channels: int, out_channels: int, channels: int, scale: int,
                 cells: Sequence[nn.Module], links: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(cells) != len(links):
            raise ValueError("one link per cell is required")
        self.scale = scale
        self.stem = conv(in_channels, channels, 3)
        self.links = nn.ModuleList(links)
        self.cells = nn.ModuleList(cells)
        self.fuse = CellLink(channels, len(cells))
        self.lr_conv = conv(channels, channels, 3)
        self.upsampler = Upsampler(channels, out_channels, scale)

    def cell_input(self, index: int, feats: list[torch.Tensor]) -> torch.Tensor:
        """The input of cell `index` (0-based) given the stem output and earlier cell outputs."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """LR-resolution features right before the upsampler."""
        feats = [self.stem(x)]
        for j, cell in enumerate(self.cells):
            feats.append(cell(self.cell_input(j, feats)))
        return self.lr_conv(self.fuse(feats[1:])) + feats[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsampler(self.features(x))
