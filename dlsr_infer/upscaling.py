"""`upscale()`: super-resolve an image of any common kind with a DLSR model, tiled, on CPU or CUDA.

    from dlsr_infer import upscale
    big = upscale("photo.jpg", scale=4)                 # -> PIL.Image (bundled x4 weights)
    arr = upscale(np.asarray(img), model="x2-s")        # numpy in -> numpy out, same dtype
    out = upscale(batch.cuda(), scale=2, dtype="fp16")  # N x 3 x H x W tensor in -> tensor out, on the GPU

The network sees RGB in [0, 1] and nothing else; this module maps every input onto that and back
(gray is replicated to RGB and converted back, alpha is upscaled separately, 16-bit stays 16-bit) and
runs it through `dlsr_infer.tiling`, which bounds device memory by a tile rather than the image.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Literal, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .imageio import (DEFAULT_MAX_PIXELS, ImageData, OutputExistsError, can_be_pil, check_quality, format_for,
                      from_pil, load_image, save_image, to_8bit, to_pil)
from .pretrained import ALIASES, CONFIG_NAME, hides_no_alias
from .tiling import (DEFAULT_OVERLAP, ProgressFn, TileStats, auto_tile, bytes_per_pixel, context_alignment, memory_budget,
                     pass_pixels, run_tiled)

log = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, "Image.Image", np.ndarray, torch.Tensor]  # noqa: F821
AlphaMode = Literal["model", "bicubic"]
ModelLike = Union[str, os.PathLike, nn.Module, None]

#: ITU-R BT.601 luma weights, the ones PIL uses for RGB -> L.
LUMA = (0.299, 0.587, 0.114)
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


# --- device, dtype -----------------------------------------------------------------------------
def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' (or None): CUDA when available, else CPU. A device this torch build or machine lacks (CUDA
    without a GPU, 'mps' off a Mac build, ...) or one that holds no data ('meta') is a clear error here,
    not a traceback from the first tensor sent to it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type == "meta":
        raise ValueError(f"device {device!r} holds no data to upscale; use 'auto', 'cpu' or 'cuda'")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as e:  # noqa: BLE001 - each backend fails its own way (RuntimeError, AssertionError, ...)
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = reason if len(reason) <= 160 else reason[:157] + "..."  # MPS's names every backend there is
            raise ValueError(f"device {device!r} is not available here ({reason}); use 'auto', 'cpu' or 'cuda'") from None
    return dev


#: dtype='auto' on CUDA runs a pass (whole images, or a batch of tiles) of at least this many LR pixels
#: under fp16 autocast and a smaller one in exact fp32. Measured on an H100 in three sessions
#: (benchmarks/README.md, CUDA): fp16 autocast was slower up to 102k LR pixels per pass (x3 at LR 427x240:
#: 13.4 ms against 7.9 ms in fp32; x4 at 320x180: 0.77x) and faster from 230k (x2 at 640x360: 11.0 against
#: 14.7 ms; x4 at 960x540 and up: 1.4x). Small passes are bound by kernel launches, and autocast adds cast
#: kernels to them.
CUDA_FP16_MIN_PIXELS = 160_000


def cuda_auto_dtype(pass_pixels: int) -> torch.dtype:
    """What dtype='auto' runs a CUDA pass of `pass_pixels` LR pixels in (`tiling.pass_pixels` gives it):
    fp16 from `CUDA_FP16_MIN_PIXELS` on, else fp32."""
    return torch.float16 if pass_pixels >= CUDA_FP16_MIN_PIXELS else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast dtype before a model is known: 'auto' is fp16 on CUDA (lowered to fp32 for small
    passes by `cuda_auto_dtype` once the image is known) and fp32 elsewhere. fp16 is refused off CUDA
    (CPU has no fast fp16 convolutions). `Upscaler` refines CPU 'auto' per model (`auto_dtype`)."""
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'fp32', 'fp16' or 'bf16'")
        dtype = _DTYPES[dtype.lower()]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError(f"fp16 inference needs CUDA; on {device.type} use dtype='fp32' (or 'bf16')")
    return dtype


