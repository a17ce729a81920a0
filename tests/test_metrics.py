"""Y-channel PSNR/SSIM: hand-computable cases and a brute-force SSIM reference."""
from __future__ import annotations

import math

import numpy as np
import pytest

from dlsr_infer.metrics import gaussian_window, psnr, psnr_y, rgb_to_y, ssim, ssim_y


def test_rgb_to_y_known_values() -> None:
    img = np.array([[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.uint8)
    y = rgb_to_y(img)
    assert y.dtype == np.float64 and y.shape == (1, 5)
    assert np.allclose(y, [[16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966]])
    # Not rounded: mid gray gives a fractional Y.
    assert rgb_to_y(np.full((1, 1, 3), 100, np.uint8))[0, 0] == pytest.approx(16 + 100 * 219 / 255)


def test_gray_is_replicated_rgb() -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 7), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.allclose(rgb_to_y(gray), rgb_to_y(rgb))
    assert np.allclose(rgb_to_y(gray[:, :, None]), rgb_to_y(rgb))
    with pytest.raises(ValueError, match="HxW"):
        rgb_to_y(np.zeros((4, 4, 2)))


def test_psnr_identical_is_inf() -> None:
    img = np.full((10, 10, 3), 77, np.uint8)
    assert psnr_y(img, img, crop=2) == math.inf
    assert psnr(img, img) == math.inf


def test_psnr_known_mse() -> None:
    a = np.zeros((4, 4))
    assert psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2))  # MSE 1 -> 48.1308 dB
    assert psnr(a, a + 255) == pytest.approx(0.0)
    # Gray values differing by 1 -> Y differs by 219/255 everywhere.
    hr = np.full((8, 8), 100, np.uint8)
    expected = 20 * math.log10(255 / (219 / 255))
    assert psnr_y(hr + 1, hr) == pytest.approx(expected)
    # A wrong border disappears with the crop.
    sr = hr.copy()
    sr[0, :] = 0
    assert psnr_y(sr, hr, crop=1) == math.inf
    assert psnr_y(sr, hr, crop=0) < 30


def test_gaussian_window() -> None:
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and g.sum() == pytest.approx(1.0)
    assert np.allclose(g, g[::-1]) and g.argmax() == 5
    assert g[4] / g[5] == pytest.approx(math.exp(-1 / (2 * 1.5**2)))


def _ssim_bruteforce(a: np.ndarray, b: np.ndarray) -> float:
    """Direct per-window SSIM with the 11x11 Gaussian, valid positions only."""
    g = gaussian_window()
    w = np.outer(g, g)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(a.shape[0] - 10):
        for j in range(a.shape[1] - 10):
            pa, pb = a[i : i + 11, j : j + 11], b[i : i + 11, j : j + 11]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * pa * pa).sum() - ma**2, (w * pb * pb).sum() - mb**2
            cov = (w * pa * pb).sum() - ma * mb
            vals.append(((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim_matches_bruteforce() -> None:
    rng = np.random.default_rng(1)
    a = rng.random((17, 20)) * 255
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    assert ssim(a, b) == pytest.approx(_ssim_bruteforce(a, b), abs=1e-12)


def test_ssim_constant_images_hand_computed() -> None:
    a, b = np.full((12, 12), 100.0), np.full((12, 12), 120.0)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))


def test_ssim_identity_symmetry_noise() -> None:
    rng = np.random.default_rng(2)
    hr = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
    noisy = np.clip(hr.astype(int) + rng.integers(-20, 21, hr.shape), 0, 255).astype(np.uint8)
    assert ssim_y(hr, hr, crop=2) == pytest.approx(1.0)
    s = ssim_y(noisy, hr, crop=2)
    assert 0 < s < 1
    assert ssim_y(hr, noisy, crop=2) == pytest.approx(s, abs=1e-15)


def test_errors() -> None:
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        psnr_y(a, a[:-1])
    with pytest.raises(ValueError, match="same shape"):
        ssim_y(a, a[:, :-1])
    with pytest.raises(ValueError, match="crop"):
        psnr_y(a, a, crop=10)
    with pytest.raises(ValueError, match="crop"):
        psnr_y(a, a, crop=-1)
    with pytest.raises(ValueError, match="11x11"):
        ssim_y(a, a, crop=5)
