"""PSNR and SSIM on the luma (Y) channel, following the standard SR evaluation convention.

The convention used by EDSR/RFDN-style code (and by the DLSR authors' evaluation script) is:

* convert RGB in [0, 255] to ITU-R BT.601 luma ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``
  in float64, *without* rounding Y to integers;
* crop ``crop`` pixels (normally the scale factor) from every border;
* PSNR with peak 255 over the cropped Y;
* SSIM (Wang et al. 2004) with an 11x11 Gaussian window (sigma 1.5), only over the "valid" region
  where the window fits entirely, constants ``C1 = (0.01*255)^2`` and ``C2 = (0.03*255)^2``.

Grayscale images (``HxW`` or ``HxWx1``, e.g. Set14 ``bridge``) are treated as RGB with the gray value
replicated in all three channels, so ``Y = 16 + gray * 219 / 255``. This equals what the common
scripts compute after loading a gray PNG as 3-channel (``cv2.imread`` default), so scores are
comparable with published tables.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["rgb_to_y", "psnr", "psnr_y", "ssim", "ssim_y", "gaussian_window"]

_Y_COEFFS = np.array([65.481, 128.553, 24.966], dtype=np.float64)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB (``HxWx3``) or gray (``HxW`` / ``HxWx1``) image with values in [0, 255].

    Returns float64 ``HxW`` Y in [16, 235], unrounded. A gray image counts as RGB with the value
    replicated to all three channels. Float inputs must already be on the [0, 255] scale.
    """
    arr = np.asarray(img)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise ValueError(f"image must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return 16.0 + arr * (_Y_COEFFS.sum() / 255.0)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        # An alpha channel (4th) is ignored.
        return 16.0 + (arr[:, :, :3] @ _Y_COEFFS) / 255.0
    raise ValueError(f"image must be HxW, HxWx1 or HxWx3, got shape {arr.shape}")


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _crop(img: np.ndarray, crop: int) -> np.ndarray:
    if int(crop) != crop or crop < 0:
        raise ValueError(f"crop must be a non-negative integer, got {crop!r}")
    crop = int(crop)
    if crop == 0:
        return img
    if img.shape[0] <= 2 * crop or img.shape[1] <= 2 * crop:
        raise ValueError(f"crop={crop} removes the whole image of shape {img.shape}")
    return img[crop:-crop, crop:-crop]


def psnr(a: np.ndarray, b: np.ndarray, *, peak: float = 255.0) -> float:
    """PSNR in dB of two same-shape arrays (float64 maths). Identical inputs give ``inf``."""
    a, b = _check_pair(a, b)
    if a.size == 0:
        raise ValueError("images are empty")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


def psnr_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
    """PSNR on Y of two uint8-range images after cropping ``crop`` border pixels (pass ``crop=scale``).

    Returns ``math.inf`` for identical crops; callers averaging over a set should be aware of that.
    """
    sr, hr = _check_pair(sr, hr)
    return psnr(_crop(rgb_to_y(sr), crop), _crop(rgb_to_y(hr), crop))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian (sums to 1); the 2-D SSIM window is its outer product."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with window ``outer(g, g)``, 'valid' region only."""
    k = g.size
    rows = np.lib.stride_tricks.sliding_window_view(img, k, axis=0) @ g  # (H-k+1, W)
    return np.lib.stride_tricks.sliding_window_view(rows, k, axis=1) @ g  # (H-k+1, W-k+1)


def ssim(a: np.ndarray, b: np.ndarray, *, peak: float = 255.0) -> float:
    """Mean SSIM of two same-shape 2-D arrays (values on a ``peak`` scale), valid region only."""
    a, b = _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"ssim needs 2-D arrays, got shape {a.shape}")
    g = gaussian_window(11, 1.5)
    if min(a.shape) < g.size:
        raise ValueError(f"images of shape {a.shape} are smaller than the 11x11 SSIM window")
    a, b = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_aa
    var_b = _filter_valid(b * b, g) - mu_bb
    cov = _filter_valid(a * b, g) - mu_ab
    ssim_map = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim_y(sr: np.ndarray, hr: np.ndarray, crop: int = 0) -> float:
    """SSIM on Y of two uint8-range images after cropping ``crop`` border pixels (pass ``crop=scale``)."""
    sr, hr = _check_pair(sr, hr)
    return ssim(_crop(rgb_to_y(sr), crop), _crop(rgb_to_y(hr), crop))
