"""Tiled, memory-bounded DLSR inference on CPU or CUDA.

The LR image is cut into same-size overlapping tiles, the tiles run through the network in batches,
and their outputs are cross-faded into the full output, which is assembled on the CPU one band of
tile rows at a time: device memory is bounded by a batch of tiles, host memory by the output itself.

Why the tiles are laid out the way they are (measured; `tests/test_tiling.py` keeps it true):

* **Context.** A pixel's output depends on ~69 LR px of convolution context
  (`genotype.receptive_radius`) plus ESA's pooled context, but the influence of a cut edge decays
  fast: with the authors' trained x2 weights the error a cut makes is ~1e-2 at the edge, ~1e-3 at
  8-16 LR px and ~2e-4 (the floor set by ESA's drift, below) from ~24 LR px on; ESA (7x7 pool plus
  three 3x3 convs on its stride-6 grid) is what reaches that far. A tile therefore ignores the outer
  quarter of each overlap and cross-fades (smoothstep) over the middle half. With the default
  overlap of 64 LR px nothing closer than 16 px to a cut is used and each hand-over spans 32 px; an
  overlap of 48 left a measurable bump of error where the incoming tile starts (12-20 px from its
  edge), 64 does not.
* **ESA's grid.** ESA pools on a stride-6 grid (stride-2 conv, then a stride-3 max-pool) anchored at
  the input's top-left corner. A tile that starts off that grid computes a different attention mask
  everywhere (measured: ~10x the error of an on-grid tile), so tile starts are multiples of 6 and the
  tile size is adjusted (by < 6 px) so that the last tile ends exactly on the image border, where it
  sees the same zero padding as a whole-image pass.
* **What cannot be matched.** ESA resizes its pooled mask back with `interpolate(size=...)`, so the
  mask drifts by about 1.5 pooled cells across any input, whole image or tile. The drift differs
  between a tile and the whole image, which leaves a small, smooth, seam-free difference (~70-80 dB
  PSNR with random lively weights, ~60 dB with the authors' trained x2 weights on a photo): tiled
  output is not bit-identical to whole-image output. `tile=0` runs the exact whole-image pass.

All tiles of an image share one shape (static shapes for cuDNN autotuning and `torch.compile`).
Images smaller than `MIN_INPUT_SIZE` are replicate-padded on the bottom/right and cropped back.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .fast import exact_fp32
from .model import MIN_INPUT_SIZE

log = logging.getLogger(__name__)

#: ESA's pooling grid: a stride-2 3x3 conv followed by a stride-3 max-pool.
ESA_STRIDE = 6
#: Default overlap between neighbouring tiles, in LR pixels (measured; see the module docstring).
DEFAULT_OVERLAP = 64
#: Largest tile side `tile=None` picks on CUDA (bigger tiles gain nothing once the GPU is saturated).
MAX_AUTO_TILE = 1024
#: Largest tile side `tile=None` picks on the CPU. Measured (benchmarks/bench_tiling.py, x4, 1 thread):
#: a 960x540 LR image takes ~14-16 s whole but ~10-11 s in 180..366 px tiles despite their overlap, as
#: whole-image passes over large images are slowed by allocating (page-faulting) and streaming
#: GB-sized activations; below ~150k px the whole image is as fast and exact.
CPU_AUTO_TILE = 384
#: Smallest tile side the OOM back-off halves down to before giving up.
MIN_TILE = 64

#: progress callback: called with (tiles done, tiles in total) after each batch.
ProgressFn = Callable[[int, int], None]
#: output sink: receives finished output rows [row0, row1) of every image as an N x C x rows x W float tensor.
SinkFn = Callable[[int, int, torch.Tensor], None]


class TileOOMError(MemoryError):
    """The device ran out of memory even at the smallest tile size (or in exact whole-image mode)."""


# --- layout ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of an `height` x `width` LR image go. Every tile is `tile_h` x `tile_w`.

    `ys` and `xs` are the top and left coordinates of the tile rows and columns (a product grid), each a
    multiple of `align` except where noted in `plan_tiles`.
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.ys) * len(self.xs)

    @property
    def is_whole(self) -> bool:
        """True when one tile covers the image (the exact whole-image pass)."""
        return self.num_tiles == 1


def least_tile(overlap: int, align: int) -> int:
    """The smallest tile `plan_tiles` accepts for `overlap` (both sides overlapped, plus the context
    alignment) and never under the network's minimum input."""
    return max(MIN_INPUT_SIZE, 2 * overlap + align)


