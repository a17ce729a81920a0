"""Tiled inference: layout, blending, seams, OOM back-off and the NaN guard (`dlsr_infer.tiling`).

The seam tests use random-weight x2/x4 networks whose weights are drawn so that signals neither die
out nor explode through the 6 cells ("lively": He-normal x 0.7, output centred in [0, 1]). PyTorch's
default init is degenerate for this purpose: its features fade so fast that a pixel sees barely
2 LR px of context and any tiling looks seamless. The lively networks see ~24 LR px, like the
authors' trained x2 weights (measured the same way), and a zero-overlap tiling of them shows strong
seams, so the metrics below can tell a seam when there is one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from dlsr_infer import DLSR
from dlsr_infer.genotype import builtin
from conftest import lively_model
from dlsr_infer.model import MIN_INPUT_SIZE
from dlsr_infer import tiling
from dlsr_infer.tiling import (DEFAULT_OVERLAP, ESA_STRIDE, TileOOMError, auto_tile, axis_weights, context_alignment,
                               plan_tiles, run_tiled)


def lively(name: str, seed: int = 0) -> DLSR:
    """A random-weight DLSR whose signals propagate (see the module docstring)."""
    return lively_model(name, seed=seed, out_gain=0.5)


def texture(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A statistically homogeneous test image (1 x 3 x h x w in [0, 1]): waves, edges and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.zeros((h, w, 3))
    for _ in range(16):
        f, theta, phase = rng.uniform(0.01, 0.3), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * f * (xx * np.cos(theta) + yy * np.sin(theta)) + phase)
        img += wave[..., None] * rng.uniform(0.2, 1.0, 3)
    for _ in range(h * w // 2000):
        y0, x0 = rng.integers(0, h), rng.integers(0, w)
        img[y0:y0 + rng.integers(4, 40), x0:x0 + rng.integers(4, 40)] += rng.uniform(-2, 2, 3)
    img += rng.normal(0, 0.3, img.shape)
    img = (img - img.min()) / (img.max() - img.min())
    return torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0).float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1.0 / float(((a - b) ** 2).mean()))


def seam_metrics(out: torch.Tensor, ref: torch.Tensor, grid, scale: int) -> dict[str, float]:
    """How much the tiled-vs-whole error concentrates on the tile boundaries.

    * `band`: mean error where neighbouring tiles are blended / mean error everywhere else;
    * `step`: the largest jump of the error field between adjacent lines inside the overlaps / the
      largest jump elsewhere (a seam is a discontinuity);
    * `spike_band`, `spike_else`: the largest ratio of a column's (row's) mean error to the running
      median of its +-24 LR px neighbourhood, on boundary lines and elsewhere (a seam is a narrow line
      of extra error; this ignores the smooth, tile-sized variation ESA's drift leaves everywhere).
    """
    d = (out - ref)[0]
    err = d.abs().mean(0)
    h, w = err.shape
    trim = grid.overlap * tiling.TRIM_FRACTION

    def lines(starts, size, n, which):
        m = torch.zeros(n, dtype=torch.bool)
        for a, b in zip(starts, starts[1:]):
            lo, hi = (b + trim, a + size - trim) if which == "ramp" else (b, a + size)
            if hi - lo < 16:  # tiles that merely abut: the cut line +-8 LR px
                lo, hi = (lo + hi) / 2 - 8, (lo + hi) / 2 + 8
            m[int(lo * scale):int(math.ceil(hi * scale))] = True
        return m

    cols, rows = lines(grid.xs, grid.tile_w, w, "ramp"), lines(grid.ys, grid.tile_h, h, "ramp")
    band = cols[None, :] | rows[:, None]
    result = {"band": float(err[band].mean() / err[~band].mean())}
    cols, rows = lines(grid.xs, grid.tile_w, w, "overlap"), lines(grid.ys, grid.tile_h, h, "overlap")
    dx = (d[:, :, 1:] - d[:, :, :-1]).abs().mean(dim=(0, 1))
    dy = (d[:, 1:, :] - d[:, :-1, :]).abs().mean(dim=(0, 2))
    cm, rm = cols[1:] | cols[:-1], rows[1:] | rows[:-1]
    result["step"] = max(float(dx[cm].max() / dx[~cm].max()), float(dy[rm].max() / dy[~rm].max()))

    def spikes(profile: torch.Tensor, on: torch.Tensor) -> tuple[float, float]:
        r = 24 * scale
        local = torch.stack([profile[max(0, i - r):i + r + 1].median() for i in range(len(profile))])
        ratio = profile / local
        return float(ratio[on].max()), float(ratio[~on].max())

    bx, ex = spikes(err.mean(0), cols)
    by, ey = spikes(err.mean(1), rows)
    result["spike_band"], result["spike_else"] = max(bx, by), max(ex, ey)
    return result


# --- layout --------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, database=None)
@given(length=st.integers(1, 3000), tile=st.integers(102, 700), overlap=st.integers(0, 48))
def test_plan_covers_the_image_with_aligned_same_size_tiles(length: int, tile: int, overlap: int) -> None:
    grid = plan_tiles(length, 37, tile=tile, overlap=overlap)
    ys, size = grid.ys, grid.tile_h
    assert ys[0] == 0 and ys[-1] + size == length  # covered, last tile flush with the border
    if len(ys) == 1:
        assert size == length
    else:
        least = max(MIN_INPUT_SIZE, 2 * overlap + ESA_STRIDE)
        assert size < length and size <= max(tile, least + ESA_STRIDE)  # memory stays bounded by the tile
        # no needless tiles: aligning the last start and the stride each cost < ESA_STRIDE px per tile
        assert len(ys) <= math.ceil((length - overlap) / (tile - overlap - 2 * (ESA_STRIDE - 1))) + 1
        assert all(y % ESA_STRIDE == 0 for y in ys)  # on ESA's pooling grid
        assert all(b - a <= size - overlap for a, b in zip(ys, ys[1:]))  # overlap >= requested
        assert all(b > a for a, b in zip(ys, ys[1:]))


def test_plan_whole_image_and_bad_arguments() -> None:
    assert plan_tiles(300, 200, tile=0, overlap=48).is_whole
    assert plan_tiles(300, 200, tile=512, overlap=48).is_whole
    with pytest.raises(ValueError, match="too small for tile_overlap"):
        plan_tiles(300, 300, tile=64, overlap=48)
    with pytest.raises(ValueError, match="non-negative"):
        plan_tiles(300, 300, tile=-1, overlap=8)
    with pytest.raises(ValueError, match="tile_overlap"):
        plan_tiles(300, 300, tile=128, overlap=-2)


@settings(max_examples=200, deadline=None, database=None)
@given(length=st.integers(60, 2000), tile=st.integers(102, 400), overlap=st.integers(0, 48),
       scale=st.sampled_from([2, 3, 4]))
def test_blend_weights_never_vanish(length: int, tile: int, overlap: int, scale: int) -> None:
    grid = plan_tiles(length, length, tile=tile, overlap=overlap)
    total = torch.zeros(length * scale)
    for y in grid.ys:
        total[y * scale:(y + grid.tile_h) * scale] += axis_weights(y, grid.tile_h, length, overlap, scale)
    assert float(total.min()) >= 0.5 - 1e-6  # some tile always carries at least half weight


def test_context_alignment_is_esa_stride() -> None:
    assert context_alignment(DLSR(builtin("dlsr_s_x2"))) == ESA_STRIDE == 6
    assert context_alignment(nn.Conv2d(3, 3, 3)) == 1


# --- exactness and seams ---------------------------------------------------------------------------
def test_whole_image_mode_is_the_plain_forward_pass() -> None:
    model = lively("dlsr_s_x2")
    x = texture(40, 52)
    with torch.inference_mode():
        ref = model(x)
    out, stats = run_tiled(model, x, scale=2, tile=0)
    assert stats.num_tiles == 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 23), (14, 14), (3, 40)])
def test_images_smaller_than_the_network_minimum_are_padded(shape: tuple[int, int]) -> None:
    model = lively("dlsr_s_x2")
    h, w = shape
    x = texture(max(h, MIN_INPUT_SIZE), max(w, MIN_INPUT_SIZE))[..., :h, :w]
    out, _ = run_tiled(model, x, scale=2, tile=0)
    assert out.shape == (1, 3, 2 * h, 2 * w)
    # Replicate padding: the output is the top-left of the padded image's output.
    padded = torch.nn.functional.pad(x, (0, max(0, MIN_INPUT_SIZE - w), 0, max(0, MIN_INPUT_SIZE - h)),
                                     mode="replicate")
    with torch.inference_mode():
        ref = model(padded)[..., :2 * h, :2 * w]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_the_test_network_is_not_degenerate() -> None:
    """Its output varies and depends on context well beyond a few pixels (unlike the default init)."""
    model = lively("dlsr_x2")
    x = texture(96, 96, seed=3)
    with torch.inference_mode():
        full = model(x)
        crop = model(x[..., 16:80, 16:80])
    assert float(full.std()) > 0.1
    # 10 LR px inside the crop's edge the missing context still changes the output noticeably.
    inner = (crop - full[..., 32:160, 32:160]).abs()[..., 20:24, 40:80]
    assert float(inner.mean()) > 1e-4


@pytest.fixture(scope="module")
def seam_runs():
    """Whole-image and tiled (3 x 3 tiles, default overlap) outputs of lively x2 and x4 networks on a
    512 x 512 texture."""
    x = texture(512, 512, seed=1)
    runs = {}
    for name in ("dlsr_x2", "dlsr_x4"):
        model = lively(name)
        whole, _ = run_tiled(model, x, scale=model.scale, tile=0)
        tiled, stats = run_tiled(model, x, scale=model.scale, tile=222)
        runs[name] = (model.scale, whole, tiled, plan_tiles(512, 512, tile=222, overlap=DEFAULT_OVERLAP), stats)
    return runs


@pytest.mark.parametrize("name", ["dlsr_x2", "dlsr_x4"])
def test_tiled_matches_whole_image_without_seams(seam_runs, name: str) -> None:
    scale, whole, tiled, grid, stats = seam_runs[name]
    assert grid.num_tiles == 9 and stats.num_tiles == 9  # the middle tile shares all four edges
    assert float(whole.std()) > 0.1  # not a flat, degenerate output
    assert psnr(tiled, whole) >= 50.0  # measured 71 (x2) and 79 dB (x4)
    m = seam_metrics(tiled, whole, grid, scale)
    print(f"{name}: PSNR {psnr(tiled, whole):.1f} dB, {m}")
    # Measured over seeds: band 1.01-1.12, step 1.05-1.17, spike_band 1.45-1.61 < spike_else 1.83-2.45;
    # abutting tiles without overlap (the control below): band 69, step 40, spike_band 51 vs spike_else 1.6.
    assert m["band"] <= 1.25, f"error where tiles are blended is {m['band']:.2f}x the error elsewhere"
    assert m["step"] <= 1.5, f"the error jumps {m['step']:.2f}x more across tile boundaries than elsewhere"
    assert m["spike_band"] <= m["spike_else"], f"a line of extra error on a tile boundary: {m}"


def test_seam_metrics_do_detect_seams() -> None:
    """Control: without overlap the same metrics flag the tile boundaries loudly."""
    model = lively("dlsr_s_x2")
    x = texture(192, 192, seed=2)
    whole, _ = run_tiled(model, x, scale=2, tile=0)
    tiled, _ = run_tiled(model, x, scale=2, tile=120, overlap=0)  # 2 x 2 tiles that just abut
    m = seam_metrics(tiled, whole, plan_tiles(192, 192, tile=120, overlap=0), 2)
    assert m["band"] > 3 and m["step"] > 3 and m["spike_band"] > 3 * m["spike_else"], m


def test_batched_tiles_and_images_match_one_at_a_time() -> None:
    model = lively("dlsr_s_x2")
    x = torch.cat([texture(70, 90, seed=4), texture(70, 90, seed=5)])
    one, _ = run_tiled(model, x, scale=2, tile=40, overlap=8, batch_size=1)
    many, stats = run_tiled(model, x, scale=2, tile=40, overlap=8, batch_size=5)
    assert stats.num_tiles > 4
    torch.testing.assert_close(many, one, rtol=0, atol=1e-5)
    single, _ = run_tiled(model, x[1:], scale=2, tile=40, overlap=8)
    torch.testing.assert_close(many[1:], single, rtol=0, atol=1e-5)


# --- out of memory ----------------------------------------------------------------------------------
class OOMAbove(nn.Module):
    """Test double: a network that 'runs out of CUDA memory' on inputs above a size or batch."""

    def __init__(self, inner: DLSR, *, max_side: int = 10**9, max_batch: int = 10**9) -> None:
        super().__init__()
        self.inner, self.scale, self.genotype = inner, inner.scale, inner.genotype
        self.max_side, self.max_batch = max_side, max_batch
        self.seen: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape))
        if max(x.shape[-2:]) > self.max_side or x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.numel() * 6000} bytes")
        return self.inner(x)


def test_oom_halves_the_tile_until_it_fits_and_the_result_is_right() -> None:
    inner = lively("dlsr_s_x2")
    double = OOMAbove(inner, max_side=100)
    x = texture(160, 150, seed=6)
    out, stats = run_tiled(double, x, scale=2, tile=0, overlap=16, allow_tile_fallback=True)
    assert stats.tiles_tried == [0, 80] and stats.oom_retries == 1  # whole image (160) failed, 80 fits
    assert stats.tile == 80 and max(stats.tile_h, stats.tile_w) <= 100
    expected, _ = run_tiled(inner, x, scale=2, tile=80, overlap=16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    whole, _ = run_tiled(inner, x, scale=2, tile=0)
    assert psnr(out, whole) > 50


def test_oom_halves_the_batch_first() -> None:
    inner = lively("dlsr_s_x2")
    double = OOMAbove(inner, max_batch=2)
    x = texture(90, 90, seed=7)
    out, stats = run_tiled(double, x, scale=2, tile=48, overlap=8, batch_size=8)
    assert stats.batch_size == 2 and stats.tile == 48 and stats.oom_retries == 2
    expected, _ = run_tiled(inner, x, scale=2, tile=48, overlap=8, batch_size=1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_oom_at_the_floor_and_in_exact_mode_is_a_clear_error() -> None:
    double = OOMAbove(lively("dlsr_s_x2"), max_side=10)
    x = texture(200, 200)
    with pytest.raises(TileOOMError, match=r"even with \d+x\d+ tiles .* the smallest allowed") as e:
        run_tiled(double, x, scale=2, tile=256, overlap=16)
    assert "CUDA out of memory" in str(e.value)
    with pytest.raises(TileOOMError, match="whole 200x200 image"):
        run_tiled(double, x, scale=2, tile=0, allow_tile_fallback=False)


def test_oom_at_the_floor_ends_when_the_grid_cannot_shrink_to_it() -> None:
    # Asked for the floor (2 * 64 + 6 = 134 px), plan_tiles lays 141 px out as tiles of 135+ px to stay on
    # ESA's 6-px grid: the back-off must end there, not ask for the same grid again and again.
    double = OOMAbove(lively("dlsr_s_x2"), max_side=10)
    calls = 0
    forward = double.forward

    def counted(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls > 20:
            raise AssertionError("the OOM back-off does not end")
        return forward(x)

    double.forward = counted  # type: ignore[method-assign]
    with pytest.raises(TileOOMError, match=r"even with \d+x\d+ tiles .* the smallest allowed"):
        run_tiled(double, texture(141, 141), scale=2, tile=256)
    assert calls == 2  # 141 px (the whole image), then the floor's grid


def test_upscale_backs_off_through_the_public_api() -> None:
    from dlsr_infer.upscaling import Upscaler

    double = OOMAbove(lively("dlsr_s_x2"), max_side=100)
    up = Upscaler(double, tile=None, tile_overlap=16, device="cpu")
    img = (texture(150, 160, seed=8)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = up(img)
    assert out.shape == (300, 320, 3) and out.dtype == np.uint8
    assert up.last_stats is not None and up.last_stats.tiles_tried == [0, 80]
    assert max(max(s[-2:]) for s in double.seen[1:]) <= 100  # every later tile fitted


def test_auto_tile_uses_the_memory_budget() -> None:
    model = DLSR(builtin("dlsr_x4"))
    cpu = torch.device("cpu")
    assert auto_tile(model, 100, 100, device=cpu, compute_dtype=torch.float32, budget=1 << 30) == (0, 1)
    tile, batch = auto_tile(model, 4000, 3000, device=cpu, compute_dtype=torch.float32, budget=256 << 20)
    assert 64 <= tile < 384 and tile % 8 == 0 and batch == 1  # bounded by memory
    assert auto_tile(model, 1000, 1000, device=cpu, compute_dtype=torch.float32, budget=8 << 30) == (384, 1)
    tile, batch = auto_tile(model, 4000, 3000, device=torch.device("cuda"), compute_dtype=torch.float16,
                            budget=8 << 30)
    assert tile == 1024 and batch >= 1


def test_auto_tile_never_goes_below_what_the_overlap_needs(monkeypatch) -> None:
    # A tight memory budget used to give 64..128 px tiles, which plan_tiles then refused for the default
    # overlap of 64: upscale() with default arguments failed on any image over ~130 px when memory was low.
    from dlsr_infer.upscaling import Upscaler, upscale

    model = lively("dlsr_s_x2")
    cpu = torch.device("cpu")
    floor = 2 * DEFAULT_OVERLAP + context_alignment(model)
    for budget in (1 << 20, 20 << 20, 40 << 20):
        tile, batch = auto_tile(model, 1000, 1000, device=cpu, compute_dtype=torch.float32, budget=budget)
        assert tile >= floor and batch == 1
        tile, _ = auto_tile(model, 1000, 1000, device=cpu, compute_dtype=torch.float32, budget=budget, overlap=8)
        assert 64 <= tile < floor
    monkeypatch.setattr(tiling, "memory_budget", lambda device: 20 << 20)
    up = Upscaler(model, device="cpu", dtype="fp32")
    img = (texture(150, 170, seed=3)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    out = up(img)
    assert up.last_stats is not None and up.last_stats.num_tiles > 1 and up.last_stats.tile == floor
    whole = upscale(img, model=model, device="cpu", dtype="fp32", tile=0)
    assert np.abs(out.astype(int) - whole.astype(int)).max() <= 1


# --- reduced precision ------------------------------------------------------------------------------
class NaNUnderAutocast(nn.Module):
    """Test double: the first tile of every batch overflows when run under autocast."""

    def __init__(self, inner: DLSR) -> None:
        super().__init__()
        self.inner, self.scale, self.genotype = inner, inner.scale, inner.genotype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        if torch.is_autocast_enabled("cpu"):
            y = y.clone()
            y[0, :, :3, :3] = float("inf")
            y[0, :, 3:6, :3] = float("nan")
        return y


def test_non_finite_tiles_are_rerun_in_fp32() -> None:
    inner = lively("dlsr_s_x2")
    x = texture(90, 100, seed=9)
    out, stats = run_tiled(NaNUnderAutocast(inner), x, scale=2, tile=48, overlap=8, batch_size=3,
                           compute_dtype=torch.bfloat16)
    assert torch.isfinite(out).all()
    assert stats.fp32_fallbacks == math.ceil(stats.num_tiles / 3)
    ref, _ = run_tiled(inner, x, scale=2, tile=48, overlap=8)
    assert psnr(out, ref) > 45  # bf16 tiles plus the fp32 re-runs, blended (no zeroed pixels)
    # every tile poisoned (batches of one): every tile is re-run, in float32 - the exact fp32 result
    out, stats = run_tiled(NaNUnderAutocast(inner), x, scale=2, tile=48, overlap=8, batch_size=1,
                           compute_dtype=torch.bfloat16)
    assert stats.fp32_fallbacks == stats.num_tiles > 1
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


# --- torch.compile ---------------------------------------------------------------------------------
class BrokenCompiled(nn.Module):
    """Test double for a `torch.compile`d model whose compilation fails at its first call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("BackendCompilerFailed: no working C++ compiler")


def test_a_failing_compiled_model_falls_back_to_eager(caplog) -> None:
    inner = lively("dlsr_s_x2")
    x = texture(40, 50, seed=10)
    with caplog.at_level("WARNING", logger="dlsr_infer.tiling"):
        out, _ = run_tiled(BrokenCompiled(), x, scale=2, tile=0, fallback_model=inner)
    ref, _ = run_tiled(inner, x, scale=2, tile=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "continuing without compilation" in caplog.text


@pytest.mark.slow
def test_compile_true_gives_the_same_result(caplog) -> None:
    from dlsr_infer.upscaling import Upscaler

    model = lively("dlsr_s_x2")
    img = (texture(48, 64, seed=11)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    with caplog.at_level("WARNING", logger="dlsr_infer.tiling"):
        compiled = Upscaler(model, compile=True, tile=0, dtype="fp32")(img)
    # the compiled graph itself ran: a failing one falls back to eager with this warning, same result
    assert "continuing without compilation" not in caplog.text
    eager = Upscaler(model, tile=0, dtype="fp32")(img)
    assert np.abs(compiled.astype(int) - eager.astype(int)).max() <= 1
