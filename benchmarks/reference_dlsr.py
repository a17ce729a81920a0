"""A plain eager DLSR, written for the benchmark as its baseline.

It shares nothing with `dlsr_infer.layers` except the state-dict key names: a straightforward
functional forward (NCHW, `F.conv2d` per layer, one op per line of the paper's block diagram, as the
authors' RFDN code does it) over a genotype and a state dict. The benchmark checks that it computes
the same function as `dlsr_infer.DLSR` before timing anything.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.05)


class ReferenceDLSR(nn.Module):
    """`ReferenceDLSR(genotype, state_dict)`: the network of `genotype` with the given weights."""

    def __init__(self, genotype, state_dict: Mapping[str, torch.Tensor]) -> None:  # noqa: ANN001
        super().__init__()
        self.genotype = genotype
        self.scale = genotype.scale
        self.c = genotype.channels
        self.w = {k: v.detach().clone().float() for k, v in state_dict.items()}

    def conv(self, x: torch.Tensor, name: str, *, stride: int = 1, dilation: int = 1, groups: int = 1,
             padding: int | None = None) -> torch.Tensor:
        w = self.w[name + ".weight"]
        if padding is None:
            padding = (w.shape[-1] - 1) // 2 * dilation
        return F.conv2d(x, w, self.w.get(name + ".bias"), stride, padding, dilation, groups)

    def mrb(self, x: torch.Tensor, prefix: str, op: str) -> torch.Tensor:
        """Mixed residual block: LeakyReLU(op(x) + x)."""
        if op.startswith("conv_"):
            y = self.conv(x, prefix + ".0")
        elif op.startswith("sep_conv_"):
            y = self.conv(F.relu(x), prefix + ".1", groups=self.c)
            y = self.conv(y, prefix + ".2")
            y = self.conv(F.relu(y), prefix + ".4", groups=self.c)
            y = self.conv(y, prefix + ".5")
        elif op.startswith("dil_conv_"):
            y = self.conv(F.relu(x), prefix + ".1", groups=self.c, dilation=2)
            y = self.conv(y, prefix + ".2")
        else:
            raise ValueError(op)
        return _lrelu(y + x)

    def esa(self, x: torch.Tensor, p: str) -> torch.Tensor:
        c1_ = self.conv(x, p + ".conv1")
        c1 = self.conv(c1_, p + ".conv2", stride=2, padding=0)
        v_max = F.max_pool2d(c1, kernel_size=7, stride=3)
        v_range = F.relu(self.conv(v_max, p + ".conv_max"))
        c3 = F.relu(self.conv(v_range, p + ".conv3"))
        c3 = self.conv(c3, p + ".conv3_")
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        cf = self.conv(c1_, p + ".conv_f")
        c4 = self.conv(c3 + cf, p + ".conv4")
        return x * torch.sigmoid(c4)

    def cell(self, x: torch.Tensor, j: int) -> torch.Tensor:
        p = f"cells.{j}"
        ops = self.genotype.cells[j].ops
        d1 = _lrelu(self.conv(x, p + ".distill.0"))
        r1 = self.mrb(x, p + ".mrb.0", ops[0])
        d2 = _lrelu(self.conv(r1, p + ".distill.1"))
        r2 = self.mrb(r1, p + ".mrb.1", ops[1])
        d3 = _lrelu(self.conv(r2, p + ".distill.2"))
        r3 = self.mrb(r2, p + ".mrb.2", ops[2])
        r4 = _lrelu(self.conv(r3, p + ".refine"))
        out = self.conv(torch.cat([d1, d2, d3, r4], dim=1), p + ".fuse")
        return self.esa(out, p + ".esa")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fea = self.conv(x, "stem")
        feats = [fea]
        for j, spec in enumerate(self.genotype.cells):
            if len(spec.inputs) == 1:
                inp = feats[spec.inputs[0]]
            else:
                inp = _lrelu(self.conv(torch.cat([feats[i] for i in spec.inputs], dim=1), f"links.{j}.conv"))
            feats.append(self.cell(inp, j))
        out_b = _lrelu(self.conv(torch.cat(feats[1:], dim=1), "fuse.conv"))
        out_lr = self.conv(out_b, "lr_conv") + fea
        return F.pixel_shuffle(self.conv(out_lr, "upsampler.conv"), self.scale)
