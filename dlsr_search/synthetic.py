"""Small synthetic RGB images (smooth waves + noise) for tests, benchmarks and smoke runs without a dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: str | Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` PNGs of ``size`` x ``size`` pixels into ``folder``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 6, size=3)
        img = np.stack([np.sin(f[c] * (xx + rng.uniform()) * np.pi + f[(c + 1) % 3] * yy) for c in range(3)], -1)
        img = (img * 0.4 + 0.5 + rng.normal(0, 0.03, img.shape)).clip(0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"img{i}.png")
    return folder


__all__ = ["write_images"]