def _axis_starts(length: int, tile: int, overlap: int, align: int) -> tuple[int, tuple[int, ...]]:
    """Tile size and starts along one axis: aligned starts, last tile flush with the border, and no
    bigger tiles than needed (n tiles of the requested size would often overlap far more than asked:
    540 px in 512 px tiles is two tiles of 302, not two of 512 overlapping by 484)."""
    if tile >= length:
        return length, (0,)
    least = least_tile(overlap, align)
    if tile < least:
        raise ValueError(
            f"tile {tile} is too small for tile_overlap {overlap}: tiles must be at least {least} px "
            f"(2 * tile_overlap + {align}, and never under {MIN_INPUT_SIZE}); use a larger tile or a smaller overlap"
        )
    n = max(2, math.ceil((length - overlap) / (tile - overlap)))
    while True:
        size = max(math.ceil((length + (n - 1) * overlap) / n), least)
        size += (length - size) % align  # the last tile starts at length - size: keep that on the grid too
        # Starts rounded to the grid are at most align*ceil(span/((n-1)*align)) apart; keep that <= size - overlap.
        while size < length and size - overlap < align * math.ceil((length - size) / ((n - 1) * align)):
            size += align
        if size >= length:
            return length, (0,)
        if size <= tile or size <= least + align:
            break
        n += 1
    span = length - size  # a positive multiple of align
    starts = sorted({int(round(i * span / (n - 1) / align)) * align for i in range(n)})
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:])), (length, tile, overlap, starts)
    return size, tuple(starts)


def plan_tiles(height: int, width: int, *, tile: int, overlap: int, align: int = ESA_STRIDE) -> TileGrid:
    """Lay out same-size tiles of side about `tile` over an LR image, overlapping by >= `overlap`.

    `tile=0` (or a tile at least as large as the image) gives a single tile: the whole image. Along
    each axis the tiles are as few as `tile` allows and no larger than needed to cover the image with
    the overlap; their starts are multiples of `align` (ESA's pooling grid) and the last one ends on
    the border. The tile side never exceeds `tile` (except to reach the minimum, 2 * overlap + align).
    """
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"image {name} must be a positive integer, got {v!r}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise ValueError(f"tile must be a non-negative integer (0 = whole image), got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile_overlap must be a non-negative integer, got {overlap!r}")
    if tile == 0:
        return TileGrid(height, width, height, width, overlap, (0,), (0,))
    if tile < MIN_INPUT_SIZE:
        raise ValueError(f"tile {tile} is smaller than {MIN_INPUT_SIZE}, the least the network accepts")
    th, ys = _axis_starts(height, tile, overlap, align)
    tw, xs = _axis_starts(width, tile, overlap, align)
    return TileGrid(height, width, th, tw, overlap, ys, xs)


#: Fraction of the overlap that each tile discards at a shared edge (the rest is cross-faded).
TRIM_FRACTION = 0.25
RAMP = "smooth"


def axis_weights(start: int, size: int, length: int, overlap: int, scale: int) -> torch.Tensor:
    """Cross-fade weights (HR resolution) of one tile along one axis.

    Along an edge shared with a neighbour the weight is 0 for the first `overlap/4` LR px (the part a
    cut spoils), rises (smoothstep) to 1 over the next `overlap/2`, and is 1 beyond. Image borders get no
    ramp. Neighbours' ramps mirror each other, so the weights of a pixel's tiles never all vanish.
    """
    d = (torch.arange(size * scale, dtype=torch.float64) + 0.5) / scale  # LR distance from the leading edge
    w = torch.ones_like(d)
    if overlap > 0:
        trim = overlap * TRIM_FRACTION
        band = overlap - 2 * trim

        def ramp(t: torch.Tensor) -> torch.Tensor:
            t = ((t - trim) / band).clamp(0.0, 1.0)
            return t * t * (3 - 2 * t) if RAMP == "smooth" else t

        if start > 0:
            w = torch.minimum(w, ramp(d))
        if start + size < length:
            w = torch.minimum(w, ramp(size - d))
    return w.float()


# --- model introspection -------------------------------------------------------------------------
def context_alignment(model: nn.Module) -> int:
    """The input-grid alignment tiles need so ESA pools on the same grid as a whole-image pass."""
    from .layers.esa import ESA

    align = 1
    for m in model.modules():
        if isinstance(m, ESA):
            align = math.lcm(align, int(m.conv2.stride[0]) * 3)
    return align


