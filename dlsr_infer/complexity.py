"""Parameters and Multi-Adds, counted the way lightweight-SR papers report them.

Multi-Adds: one multiply-add per conv output element x (in_channels / groups) x kernel area, summed
over every conv (ESA's included; activations, pooling, interpolation and pixel shuffle are free), for
an output of 1280x720. The LR input is (1280 // scale) x (720 // scale) pixels, i.e. 640x360 for x2,
426x240 for x3 and 320x180 for x4.
"""
from __future__ import annotations

import torch
from torch import nn

OUTPUT_SIZE = (720, 1280)  # (H, W) of the output at which Multi-Adds are reported


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_size(scale: int, output_size: tuple[int, int] = OUTPUT_SIZE) -> tuple[int, int]:
    return output_size[0] // scale, output_size[1] // scale


def count_multi_adds(model: nn.Module, input_size: tuple[int, int], in_channels: int = 3) -> int:
    """Multi-Adds of one forward pass on a 1 x in_channels x H x W input (measured with hooks)."""
    total = 0

    def hook(module: nn.Conv2d, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    weight = next(model.parameters(), None)  # the probe goes where the model is, in its precision
    probe = torch.zeros(1, in_channels, *input_size, device=weight.device if weight is not None else None,
                        dtype=weight.dtype if weight is not None else None)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(probe)
    finally:
        for h in handles:
            h.remove()
    return total


def complexity(model: nn.Module, scale: int | None = None) -> dict[str, float | int | str]:
    """{'params', 'multi_adds', 'lr_size'} for a 1280x720 output."""
    scale = scale or int(getattr(model, "scale"))
    size = lr_size(scale)
    in_ch = getattr(getattr(model, "genotype", None), "in_channels", 3)
    return {"params": count_parameters(model), "multi_adds": count_multi_adds(model, size, in_ch),
            "lr_size": f"{size[1]}x{size[0]}"}