def auto_dtype(model: nn.Module, device: torch.device, *, compile: bool = False) -> torch.dtype:
    """What dtype='auto' runs `model` in: fp16 on CUDA (fp32 for passes too small for fp16 to pay:
    `cuda_auto_dtype`); on CPU bf16 where the CPU has native bf16 and
    the model's bf16 form passes its parity probe (`fast.preferred_dtype`: about 2x faster than fp32,
    Set5 within 0.01 dB), else fp32. `compile=True` stays fp32 on CPU: only the eager fused bf16 form
    is parity-tested."""
    if device.type != "cpu" or compile:
        return resolve_dtype("auto", device)
    from .fast import preferred_dtype

    return preferred_dtype(model, device)


# --- models --------------------------------------------------------------------------------------
_CACHE: dict[tuple[Any, ...], tuple[Any, nn.Module, nn.Module]] = {}
_CACHE_LOCK = threading.Lock()
_COMPILED_ATTR = "_dlsr_compiled"


class _CompiledForms(dict):
    """A caller's model's `torch.compile`d forms by device, kept in the model's own `__dict__` so that they
    live and die with it (as values of a weak-keyed dict they would keep their key alive through
    `_orig_mod`: every model ever passed with compile=True would stay in memory). A copy or a pickle of
    the model starts without them."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "_CompiledForms":
        return _CompiledForms()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_CompiledForms, ())


def clear_model_cache() -> None:
    """Forget the models `upscale()` loaded by name (they are cached per process)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _cache_name(name: str | os.PathLike) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """(what a name loads, the state of its files): a directory by its real path, with its weights' and
    config's size, times and inode (retrained weights reload, even copied in with their old mtime:
    `cp -p`, `rsync -t`, tar); an alias or Hub id by its name."""
    path = Path(os.fspath(name)).expanduser()
    # as resolve() reads it: a Path is always a local directory; a string may be an alias or Hub id
    if isinstance(name, os.PathLike) or (path.is_dir() and hides_no_alias(os.fspath(name), path)):
        state = []
        for f in (path / "model.safetensors", path / CONFIG_NAME):
            try:
                st = f.stat()
                state.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
            except OSError:
                state.append(None)
        return (str(path.resolve()),), tuple(state)
    return (os.fspath(name),), None


def _compiled(model: nn.Module, compile: bool) -> nn.Module:
    return torch.compile(model, dynamic=False) if compile else model


def _check_model(model: Any, scale: int | None) -> int:
    model_scale = getattr(model, "scale", None)
    if isinstance(model_scale, bool) or not isinstance(model_scale, int):
        raise TypeError(f"model must be a DLSR (or a module with an integer .scale), got {type(model).__name__}")
    genotype = getattr(model, "genotype", None)
    if genotype is not None and (genotype.in_channels != 3 or genotype.out_channels != 3):
        raise ValueError(f"upscale() works in RGB; this model maps {genotype.in_channels} to "
                         f"{genotype.out_channels} channels")
    if scale is not None and scale != model_scale:
        raise ValueError(f"the model upscales x{model_scale} but scale={scale} was asked; pass scale={model_scale} "
                         f"or a x{scale} model")
    if isinstance(model, nn.Module):  # precision is the dtype argument's job: the weights stay float32
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if dtypes - {torch.float32}:
            raise TypeError(f"the model's weights are {', '.join(sorted(str(d) for d in dtypes))}; upscale() needs "
                            "float32 weights (call model.float()) and runs reduced precision through dtype=")
    return model_scale


