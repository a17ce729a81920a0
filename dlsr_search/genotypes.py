"""Genotypes for training: resolving ``--genotype`` and deriving one from supernet architecture weights."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from dlsr_infer.genotype import BUILTIN, OP_NAMES, Genotype, GenotypeError, builtin, load, loads


def resolve_genotype(spec: str | None, scale: int, channels: int | None = None) -> tuple[Genotype, list[str]]:
    """``--genotype`` (a shipped name, a genotype JSON file, a model directory, or JSON text) -> Genotype.

    None means the shipped ``dlsr_x{scale}``. A genotype searched at another scale is retargeted to
    ``scale`` (the cells do not depend on it, only the upsampler does); ``channels`` overrides the width.
    Returns the genotype and notes on what was changed, for the log.
    """
    notes: list[str] = []
    if spec is None:
        spec = f"dlsr_x{scale}"
        if spec not in BUILTIN:
            raise GenotypeError(f"--scale must be 2, 3 or 4, got {scale}")
    if spec in BUILTIN:
        genotype = builtin(spec)
    elif spec.lstrip().startswith("{"):
        genotype = loads(spec)
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise GenotypeError(f"--genotype {spec!r} is neither a shipped genotype ({', '.join(BUILTIN)}) "
                                "nor a genotype JSON file / model directory")
        genotype = load(path)
    if genotype.scale != scale:
        notes.append(f"genotype {genotype.name or spec} is x{genotype.scale}; retargeted to x{scale}")
        genotype = genotype.replace(scale=scale)
    if channels is not None and channels != genotype.channels:
        notes.append(f"channels {genotype.channels} -> {channels}")
        genotype = genotype.replace(channels=channels)
    return genotype, notes


def derive_genotype(alphas: torch.Tensor, betas: Sequence[torch.Tensor], *, scale: int, channels: int,
                    num_cells: int, in_channels: int = 3, out_channels: int = 3, name: str | None = None,
                    provenance: Mapping[str, Any] | None = None) -> Genotype:
    """The discrete network a supernet's architecture weights point at.

    - ops: argmax of alpha for each MRB (alphas (3, 9) shared by all cells, or (cells, 3, 9));
    - links: cells 1 and 2 are chained (stem -> cell 1 -> cell 2); cell j >= 3 reads the two earlier
      cells with the largest beta_j (its candidates are cells 1..j-1, as in the authors' search space),
      listed in ascending order;
    - provenance: the softmax-normalised alphas and betas (plus whatever the caller adds: seed, data, step).
    """
    alphas = raw = alphas.detach().float().cpu()
    if alphas.dim() == 2:
        alphas = alphas.expand(num_cells, *alphas.shape)
    if alphas.shape != (num_cells, 3, len(OP_NAMES)):
        raise ValueError(f"alphas must be (3, {len(OP_NAMES)}) or ({num_cells}, 3, {len(OP_NAMES)}), got {tuple(alphas.shape)}")
    if len(betas) != max(0, num_cells - 2):
        raise ValueError(f"{num_cells} cells need {max(0, num_cells - 2)} beta vectors, got {len(betas)}")
    cells = []
    for j in range(1, num_cells + 1):
        ops = [OP_NAMES[int(i)] for i in alphas[j - 1].argmax(-1)]
        if j <= 2:
            inputs = [j - 1]
        else:
            beta = betas[j - 3].detach().float().cpu()
            if beta.shape != (j - 1,):
                raise ValueError(f"beta of cell {j} must have {j - 1} entries, got {tuple(beta.shape)}")
            top = torch.argsort(beta, descending=True, stable=True)[:2].tolist()  # ties: the earlier input, as argmax
            inputs = sorted(i + 1 for i in top)  # candidate i is cell i+1 (index 0 is the stem)
        cells.append({"ops": ops, "inputs": inputs})
    def rounded(t: torch.Tensor, digits: int = 6) -> Any:
        def rnd(v: Any) -> Any:
            return [rnd(x) for x in v] if isinstance(v, list) else round(v, digits)
        return rnd(t.tolist())

    cpu_betas = [b.detach().float().cpu() for b in betas]
    prov = {  # alphas: (3, 9) when shared by all cells, else (cells, 3, 9); betas: one vector per cell j >= 3
        "alphas": rounded(raw),
        "betas": [rounded(b) for b in cpu_betas],
        "alphas_softmax": rounded(raw.softmax(-1), 5),
        "betas_softmax": [rounded(b.softmax(-1), 5) for b in cpu_betas],
        "op_names": list(OP_NAMES),
    }
    prov.update(provenance or {})
    data: dict[str, Any] = {
        "format_version": 1, "scale": scale, "in_channels": in_channels, "out_channels": out_channels,
        "channels": channels, "cells": cells, "provenance": json.loads(json.dumps(prov)),
    }
    if name is not None:
        data["name"] = name
    return Genotype.from_dict(data)


__all__ = ["derive_genotype", "resolve_genotype"]
