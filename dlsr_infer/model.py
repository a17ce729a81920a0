"""`DLSR`: the fixed network built from a genotype, with `save_pretrained` / `from_pretrained`.

Inputs and outputs are RGB in [0, 1] (NCHW float). Inputs must be at least `MIN_INPUT_SIZE` pixels on
each side (ESA's strided conv + 7x7 max-pool need it); `upscale()` pads smaller images for you.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .genotype import Genotype, builtin
from .layers import CellLink, DistillationCell, OPS
from .layers.network import CellNetwork

#: Smallest H and W the network accepts (ESA: stride-2 3x3 conv then a 7x7 max-pool).
MIN_INPUT_SIZE = 15


class DLSR(CellNetwork):
    """A DLSR super-resolution network, built only from a `Genotype`.

    Construct from a genotype (`DLSR(genotype)` or `DLSR.from_genotype_name("dlsr_x4")`), or load
    trained weights with `DLSR.from_pretrained("x4")`, a model directory, or a Hub repo id.
    """

    def __init__(self, genotype: Genotype) -> None:
        if not isinstance(genotype, Genotype):
            raise TypeError(f"DLSR needs a Genotype, got {type(genotype).__name__}")
        c = genotype.channels
        cells = [DistillationCell(c, [OPS[op](c) for op in spec.ops]) for spec in genotype.cells]
        links = [nn.Identity() if len(spec.inputs) == 1 else CellLink(c, len(spec.inputs))
                 for spec in genotype.cells]
        super().__init__(in_channels=genotype.in_channels, out_channels=genotype.out_channels,
                         channels=c, scale=genotype.scale, cells=cells, links=links)
        self.genotype = genotype
        self.eval()

    #: Eval-mode `forward()` without autograd runs the fused inference form (`dlsr_infer.fast`: same
    #: function, fewer and fused kernels), cached and rebuilt whenever a parameter changes. False: always
    #: run the layers (e.g. to step through them).
    fast_inference: bool = True
    #: Precision of that form: "fp32" (within 1e-4 of the layers), "bf16", or "auto" (bf16 where the CPU
    #: has native bf16, else fp32). `torch.autocast("cpu", torch.bfloat16)` also selects bf16.
    inference_precision: str = "fp32"

    def cell_input(self, index: int, feats: list[torch.Tensor]) -> torch.Tensor:
        inputs = self.genotype.cells[index].inputs
        if len(inputs) == 1:
            return feats[inputs[0]]
        return self.links[index]([feats[i] for i in inputs])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.genotype.in_channels:
            raise ValueError(
                f"DLSR expects an N x {self.genotype.in_channels} x H x W tensor, got shape {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} is smaller than {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}, the least DLSR "
                "accepts; dlsr_infer.upscale() pads small images automatically"
            )
        if self.fast_inference and not self.training and not torch.is_grad_enabled():
            from .fast import dispatch

            y = dispatch(self, x)
            if y is not None:
                return y
        return super().forward(x)

    # --- construction helpers ----------------------------------------------------------------
    @classmethod
    def from_genotype_name(cls, name: str) -> "DLSR":
        """A randomly initialised network from a shipped genotype ('dlsr_x2', ..., 'dlsr_s_x2')."""
        return cls(builtin(name))

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- weights ------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, *, model_card: str | None = None,
                        metadata: dict[str, str] | None = None) -> Path:
        """Write a model directory: config.json (the genotype), model.safetensors (+ README.md)."""
        from .pretrained import save_model_dir

        return save_model_dir(self, directory, model_card=model_card, metadata=metadata)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, revision: str | None = None,
                        local_files_only: bool = False, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None, map_location: Any = "cpu") -> "DLSR":
        """Load a trained network.

        `name_or_path` is a local model directory, a short alias ('x2', 'x3', 'x4', 'x2-s') resolved
        to the weights bundled with this package, or a Hugging Face Hub repo id ('owner/name') fetched
        through the Hub cache (`revision`, `local_files_only`, `HF_HUB_OFFLINE` honoured).
        Loading is strict and pickle-free (safetensors).
        """
        from .pretrained import load_model_dir, resolve

        directory = resolve(name_or_path, revision=revision, local_files_only=local_files_only,
                            cache_dir=cache_dir, token=token)
        return load_model_dir(cls, directory, map_location=map_location)
