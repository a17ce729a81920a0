"""Enhanced Spatial Attention (ESA), the attention that closes every RFDN/DLSR cell."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops import conv


class ESA(nn.Module):
    """Spatial attention from a strided, max-pooled quarter-width branch; returns `x * sigmoid(mask)`.

    The branch sees a wide context cheaply (stride-2 conv, 7x7/3 max-pool) before it is upsampled
    back; that wide context is why tiled inference needs generous overlaps.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        f = channels // 4
        self.conv1 = conv(channels, f, 1)
        self.conv_f = conv(f, f, 1)
        self.conv_max = conv(f, f, 3)
        self.conv2 = conv(f, f, 3, stride=2, padding=0)
        self.conv3 = conv(f, f, 3)
        self.conv3_ = conv(f, f, 3)
        self.conv4 = conv(f, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        v = F.max_pool2d(c1, kernel_size=7, stride=3)
        v = F.relu(self.conv_max(v))
        c3 = F.relu(self.conv3(v))
        c3 = self.conv3_(c3)
        c3 = F.interpolate(c3, size=x.shape[-2:], mode="bilinear", align_corners=False)
        mask = torch.sigmoid(self.conv4(c3 + self.conv_f(c1_)))
        return x * mask
