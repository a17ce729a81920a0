"""Generate `examples/sample.png`, the small test card README's first command upscales.

A 128x128 RGB image built with numpy only, so it is reproducible and free of licensing questions. It
holds what shows off (and stresses) a super-resolution network: hard edges at several angles, stripes
whose frequency rises towards the Nyquist limit, text-like glyph rows, smooth gradients, a disc with an
anti-aliased rim and a little noise texture.

    python examples/make_sample.py            # rewrites examples/sample.png
    python examples/make_sample.py -o x.png --size 256
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

# 5x7 bitmap glyphs for a few letters: the "text" rows.
_GLYPHS = {
    "D": ["11110", "10001", "10001", "10001", "10001", "10001", "11110"],
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "S": ["01111", "10000", "10000", "01110", "00001", "00001", "11110"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "x": ["00000", "00000", "10001", "01010", "00100", "01010", "10001"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
}


def _text(img: np.ndarray, text: str, y: int, x: int, color: tuple[float, float, float], px: int = 1) -> None:
    for ch in text:
        glyph = _GLYPHS.get(ch)
        if glyph is not None:
            for r, row in enumerate(glyph):
                for c, bit in enumerate(row):
                    if bit == "1":
                        img[y + r * px:y + (r + 1) * px, x + c * px:x + (c + 1) * px] = color
        x += 6 * px


def make_sample(size: int = 128, seed: int = 0) -> np.ndarray:
    """The test card as an H x W x 3 uint8 array (deterministic for a given size and seed)."""
    if size < 64:
        raise ValueError(f"size must be at least 64, got {size}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / (size - 1)
    # Background: a diagonal colour gradient.
    img = np.stack([0.15 + 0.7 * xx, 0.2 + 0.6 * yy, 0.85 - 0.6 * (xx + yy) / 2], axis=-1)
    h = size // 4
    # Top band: vertical stripes with rising frequency (a chirp), black/white.
    band = (np.sin(np.pi * (2 + 30 * xx[:h] ** 2) * xx[:h] * 8) > 0).astype(np.float64)
    img[:h] = band[..., None] * 0.9 + 0.05
    # Text-like rows on a light panel.
    img[h:2 * h, : size // 2] = 0.92
    _text(img, "DLSR x4", h + 2, 2, (0.05, 0.05, 0.1))
    _text(img, "SR DLx4", h + 11, 2, (0.6, 0.05, 0.05))
    _text(img, "x4 DLSR", h + 20, 2, (0.05, 0.3, 0.05))
    # A disc with an anti-aliased rim and a checkerboard next to it.
    cy, cx, r = 1.5 * h / (size - 1), 0.75, 0.16
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    rim = np.clip((r - d) * size, 0.0, 1.0)[..., None]
    img = img * (1 - rim) + rim * np.array([0.95, 0.75, 0.1])
    checker = ((np.arange(size)[:, None] // 4 + np.arange(size)[None, :] // 4) % 2).astype(np.float64)
    q = slice(2 * h, 3 * h)
    img[q, size // 2:] = checker[q, size // 2:, None] * 0.8 + 0.1
    # Bottom band: slanted edges (aliasing test) over a horizontal gray ramp, plus mild noise texture.
    ramp = xx[3 * h:]
    slant = ((xx[3 * h:] * 3 + yy[3 * h:] * 5) % 0.5 < 0.25).astype(np.float64)
    img[3 * h:] = (0.25 + 0.5 * ramp * slant + 0.2 * (1 - slant))[..., None] * np.array([1.0, 0.95, 0.9])
    img[2 * h:3 * h, : size // 2] = 0.5 + 0.08 * rng.standard_normal((h, size // 2, 1))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(Path(__file__).with_name("sample.png")))
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    if args.size < 64:
        ap.error(f"--size must be at least 64, got {args.size}")
    Image.fromarray(make_sample(args.size)).save(args.output, optimize=True)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
