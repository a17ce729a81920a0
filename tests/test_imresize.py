"""MATLAB-compatible bicubic imresize: bit-exact against the MATLAB-made Set5 LR images, plus properties."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr_infer.imresize import contributions, imresize, imresize_torch, modcrop, output_size

SET5 = ("baby", "bird", "butterfly", "head", "woman")


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_bit_exact_with_matlab_set5(benchmarks_dir: Path, scale: int) -> None:
    """imresize(modcrop(HR, s), 1/s) must equal MATLAB's LR_bicubic PNGs byte for byte."""
    for name in SET5:
        hr = modcrop(_load(benchmarks_dir / "Set5" / "HR" / f"{name}.png"), scale)
        expected = _load(benchmarks_dir / "Set5" / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png")
        lr = imresize(hr, 1 / scale)
        assert lr.dtype == np.uint8
        assert np.array_equal(lr, expected), f"{name} x{scale}: {(lr != expected).sum()} pixels differ"


def test_rounding_each_pass_is_what_makes_it_exact(benchmarks_dir: Path) -> None:
    """Negative control: rounding only once at the end (float path) is NOT bit-exact."""
    hr = modcrop(_load(benchmarks_dir / "Set5" / "HR" / "bird.png"), 2)
    expected = _load(benchmarks_dir / "Set5" / "LR_bicubic" / "X2" / "birdx2.png")
    once = np.clip(np.floor(imresize(hr.astype(np.float64), 0.5) + 0.5), 0, 255).astype(np.uint8)
    assert not np.array_equal(once, expected)
    assert np.abs(once.astype(int) - expected).max() <= 1


def test_dtypes_and_shapes() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    assert imresize(img, 2).shape == (34, 46, 3)
    assert imresize(img, 0.5).shape == (9, 12, 3)  # MATLAB: ceil(scale * size)
    assert imresize(img, output_shape=(5, 40)).shape == (5, 40, 3)
    assert imresize(img, (2, 0.5)).shape == (34, 12, 3)
    assert imresize(img[:, :, 0], 3).shape == (51, 69)
    assert imresize(img.astype(np.float32), 2).dtype == np.float32
    assert imresize(img.astype(np.float64), 2).dtype == np.float64
    assert imresize(img.astype(np.int32), 2).dtype == np.float64
    # 1/3 of a mod-3 size is exact despite 255 * (1/3) being a hair off 85 in floating point.
    assert output_size((255, 342), 1 / 3) == (85, 114)


def test_gray_equals_per_channel() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)
    out = imresize(img, 0.25)
    for c in range(3):
        assert np.array_equal(imresize(img[:, :, c], 0.25), out[:, :, c])


@pytest.mark.parametrize("scale", [0.25, 1 / 3, 0.5, 2, 3, 4])
def test_constant_image_is_preserved(scale: float) -> None:
    """Weights sum to one, including the mirrored taps at the borders (tiny inputs wrap repeatedly)."""
    for shape in [(2, 3), (7, 5), (30, 31)]:
        img = np.full(shape + (3,), 137, dtype=np.uint8)
        assert np.all(imresize(img, scale) == 137)
        assert np.allclose(imresize(img.astype(np.float64), scale), 137.0, atol=1e-10)


def test_contributions_identity_at_scale_one_and_mirror() -> None:
    w, idx = contributions(6, 6, 1.0)
    dense = np.zeros((6, 6))
    np.add.at(dense, (np.repeat(np.arange(6), w.shape[1]), idx.ravel()), w.ravel())
    assert np.allclose(dense, np.eye(6))
    w, idx = contributions(4, 2, 0.5)
    assert np.allclose(w.sum(axis=1), 1.0)
    assert idx.min() >= 0 and idx.max() <= 3
    # First output pixel's left taps reach before the start and are mirrored: ..., 1, 0, 0, 1, ...
    assert list(idx[0, :4]) == [2, 1, 0, 0]


def test_smaller_scale_dimension_is_resized_first() -> None:
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    out = imresize(img, output_shape=(24, 8))  # cols scale 0.5 < rows scale 2 -> columns first
    cols_first = imresize(imresize(img, output_shape=(12, 8)), output_shape=(24, 8))
    rows_first = imresize(imresize(img, output_shape=(24, 16)), output_shape=(24, 8))
    assert np.array_equal(out, cols_first)
    assert not np.array_equal(out, rows_first)
    # Equal scales: rows first.
    out = imresize(img, 0.5)
    assert np.array_equal(out, imresize(imresize(img, output_shape=(6, 16)), output_shape=(6, 8)))


def test_torch_matches_numpy_float() -> None:
    rng = np.random.default_rng(3)
    img = rng.random((19, 14, 3)) * 255
    x = torch.from_numpy(img).permute(2, 0, 1)[None].requires_grad_(True)
    for kwargs in ({"scale": 0.25}, {"scale": 3}, {"output_shape": (40, 7)}):
        y = imresize_torch(x, **kwargs)
        ref = imresize(img, **kwargs)
        assert np.allclose(y[0].permute(1, 2, 0).detach().numpy(), ref, atol=1e-9)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert imresize_torch(x.detach().float(), 2).dtype == torch.float32


def test_modcrop() -> None:
    img = np.zeros((101, 77, 3), dtype=np.uint8)
    assert modcrop(img, 4).shape == (100, 76, 3)
    assert modcrop(img[:, :, 0], 3).shape == (99, 75)
    assert modcrop(img, 1).shape == img.shape
    with pytest.raises(ValueError, match="scale"):
        modcrop(img, 0)
    with pytest.raises(ValueError, match="scale"):
        modcrop(img, 2.5)
    with pytest.raises(ValueError, match="smaller than scale"):
        modcrop(np.zeros((2, 8)), 3)


def test_errors_name_the_problem() -> None:
    img = np.zeros((8, 8), dtype=np.uint8)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img)
    with pytest.raises(ValueError, match="exactly one"):
        imresize(img, 2, output_shape=(4, 4))
    with pytest.raises(ValueError, match="HxW"):
        imresize(np.zeros((1, 8, 8, 3)), 2)
    with pytest.raises(ValueError, match="positive"):
        imresize(img, -2)
    with pytest.raises(ValueError, match="output_shape"):
        imresize(img, output_shape=(0, 4))
    with pytest.raises(ValueError, match="floating-point"):
        imresize_torch(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2)
