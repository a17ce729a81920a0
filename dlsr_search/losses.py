"""Losses: L1, HFEN (high-frequency error norm) and the differentiable parameter loss L_P.

Image losses are measured in 8-bit grey levels (images in [0, 1] times 255), as in the paper's code
(rgb_range 255). That scale is what gives gamma = 0.2 on L_P its meaning: with [0, 1] units the data
terms would be 255x smaller and L_P would dominate the architecture gradient. (Adam makes the weight
training itself insensitive to this scale.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dlsr_infer.genotype import OP_NAMES, mrb_param_count

PIXEL_RANGE = 255.0


def l1(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    return (sr - hr).abs().mean() * PIXEL_RANGE


def l2(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """Mean squared error in grey levels squared: the loss PSNR itself measures, for a final fine-tune."""
    return ((sr - hr) * PIXEL_RANGE).square().mean()


#: The pixel losses `sr_loss` can use, by name (the trainer's --pixel-loss).
PIXEL_LOSSES = {"l1": l1, "l2": l2}


def _gaussian_kernel(size: int = 5, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    k = torch.outer(g, g)
    return (k / k.sum()).float()


_GAUSS = _gaussian_kernel()
_LAPLACE = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def log_filter(x: torch.Tensor) -> torch.Tensor:
    """Laplacian of Gaussian per channel: 5x5 Gaussian (sigma 1.5) smoothing, then a 3x3 Laplacian.

    'valid' borders (no padding), so image edges never count as high frequencies.
    """
    c = x.shape[1]
    g = _GAUSS.to(x.device, x.dtype).expand(c, 1, 5, 5)
    lap = _LAPLACE.to(x.device, x.dtype).expand(c, 1, 3, 3)
    return F.conv2d(F.conv2d(x, g, groups=c), lap, groups=c)


def hfen(sr: torch.Tensor, hr: torch.Tensor) -> torch.Tensor:
    """L1 between the LoG-filtered SR and HR (in grey levels): penalises blurred edges and texture."""
    return (log_filter(sr) - log_filter(hr)).abs().mean() * PIXEL_RANGE


def op_costs(channels: int) -> torch.Tensor:
    """Parameter count of each candidate op (in `OP_NAMES` order) at ``channels``, normalised to sum 1."""
    counts = torch.tensor([float(mrb_param_count(op, channels)) for op in OP_NAMES])
    return counts / counts.sum()


def param_loss(op_weights: torch.Tensor, channels: int) -> torch.Tensor:
    """L_P = sum over MRBs of softmax(alpha) . normalised op parameter counts.

    ``op_weights`` is softmax(alpha) of shape (3, 9) (alphas shared by every cell) or (cells, 3, 9)
    (per-cell alphas); per-cell weights are averaged over cells so gamma means the same either way.
    The result is a differentiable tensor: its gradient reaches alpha (the authors' code took it
    through numpy, which silently dropped that gradient).
    """
    costs = op_costs(channels).to(op_weights.device, op_weights.dtype)
    per_mrb = (op_weights * costs).sum(-1)
    return per_mrb.sum(-1).mean() if per_mrb.dim() > 1 else per_mrb.sum()


def sr_loss(sr: torch.Tensor, hr: torch.Tensor, mu: float = 0.0, pixel: str = "l1") -> torch.Tensor:
    """The image loss L1 + mu * HFEN (mu = 0.2 in the search, 0 (plain L1) in the paper's retrain).

    ``pixel="l2"`` swaps L1 for the squared error: not the paper's, but a common last fine-tuning stage
    for PSNR, since L1 trades some mean squared error for robustness to outliers.
    """
    loss = PIXEL_LOSSES[pixel](sr, hr)
    if mu:
        loss = loss + mu * hfen(sr, hr)
    return loss


__all__ = ["PIXEL_LOSSES", "PIXEL_RANGE", "hfen", "l1", "l2", "log_filter", "op_costs", "param_loss", "sr_loss"]