def get_model(model: ModelLike = None, *, scale: int | None = None, device: str | torch.device = "auto",
              dtype: str | torch.dtype = "auto", compile: bool = False,
              channels_last: bool | None = None) -> tuple[nn.Module, nn.Module, int]:
    """(model to run, its eager module, scale) for `upscale()`.

    A name (alias, directory, Hub id) is loaded once per process and cached by (name, device, memory
    format, compile): the dtype only sets the autocast around it, so one copy serves them all. A
    directory's cache entry is renewed when its weights file changes. A module passed in is used as is
    when it already lives on `device`, and copied there otherwise (the caller's model is never moved or
    modified).
    """
    dev = resolve_device(device)
    resolve_dtype(dtype, dev)  # refuse a bad dtype before loading anything
    cl = dev.type == "cuda" if channels_last is None else bool(channels_last)
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if model is None:
        model = f"x{scale or 4}"
        if model not in ALIASES:
            raise ValueError(f"no bundled model upscales by {scale}: they are x2, x3 and x4 (and x2-s); pass model= "
                             "a model of that scale")
    if isinstance(model, (str, os.PathLike)):
        ident, files = _cache_name(model)
        key = (*ident, str(dev), cl, bool(compile))
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is None or hit[0] != files:  # one entry per directory: retrained weights replace the old ones
            from .model import DLSR

            eager = DLSR.from_pretrained(model, map_location=dev).eval()
            _check_model(eager, None)
            if cl:
                eager = eager.to(memory_format=torch.channels_last)
            hit = (files, _compiled(eager, compile), eager)
            with _CACHE_LOCK:
                _CACHE[key] = hit
        _, run, eager = hit
        return run, eager, _check_model(eager, scale)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be None, an alias ('x2', 'x4', ...), a model directory or a DLSR module, "
                        f"got {type(model).__name__}")
    model_scale = _check_model(model, scale)
    params = list(model.parameters())
    on_device = not params or all(_same_device(p.device, dev) for p in params[:1])
    if not on_device:
        eager = copy.deepcopy(model).to(dev)
        return _compiled(eager, compile), eager, model_scale
    if not compile:
        return model, model, model_scale
    per_model = model.__dict__.setdefault(_COMPILED_ATTR, _CompiledForms())
    ckey = (str(dev),)
    if ckey not in per_model:
        per_model[ckey] = torch.compile(model, dynamic=False)
    return per_model[ckey], model, model_scale


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    ia = a.index if a.index is not None else torch.cuda.current_device()
    ib = b.index if b.index is not None else torch.cuda.current_device()
    return ia == ib


