"""The DLSR supernet: every MRB a softmax(alpha)-weighted mix of the nine ops, every link softmax(beta)-weighted.

Same skeleton and layers as the fixed network (`dlsr_infer.layers`), so a derived genotype describes
exactly a sub-network of this one. The search space follows the authors' search code
(DawnHH/DLSR-PyTorch, ``RFDN_beta1``):

- alpha: one (3 x 9) table shared by every cell (default), or one per cell (``per_cell_alphas``);
- cells 1 and 2 are chained (stem -> cell 1 -> cell 2);
- cell j >= 3 reads all earlier cells 1..j-1 (not the stem), each scaled by softmax(beta_j), concatenated
  and fused by a 1x1 conv + LeakyReLU (`CellLink`); the derived cell keeps the top-2 of beta_j.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dlsr_infer.genotype import OP_NAMES, Genotype
from dlsr_infer.layers import OPS, CellLink, DistillationCell
from dlsr_infer.layers.network import CellNetwork

from .genotypes import derive_genotype


class MixedOp(nn.Module):
    """All nine candidate ops on the same input, summed with the weights the supernet hands it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.ops = nn.ModuleList(OPS[name](channels) for name in OP_NAMES)
        self.weights: torch.Tensor | None = None  # softmax(alpha) row, set by SuperNet.forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(self.weights, self.ops))  # type: ignore[arg-type]


class SuperNet(CellNetwork):
    def __init__(self, *, scale: int, channels: int = 48, num_cells: int = 6, per_cell_alphas: bool = False,
                 in_channels: int = 3, out_channels: int = 3) -> None:
        if num_cells < 3:
            raise ValueError(f"the supernet needs at least 3 cells (links are searched from cell 3 on), got {num_cells}")
        cells = [DistillationCell(channels, [MixedOp(channels) for _ in range(3)]) for _ in range(num_cells)]
        links = [nn.Identity(), nn.Identity()] + [CellLink(channels, j - 1) for j in range(3, num_cells + 1)]
        super().__init__(in_channels=in_channels, out_channels=out_channels, channels=channels, scale=scale,
                         cells=cells, links=links)
        self.channels, self.num_cells, self.in_channels, self.out_channels = channels, num_cells, in_channels, out_channels
        shape = (num_cells, 3, len(OP_NAMES)) if per_cell_alphas else (3, len(OP_NAMES))
        # Small random init (as DARTS): near-uniform mixtures, but ties broken for the first derivation.
        self.alphas = nn.Parameter(1e-3 * torch.randn(shape))
        self.betas = nn.ParameterList(nn.Parameter(1e-3 * torch.randn(j - 1)) for j in range(3, num_cells + 1))

    # --- the two parameter sets, for the two optimizers ----------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return [self.alphas, *self.betas]

    def weight_parameters(self) -> list[nn.Parameter]:
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def op_weights(self) -> torch.Tensor:
        """softmax(alpha) over the nine ops: (3, 9) or (cells, 3, 9)."""
        return self.alphas.softmax(-1)

    # --- forward ----------------------------------------------------------------------------------------
    def cell_input(self, index: int, feats: list[torch.Tensor]) -> torch.Tensor:
        if index < 2:  # cell 1 reads the stem, cell 2 reads cell 1
            return feats[index]
        return self.links[index](feats[1:index + 1], self.betas[index - 2].softmax(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.op_weights()
        w = w.expand(self.num_cells, *w.shape) if w.dim() == 2 else w
        for cell, cell_w in zip(self.cells, w):
            for mixed, row in zip(cell.mrb, cell_w):
                mixed.weights = row
        try:
            return super().forward(x)
        finally:  # don't keep this step's graph alive through module attributes
            for cell in self.cells:
                for mixed in cell.mrb:
                    mixed.weights = None

    # --- the discrete network it points at ----------------------------------------------------------------
    def genotype(self, name: str | None = None, **provenance: Any) -> Genotype:
        return derive_genotype(self.alphas, list(self.betas), scale=self.scale, channels=self.channels,
                               num_cells=self.num_cells, in_channels=self.in_channels,
                               out_channels=self.out_channels, name=name, provenance=provenance)


__all__ = ["MixedOp", "SuperNet"]