def model_channels(model: nn.Module) -> int:
    genotype = getattr(model, "genotype", None)
    return int(getattr(genotype, "channels", 48))


def bytes_per_pixel(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Rough peak memory per LR pixel of one forward pass (measured: ~6 KB for 48 ch x4 in fp32 on CPU)."""
    scale = int(getattr(model, "scale", 4))
    per = 4 * (32 * model_channels(model) + 6 * scale * scale)
    return int(per * (0.6 if compute_dtype in (torch.float16, torch.bfloat16) else 1.0))


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 4 << 30


def memory_budget(device: torch.device) -> int:
    """Bytes a batch of tiles may use: half the free CUDA memory, or a quarter of free RAM (<= 2 GiB)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return int(min(_available_host_memory() * 0.25, 2 << 30))


def auto_tile(model: nn.Module, height: int, width: int, *, device: torch.device, compute_dtype: torch.dtype,
              count: int = 1, budget: int | None = None, overlap: int = DEFAULT_OVERLAP) -> tuple[int, int]:
    """(tile, batch_size) for `tile=None`.

    The whole image (tile 0, as many of the `count` images per batch as fit) when it fits the memory
    budget (and, on the CPU, has at most CPU_AUTO_TILE**2 pixels); else the largest tile (multiple
    of 8, MIN_TILE..MAX_AUTO_TILE on CUDA, ..CPU_AUTO_TILE on the CPU) that fits, with as many tiles per
    batch as fit on CUDA (at most 8) and one at a time on the CPU, where batching gains nothing.
    The tile is never below what `plan_tiles` accepts for `overlap` (2 * overlap + the context
    alignment): a tight budget then gets that floor, and an out-of-memory error there is the run's to report.
    """
    if budget is None:
        budget = memory_budget(device)
    pixels = max(1, budget // bytes_per_pixel(model, compute_dtype))
    cap = MAX_AUTO_TILE if device.type == "cuda" else CPU_AUTO_TILE
    if height * width <= min(pixels, cap * cap if device.type != "cuda" else pixels):
        return 0, max(1, min(count, pixels // (height * width)))
    side = int(math.isqrt(pixels)) // 8 * 8
    tile = max(MIN_TILE, least_tile(overlap, context_alignment(model)), min(cap, side))
    batch = max(1, min(8, pixels // (tile * tile))) if device.type == "cuda" else 1
    return tile, batch


# --- running --------------------------------------------------------------------------------------
def is_oom(error: BaseException) -> bool:
    """True for an out-of-memory error from CUDA, MPS or the CPU allocator."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(error, RuntimeError):
        msg = str(error)
        return "out of memory" in msg or "DefaultCPUAllocator: can't allocate memory" in msg \
            or "not enough memory" in msg
    return isinstance(error, MemoryError) and not isinstance(error, TileOOMError)


@dataclass
class TileStats:
    """What a tiled run did: the tile and batch it ended with, and what it had to fall back from."""

    tile: int
    tile_h: int = 0
    tile_w: int = 0
    overlap: int = 0
    batch_size: int = 1
    num_tiles: int = 0
    compute_dtype: torch.dtype = torch.float32  # the autocast dtype the tiles ran in (fp32: none)
    oom_retries: int = 0
    fp32_fallbacks: int = 0
    tiles_tried: list[int] = field(default_factory=list)


@dataclass
class Runner:
    """How to run the network on one batch: device, autocast dtype, memory format.

    `fallback_model` is the eager module behind a `torch.compile`d `model`: it re-runs single tiles in
    fp32 (no recompilation for a new dtype/shape), and replaces the compiled model for good if
    compiling fails (no C++ compiler, unsupported op), with a warning.
    """

    model: Any
    device: torch.device
    compute_dtype: torch.dtype = torch.float32
    channels_last: bool = False
    fallback_model: Any = None

    def _call(self, model: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if dtype == torch.float32:  # float32 even for a model set to run its fused form in bf16
            with exact_fp32():
                return model(x).float()
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            return model(x).float()

    def __call__(self, x: torch.Tensor, stats: TileStats) -> torch.Tensor:
        """Run a batch (already on the device); tiles whose reduced-precision output is not finite are
        re-run in fp32 (fp16 overflows in ESA/upsampler activations on some inputs)."""
        try:
            y = self._call(self.model, x, self.compute_dtype)
        except Exception as e:  # noqa: BLE001 - a failing compiled graph falls back to eager once
            if self.fallback_model is None or self.model is self.fallback_model or is_oom(e):
                raise
            log.warning("torch.compile'd model failed (%s: %s); continuing without compilation",
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.model = self.fallback_model
            y = self._call(self.model, x, self.compute_dtype)
        if self.compute_dtype != torch.float32:
            bad = ~torch.isfinite(y).flatten(1).all(dim=1)
            if bool(bad.any()):
                idx = bad.nonzero().flatten()
                stats.fp32_fallbacks += int(idx.numel())
                log.warning("%d tile(s) gave NaN/Inf in %s; re-running them in float32", idx.numel(),
                            self.compute_dtype)
                y[idx] = self._call(self.fallback_model or self.model, x[idx], torch.float32)
        return y


def pass_pixels(height: int, width: int, *, tile: int, overlap: int, align: int, count: int = 1,
                batch_size: int = 1) -> int:
    """LR pixels in the biggest pass `run_tiled` makes over `count` images of `height` x `width`: the
    tiles of one row of the grid, across the images, go `batch_size` at a time."""
    grid = plan_tiles(max(height, MIN_INPUT_SIZE), max(width, MIN_INPUT_SIZE), tile=tile, overlap=overlap, align=align)
    return min(batch_size, len(grid.xs) * count) * grid.tile_h * grid.tile_w


def pad_small(x: torch.Tensor) -> torch.Tensor:
    """`x` replicate-padded on the bottom/right to the network's minimum input size (crop the output back)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, MIN_INPUT_SIZE - h), max(0, MIN_INPUT_SIZE - w)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _run_grid(runner: Runner, x: torch.Tensor, grid: TileGrid, *, scale: int, out_channels: int, batch_size: int,
              sink: SinkFn, stats: TileStats, progress: ProgressFn | None) -> None:
    """Run every tile of `grid` and emit the assembled output through `sink`, band by band."""
    n = x.shape[0]
    s = scale
    out_w = grid.width * s
    th, tw = grid.tile_h, grid.tile_w
    wx = [axis_weights(x0, tw, grid.width, grid.overlap, s) for x0 in grid.xs]
    wy = [axis_weights(y0, th, grid.height, grid.overlap, s) for y0 in grid.ys]
    norm_x = torch.zeros(out_w)
    for x0, w in zip(grid.xs, wx):
        norm_x[x0 * s:(x0 + tw) * s] += w
    norm_y = torch.zeros(grid.height * s)
    for y0, w in zip(grid.ys, wy):
        norm_y[y0 * s:(y0 + th) * s] += w
    total = grid.num_tiles * n
    done = 0
    acc: torch.Tensor | None = None
    acc_r0 = 0
    for i, y0 in enumerate(grid.ys):
        r0, r1 = y0 * s, (y0 + th) * s
        new = torch.zeros(n, out_channels, r1 - r0, out_w)
        if acc is not None:
            keep = acc_r0 + acc.shape[2] - r0
            if keep > 0:
                new[:, :, :keep] = acc[:, :, r0 - acc_r0:]
        acc, acc_r0 = new, r0
        items = [(j, k) for j in range(len(grid.xs)) for k in range(n)]
        for chunk in _batches(items, batch_size):
            tiles = torch.stack([x[k, :, y0:y0 + th, grid.xs[j]:grid.xs[j] + tw] for j, k in chunk])
            y = runner(tiles.to(runner.device, non_blocking=True), stats).to("cpu")
            for (j, k), out in zip(chunk, y):
                c0 = grid.xs[j] * s
                acc[k, :, :, c0:c0 + tw * s].addcmul_(out, wy[i][:, None] * wx[j][None, :])
            del y, tiles
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        emit_end = grid.ys[i + 1] * s if i + 1 < len(grid.ys) else r1
        band = acc[:, :, :emit_end - r0]
        if not grid.is_whole:
            band = band / (norm_y[r0:emit_end, None] * norm_x[None, :])
        sink(r0, emit_end, band)


def run_tiled(model: Any, x: torch.Tensor, *, scale: int, tile: int, overlap: int | None = None,
              batch_size: int = 1, device: torch.device | str = "cpu", compute_dtype: torch.dtype = torch.float32,
              channels_last: bool = False, sink: SinkFn | None = None, progress: ProgressFn | None = None,
              allow_tile_fallback: bool = True, out_channels: int = 3, fallback_model: Any = None,
              min_tile: int = MIN_TILE) -> tuple[torch.Tensor | None, TileStats]:
    """Super-resolve `x` (N x C x H x W float in [0, 1], any device) tile by tile.

    Returns `(output, stats)`: output is the N x C x sH x sW float32 CPU tensor, or None when a `sink`
    took the rows instead (so the caller can write straight into a uint8/uint16 buffer without a
    full-size float copy). On an out-of-memory error the batch size halves, then the tile size
    (`allow_tile_fallback`, down to `min_tile`); in exact whole-image mode (`tile=0` and
    `allow_tile_fallback=False`) an OOM is a `TileOOMError`. Pass `model` already on `device`.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"run_tiled expects an N x C x H x W tensor, got {getattr(x, 'shape', type(x))}")
    device = torch.device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if overlap is None:
        overlap = DEFAULT_OVERLAP
    h, w = x.shape[-2:]
    xp = pad_small(x.float())
    hp, wp = xp.shape[-2:]
    align = context_alignment(runner_model(fallback_model if fallback_model is not None else model))
    runner = Runner(model, device, compute_dtype, channels_last, fallback_model)
    out: torch.Tensor | None = None
    if sink is None:
        out = torch.empty(x.shape[0], out_channels, h * scale, w * scale)
    target = sink

    def crop_sink(r0: int, r1: int, band: torch.Tensor) -> None:
        # Drop the rows/columns that came from padding a small image.
        r1 = min(r1, h * scale)
        if r0 >= r1:
            return
        band = band[:, :, :r1 - r0, :w * scale]
        if target is None:
            assert out is not None
            out[:, :, r0:r1] = band
        else:
            target(r0, r1, band)

    stats = TileStats(tile=tile, overlap=overlap, batch_size=batch_size, compute_dtype=compute_dtype)
    current = tile
    while True:
        grid = plan_tiles(hp, wp, tile=current, overlap=overlap, align=align)
        stats.tile, stats.tile_h, stats.tile_w, stats.num_tiles = current, grid.tile_h, grid.tile_w, grid.num_tiles
        stats.tiles_tried.append(current)
        try:
            with torch.inference_mode():
                _run_grid(runner, xp, grid, scale=scale, out_channels=out_channels, batch_size=stats.batch_size,
                          sink=crop_sink, stats=stats, progress=progress)
            return out, stats
        except Exception as e:  # noqa: BLE001 - only OOMs are handled, the rest re-raised
            if not is_oom(e):
                raise
            err = str(e).splitlines()[0] if str(e) else type(e).__name__
        stats.oom_retries += 1
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if stats.batch_size > 1:
            stats.batch_size = max(1, stats.batch_size // 2)
            log.warning("out of memory with a batch of %d tiles; retrying with %d", stats.batch_size * 2,
                        stats.batch_size)
            continue
        side = max(grid.tile_h, grid.tile_w)  # what was actually run (a tile can exceed a small image)
        floor = max(min_tile, 2 * overlap + align)
        if not allow_tile_fallback:
            raise TileOOMError(
                f"out of memory running the whole {h}x{w} image at once on {device} ({err}); "
                "use tiles (tile=None or e.g. tile=256) to bound memory"
            )
        # `current <= floor`: the floor was already asked for; the grid can still be a few px over it (tiles
        # keep to the alignment grid), and asking again would lay out the same grid forever.
        if side <= floor or 0 < current <= floor:
            raise TileOOMError(
                f"out of memory on {device} even with {grid.tile_w}x{grid.tile_h} tiles ({err}), the smallest "
                f"allowed for tile_overlap={overlap} (floor {floor}). Free device memory, use a smaller "
                "tile_overlap, or run on the CPU"
            )
        current = max(side // 2, floor)
        log.warning("out of memory with %d px tiles on %s; retrying with %d px tiles", side, device, current)


def runner_model(model: Any) -> nn.Module:
    """The eager module behind a possibly `torch.compile`d one (for introspection)."""
    return getattr(model, "_orig_mod", model)


__all__ = [
    "DEFAULT_OVERLAP",
    "ESA_STRIDE",
    "CPU_AUTO_TILE",
    "MAX_AUTO_TILE",
    "MIN_TILE",
    "Runner",
    "TileGrid",
    "TileOOMError",
    "TileStats",
    "auto_tile",
    "axis_weights",
    "bytes_per_pixel",
    "context_alignment",
    "is_oom",
    "least_tile",
    "memory_budget",
    "pad_small",
    "pass_pixels",
    "plan_tiles",
    "run_tiled",
]