# --- the core: float N x C x H x W in [0, 1] -> output rows ---------------------------------------
def _split_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(RGB batch, alpha or None, is_gray) from 1..4 channels."""
    c = x.shape[1]
    gray = c in (1, 2)
    color = x[:, :1].expand(-1, 3, -1, -1) if gray else x[:, :3]
    alpha = x[:, -1:] if c in (2, 4) else None
    return color, alpha, gray


def _progress_fn(progress: bool | ProgressFn | None) -> tuple[ProgressFn | None, Callable[[], None]]:
    if progress is None or progress is False:
        return None, lambda: None
    if callable(progress):
        return progress, lambda: None
    from tqdm.auto import tqdm

    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="tile", leave=False, desc="tiles"))
        bar = bars[0]
        if bar.total != total:  # a retry with smaller tiles after running out of memory
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    def close() -> None:
        for bar in bars:
            bar.close()

    return update, close


def _super_resolve(x: torch.Tensor, write: Callable[[int, int, torch.Tensor], None], *, model: nn.Module,
                   eager: nn.Module, scale: int, tile: int | None, tile_overlap: int | None, batch_size: int | None,
                   device: torch.device, compute_dtype: torch.dtype, channels_last: bool, alpha: AlphaMode,
                   progress: bool | ProgressFn | None, auto_by_size: bool = False) -> TileStats:
    """Run the network on `x` (N x C x H x W float, C 1..4) and hand finished rows to
    `write(row0, row1, band)`, band being N x C x rows x W*scale float in [0, 1] (clamped).
    `auto_by_size`: dtype='auto' on CUDA, where the tiling decides between fp16 and fp32
    (`cuda_auto_dtype`); `compute_dtype` is then the largest it may use (fp16), which sizes the tiles."""
    if alpha not in ("model", "bicubic"):
        raise ValueError(f"alpha must be 'model' or 'bicubic', got {alpha!r}")
    n, c, h, w = x.shape
    color, alpha_ch, gray = _split_channels(x)
    batch = color
    alpha_lo = alpha_hi = None
    if alpha_ch is not None:
        # The output alpha stays within each image's input alpha range: an opaque image stays exactly
        # opaque (the network is not exactly flat next to a zero-padded border, bicubic rings), and a
        # constant alpha skips its network pass.
        alpha_lo = alpha_ch.float().amin(dim=(1, 2, 3), keepdim=True).cpu()
        alpha_hi = alpha_ch.float().amax(dim=(1, 2, 3), keepdim=True).cpu()
    alpha_const = alpha_lo is not None and torch.equal(alpha_lo, alpha_hi)
    alpha_by_model = alpha_ch is not None and alpha == "model" and not alpha_const
    if alpha_by_model:
        batch = torch.cat([color, alpha_ch.expand(-1, 3, -1, -1)])
    alpha_big = None
    if alpha_ch is not None and not alpha_by_model and not alpha_const:
        alpha_big = F.interpolate(alpha_ch.float().cpu(), scale_factor=scale, mode="bicubic",
                                  align_corners=False).clamp_(0.0, 1.0)
    count = batch.shape[0]
    allow_fallback = tile != 0
    overlap = DEFAULT_OVERLAP if tile_overlap is None else tile_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile_overlap must be a non-negative integer, got {tile_overlap!r}")
    if tile is None:
        tile, auto_batch = auto_tile(eager, max(h, 15), max(w, 15), device=device, compute_dtype=compute_dtype,
                                     count=count, overlap=overlap)
    else:
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
            raise ValueError(f"tile must be None (auto), 0 (whole image) or a positive tile size, got {tile!r}")
        per_tile = bytes_per_pixel(eager, compute_dtype) * (tile * tile if tile else h * w)
        auto_batch = max(1, min(8, memory_budget(device) // max(1, per_tile))) if device.type == "cuda" else 1
    if batch_size is None:
        batch_size = auto_batch
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if auto_by_size:  # fp32 needs more memory per pixel, but only passes too small to matter get it
        compute_dtype = cuda_auto_dtype(pass_pixels(h, w, tile=tile, overlap=overlap, align=context_alignment(eager),
                                                    count=count, batch_size=batch_size))

    def sink(r0: int, r1: int, band: torch.Tensor) -> None:
        band = band.clamp(0.0, 1.0)
        rgb = band[:n]
        parts = []
        if gray:
            parts.append((rgb[:, 0:1] * LUMA[0] + rgb[:, 1:2] * LUMA[1] + rgb[:, 2:3] * LUMA[2]))
        else:
            parts.append(rgb)
        if alpha_by_model:
            parts.append(band[n:].mean(dim=1, keepdim=True))
        elif alpha_big is not None:
            parts.append(alpha_big[:, :, r0:r1])
        elif alpha_const:
            parts.append(alpha_lo.to(rgb).expand_as(rgb[:, :1]))
        if alpha_lo is not None and alpha_hi is not None:
            parts[-1] = parts[-1].to(rgb.device).clamp(alpha_lo.to(rgb.device), alpha_hi.to(rgb.device))
        write(r0, r1, torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])

    report, close = _progress_fn(progress)
    try:
        _out, stats = run_tiled(model, batch, scale=scale, tile=tile, overlap=overlap, batch_size=batch_size,
                                device=device, compute_dtype=compute_dtype, channels_last=channels_last, sink=sink,
                                progress=report, allow_tile_fallback=allow_fallback,
                                fallback_model=eager if eager is not model else None)
    finally:
        close()
    return stats


# --- conversions ------------------------------------------------------------------------------------
def _writer_into(buf: torch.Tensor, *, channels_last_layout: bool,
                 maxval: float | None) -> Callable[[int, int, torch.Tensor], None]:
    """A row writer converting float bands into `buf` (N x H x W x C if channels_last_layout, else NCHW)."""
    def write(r0: int, r1: int, band: torch.Tensor) -> None:
        if maxval is not None:
            band = band.mul(maxval).round_()
        band = band.to(buf.dtype)
        if channels_last_layout:
            buf[:, r0:r1] = band.permute(0, 2, 3, 1)
        else:
            buf[:, :, r0:r1] = band
    return write


def _check_float_range(lo: float, hi: float, what: str) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{what} contains NaN or Inf")
    if lo < -1e-3 or hi > 1 + 1e-3:
        hint = " (it looks like 0..255 data: divide by 255)" if hi > 1.5 else ""
        raise ValueError(f"float {what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{hint}")


def _numpy_layout(a: np.ndarray) -> np.ndarray:
    if not a.dtype.isnative:  # big-endian data (raw 16-bit files, FITS): same values, native byte order
        a = a.astype(a.dtype.newbyteorder("="))
    if a.dtype not in (np.uint8, np.uint16, np.float16, np.float32, np.float64):
        raise TypeError(f"numpy images must be uint8, uint16 or float16/32/64 in [0, 1], got dtype {a.dtype}")
    if a.ndim == 2:
        a = a[:, :, None]
    elif not (a.ndim == 3 and a.shape[2] in (1, 2, 3, 4)):
        hint = ""
        if a.ndim == 3 and a.shape[0] in (1, 2, 3, 4):
            hint = " (it looks channels-first: numpy images are H x W x C; use a torch tensor for C x H x W)"
        raise ValueError(f"numpy images must be H x W or H x W x C with C in 1..4, got shape {a.shape}{hint}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"empty image of shape {a.shape}")
    return a


class Upscaler:
    """A model plus inference settings, reusable across many images (what `upscale()` builds per call
    and the CLI builds once). The keyword arguments are those of `upscale()`."""

    def __init__(self, model: ModelLike = None, *, scale: int | None = None, tile: int | None = None,
                 tile_overlap: int | None = None, batch_size: int | None = None, device: str | torch.device = "auto",
                 dtype: str | torch.dtype = "auto", alpha: AlphaMode = "model", compile: bool = False,
                 channels_last: bool | None = None, progress: bool | ProgressFn = False) -> None:
        if alpha not in ("model", "bicubic"):
            raise ValueError(f"alpha must be 'model' or 'bicubic', got {alpha!r}")
        if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 0):
            raise ValueError(f"tile must be None (auto), 0 (whole image) or a positive tile size, got {tile!r}")
        if tile_overlap is not None and (isinstance(tile_overlap, bool) or not isinstance(tile_overlap, int)
                                         or tile_overlap < 0):
            raise ValueError(f"tile_overlap must be a non-negative integer, got {tile_overlap!r}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = resolve_device(device)
        self.compute_dtype = resolve_dtype(dtype, self.device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        self.model, self.eager, self.scale = get_model(model, scale=scale, device=self.device,
                                                       dtype=self.compute_dtype, compile=compile,
                                                       channels_last=self.channels_last)
        auto = dtype is None or (isinstance(dtype, str) and dtype == "auto")
        if auto:
            self.compute_dtype = auto_dtype(self.eager, self.device, compile=compile)
        # CUDA 'auto' settles per image by the size of a pass; a compiled graph keeps one dtype (a new
        # autocast state would recompile it)
        self.auto_by_size = auto and self.device.type == "cuda" and not compile
        self.tile, self.tile_overlap, self.batch_size = tile, tile_overlap, batch_size
        self.alpha: AlphaMode = alpha
        self.progress = progress
        self.last_stats: TileStats | None = None

    def _run(self, x: torch.Tensor, write: Callable[[int, int, torch.Tensor], None],
             progress: bool | ProgressFn | None = None) -> TileStats:
        stats = _super_resolve(x, write, model=self.model, eager=self.eager, scale=self.scale, tile=self.tile,
                               tile_overlap=self.tile_overlap, batch_size=self.batch_size, device=self.device,
                               compute_dtype=self.compute_dtype, channels_last=self.channels_last, alpha=self.alpha,
                               progress=self.progress if progress is None else progress,
                               auto_by_size=self.auto_by_size)
        self.last_stats = stats
        return stats

    def pixels(self, pixels: np.ndarray, *, progress: bool | ProgressFn | None = None) -> np.ndarray:
        """H x W x C (C 1..4) uint8/uint16/float pixels -> upscaled pixels, same dtype and layout."""
        a = _numpy_layout(np.asarray(pixels))
        h, w, _c = a.shape
        # astype copies, so the tensor never aliases a read-only array (e.g. np.asarray of a PIL image).
        if a.dtype == np.uint8:
            x, maxval = torch.from_numpy(a.astype(np.float32)).div_(255.0), 255.0
        elif a.dtype == np.uint16:
            x, maxval = torch.from_numpy(a.astype(np.float32)).div_(65535.0), 65535.0
        else:
            _check_float_range(float(np.min(a)), float(np.max(a)), "image array")
            x, maxval = torch.from_numpy(a.astype(np.float32)), None
        x = x.permute(2, 0, 1).unsqueeze(0)
        out = np.empty((h * self.scale, w * self.scale, a.shape[2]), dtype=a.dtype)
        self._run(x, _writer_into(torch.from_numpy(out).unsqueeze(0), channels_last_layout=True, maxval=maxval),
                  progress)
        return out[:, :, 0] if np.ndim(pixels) == 2 else out

    def image_data(self, data: ImageData, *, progress: bool | ProgressFn | None = None) -> ImageData:
        """Upscale decoded image data (`dlsr_infer.imageio`); ICC profile and EXIF are carried over."""
        return data.with_pixels(self.pixels(data.pixels, progress=progress))

    def tensor(self, t: torch.Tensor, *, progress: bool | ProgressFn | None = None) -> torch.Tensor:
        """C x H x W or N x C x H x W (C 1..4) float-in-[0, 1] or uint8 tensor -> same dtype, device, layout."""
        if t.layout != torch.strided or t.device.type == "meta":
            raise TypeError(f"tensors must be dense and hold data, got a {t.layout} tensor on {t.device} "
                            "(use .to_dense() / a real device)")
        if t.dim() not in (3, 4):
            raise ValueError(f"tensors must be C x H x W or N x C x H x W, got shape {tuple(t.shape)}")
        x = t.unsqueeze(0) if t.dim() == 3 else t
        n, c, h, w = x.shape
        if c not in (1, 2, 3, 4):
            hint = " (it looks channels-last: tensors are channels-first)" if x.shape[-1] in (1, 2, 3, 4) else ""
            raise ValueError(f"tensors must have 1 to 4 channels (L, LA, RGB, RGBA), got shape "
                             f"{tuple(t.shape)}{hint}")
        if n == 0 or h == 0 or w == 0:
            raise ValueError(f"empty image tensor of shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            xf, maxval = x.float().div(255.0), 255.0
        elif t.is_floating_point():
            lo, hi = torch.aminmax(x.detach())
            _check_float_range(float(lo), float(hi), "image tensor")
            xf, maxval = x.detach().float(), None
        else:
            raise TypeError(f"tensors must be floating point in [0, 1] (or uint8), got {t.dtype}")
        buf = torch.empty(n, c, h * self.scale, w * self.scale, dtype=t.dtype)
        self._run(xf, _writer_into(buf, channels_last_layout=False, maxval=maxval), progress)
        if t.device.type != "cpu":
            buf = buf.to(t.device)
        return buf if t.dim() == 4 else buf[0]

    def __call__(self, image: ImageLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Any:
        """Upscale any supported input kind; see `upscale()` for what comes back."""
        if isinstance(image, (str, os.PathLike)):
            out = self.image_data(load_image(image, max_pixels=max_pixels))
            return to_pil(out) if can_be_pil(out) else out.pixels
        from PIL import Image

        if isinstance(image, Image.Image):
            out = self.image_data(from_pil(image))  # a lazily opened 16-bit colour PNG is read with its 16 bits
            return to_pil(out if can_be_pil(out) else out.with_pixels(to_8bit(out.pixels)))
        if isinstance(image, np.ndarray):
            return self.pixels(image)
        if isinstance(image, torch.Tensor):
            return self.tensor(image)
        raise TypeError(f"cannot upscale a {type(image).__name__}; pass a path, PIL image, numpy array or "
                        "torch tensor")


def upscale(image: ImageLike, scale: int | None = None, model: ModelLike = None, *, tile: int | None = None,
            tile_overlap: int | None = None, batch_size: int | None = None, device: str | torch.device = "auto",
            dtype: str | torch.dtype = "auto", alpha: AlphaMode = "model", compile: bool = False,
            channels_last: bool | None = None, progress: bool | ProgressFn = False,
            max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Any:
    """Super-resolve `image` by `scale` with a DLSR model and return it as the same kind of thing.

    image
        * a path -> a PIL image (the file's EXIF orientation applied, its ICC profile in `.info`). A
          16-bit *colour* file comes back as an H x W x C uint16 numpy array instead, because PIL has
          no 16-bit colour mode (`upscale_file` and the CLI write it as a 16-bit PNG);
        * a PIL image -> a PIL image: RGB, RGBA, L, LA and I;16 keep their mode; P becomes RGB (RGBA
          if it had transparency), 1 becomes L, I becomes I;16, CMYK becomes RGB (with a
          `ColorConversionWarning`); EXIF orientation is applied and the ICC profile kept in `.info`.
          A 16-bit colour PNG just opened (`Image.open`: Pillow shows it as 8-bit RGB/RGBA/LA) is read
          with its 16 bits and the result rounded to 8 bits: a PIL image cannot hold 16-bit colour
          (pass the path, or use `upscale_file`, to keep them);
        * a numpy array, H x W or H x W x C (C = 1..4: L, LA, RGB, RGBA), uint8, uint16 or float in
          [0, 1] -> the same layout and dtype (floats clamped to [0, 1]);
        * a torch tensor, C x H x W or N x C x H x W in [0, 1] (float, or uint8) -> same dtype, device
          and layout. The output is assembled on the CPU and moved to the input's device at the end.
        Gray is run as replicated RGB and converted back with BT.601 luma; images smaller than
        `MIN_INPUT_SIZE` are edge-padded and cropped back.
    scale
        2, 3 or 4. Default: the model's scale, or 4 when no model is given. Must match the model.
    model
        None (the bundled weights for `scale`, alias f"x{scale}"), an alias ('x2', 'x3', 'x4', 'x2-s'),
        a model directory, a Hub repo id, or a loaded `DLSR`. Models loaded by name are cached per
        process, keyed by (name and its weights file, device, channels_last, compile); the dtype only
        sets the autocast around the one copy.
    tile, tile_overlap, batch_size
        LR tile side (None: picked from free memory, the whole image when it fits; 0: exact
        whole-image pass), overlap between tiles in LR px (default `tiling.DEFAULT_OVERLAP`), tiles
        (or whole images of a batch) run together (default: from free memory; 1 on CPU when `tile`
        is given). On an out-of-memory error the batch,
        then the tile, is halved and retried (`tiling.TileOOMError` once nothing smaller is left).
    device, dtype
        'auto' is CUDA if available, with fp16 autocast for passes of `CUDA_FP16_MIN_PIXELS` (160k) LR
        pixels or more and fp32 below (where fp16 is slower), else CPU: there bf16 when the CPU has native
        bf16 (AVX512-BF16/AMX) and the model passes the bf16 parity probe (`fast.preferred_dtype`),
        else fp32. 'fp32' gives the exact float32 result; 'bf16' works on both; 'fp16' only on CUDA.
        Tiles that give NaN/Inf in fp16/bf16 are re-run in fp32. With `compile=True`, 'auto' is one
        dtype for every pass: fp16 on CUDA (whatever the size), fp32 on CPU (only the eager bf16 form
        is parity-tested).
    alpha
        how alpha is upscaled: 'model' (the network on the replicated alpha: sharp edges, 2x the
        compute) or 'bicubic'.
    compile, channels_last
        `torch.compile` the model (tiles share one shape, so one graph); channels-last memory format
        (default on CUDA).
    progress
        True for a tqdm bar over tiles, or a callable(done, total).
    max_pixels
        decompression-bomb limit for path inputs (None: no limit).
    """
    upscaler = Upscaler(model, scale=scale, tile=tile, tile_overlap=tile_overlap, batch_size=batch_size,
                        device=device, dtype=dtype, alpha=alpha, compile=compile, channels_last=channels_last,
                        progress=progress)
    return upscaler(image, max_pixels=max_pixels)


def upscale_file(source: str | os.PathLike, destination: str | os.PathLike, scale: int | None = None,
                 model: ModelLike = None, *, format: str | None = None, quality: int = 95, overwrite: bool = False,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, **options: Any) -> list[str]:
    """Upscale an image file into another, keeping 16-bit depth, alpha, ICC profile and EXIF.

    The output is written atomically, and an existing file is replaced only with `overwrite=True`,
    never the source itself. `options` are `upscale()`'s keyword arguments. Returns notes on anything
    converted or dropped on the way (CMYK -> RGB, alpha in a JPEG, ...).
    """
    # Everything that would make the write fail is checked before the network runs.
    format_for(destination, format)
    check_quality(quality)
    if Path(destination).exists():
        if Path(source).exists() and os.path.samefile(source, destination):
            raise ValueError(f"{destination}: is the source image; write the result to another file")
        if not overwrite:
            raise OutputExistsError(f"{destination}: already exists (pass overwrite=True to replace it)")
    if not Path(destination).parent.is_dir():
        raise FileNotFoundError(f"{destination}: the folder {Path(destination).parent} does not exist")
    upscaler = Upscaler(model, scale=scale, **options)
    data = load_image(source, max_pixels=max_pixels)
    out = upscaler.image_data(data)
    return list(data.notes) + save_image(out, destination, format=format, quality=quality, overwrite=overwrite)


__all__ = ["CUDA_FP16_MIN_PIXELS", "LUMA", "Upscaler", "auto_dtype", "clear_model_cache", "cuda_auto_dtype", "get_model",
           "resolve_device", "resolve_dtype", "upscale", "upscale_file"]
