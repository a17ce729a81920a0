"""The nine MRB candidate operations, as an `OPS` dict of name -> factory(channels).

Every op maps C channels to C channels at the same resolution and has no bias (the MRB's residual and
activation follow it). Their layouts, and so their state-dict keys, match the DLSR authors' release:
plain convs are a single conv (`op.0`); separable convs are ReLU, depthwise, pointwise, twice
(`op.1, op.2, op.4, op.5`); dilated convs are ReLU, dilated depthwise (dilation 2), pointwise.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from ..genotype import OP_NAMES


def conv(in_channels: int, out_channels: int, kernel_size: int, *, bias: bool = True, groups: int = 1,
         dilation: int = 1, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    """A 'same'-padded conv (for odd kernels at stride 1)."""
    if padding is None:
        padding = (kernel_size - 1) // 2 * dilation
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=bias)


def lrelu() -> nn.LeakyReLU:
    """The activation used throughout RFDN/DLSR."""
    return nn.LeakyReLU(0.05)


def plain_conv(channels: int, k: int) -> nn.Sequential:
    return nn.Sequential(conv(channels, channels, k, bias=False))


def sep_conv(channels: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        conv(channels, channels, k, bias=False, groups=channels),
        conv(channels, channels, 1, bias=False),
        nn.ReLU(),
        conv(channels, channels, k, bias=False, groups=channels),
        conv(channels, channels, 1, bias=False),
    )


def dil_conv(channels: int, k: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ReLU(),
        conv(channels, channels, k, bias=False, groups=channels, dilation=2),
        conv(channels, channels, 1, bias=False),
    )


OPS: dict[str, Callable[[int], nn.Sequential]] = {
    "conv_1x1": lambda c: plain_conv(c, 1),
    "conv_3x3": lambda c: plain_conv(c, 3),
    "conv_5x5": lambda c: plain_conv(c, 5),
    "conv_7x7": lambda c: plain_conv(c, 7),
    "sep_conv_3x3": lambda c: sep_conv(c, 3),
    "sep_conv_5x5": lambda c: sep_conv(c, 5),
    "sep_conv_7x7": lambda c: sep_conv(c, 7),
    "dil_conv_3x3": lambda c: dil_conv(c, 3),
    "dil_conv_5x5": lambda c: dil_conv(c, 5),
}
assert tuple(OPS) == OP_NAMES, "OPS and genotype.OP_NAMES must list the same ops in the same order"
