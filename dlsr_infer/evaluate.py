"""Benchmark evaluation of SR models (and of the bicubic baseline), plus the ``dlsr-eval`` command.

Protocol (the one behind published Set5/Set14/B100 tables):

1. load each HR image as RGB (gray is replicated to three channels) and ``modcrop`` it to the scale;
2. LR = MATLAB-bicubic ``imresize(hr, 1/scale)`` as uint8 (our bit-exact re-implementation);
3. SR = model(LR as float32 NCHW in [0, 1]), clamped to [0, 1], times 255, rounded to uint8;
4. PSNR and SSIM on Y (BT.601, unrounded), with ``scale`` pixels cropped from every border.

Images are run whole (no tiling) under ``torch.inference_mode``. The bicubic baseline replaces
step 3 with a MATLAB-bicubic uint8 upscale of the LR image.

Dataset folders may be in the EDSR layout (``<root>/<Set>/HR/*.png``: pass ``<root>/<Set>``) or any
folder of images.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .imageio import atomic_write, atomic_write_all, blocking_file, decodes_to_8_bits, readable_formats
from .imresize import imresize, modcrop
from .metrics import psnr_y, ssim_y

__all__ = [
    "IMAGE_EXTENSIONS",
    "default_benchmarks_dir",
    "default_shared_dir",
    "dataset_images",
    "dataset_name",
    "load_rgb",
    "make_lr",
    "NonFiniteOutput",
    "super_resolve_fp32",
    "evaluate",
    "evaluate_bicubic",
    "format_table",
    "format_markdown",
    "main",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DEFAULT_SETS = ("Set5", "Set14", "B100")

Upscaler = Callable[[np.ndarray], np.ndarray]  # uint8 HxWx3 LR -> uint8 HxWx3 SR


def default_shared_dir() -> Path:
    """The project's shared material (benchmarks, training images): ``$DLSR_SHARED``; else ``../shared``
    beside the source checkout this package runs from; else ``../shared`` seen from the current folder
    (a `pip install .` runs from site-packages, where nothing is beside it). Where none exists, the first
    candidate, for the error that names it."""
    env = os.environ.get("DLSR_SHARED")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1]
    candidates = [checkout.parent / "shared"] if (checkout / "setup.cfg").is_file() else []
    candidates.append(Path.cwd().parent / "shared")
    return next((c for c in candidates if c.is_dir()), candidates[0])


def default_benchmarks_dir() -> Path:
    """``$DLSR_BENCHMARKS``, else ``<shared>/data/benchmarks`` (`default_shared_dir`)."""
    env = os.environ.get("DLSR_BENCHMARKS")
    return Path(env) if env else default_shared_dir() / "data" / "benchmarks"


def _image_dir(path: Path) -> Path:
    """The folder that holds a dataset's HR images: ``path/HR`` if present, else ``path``."""
    return path / "HR" if (path / "HR").is_dir() else path


def dataset_name(path: str | os.PathLike) -> str:
    """Display name of a dataset folder: ``Set5`` for ``.../Set5`` and for ``.../Set5/HR``."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "HR" else p.name


def dataset_images(path: str | os.PathLike) -> list[Path]:
    """Sorted HR image files of a dataset folder (EDSR layout or a plain folder of images)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"dataset folder not found: {p}")
    files = sorted(f for f in _image_dir(p).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {_image_dir(p)}")
    return files


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Load an image as uint8 ``HxWx3`` RGB; gray (and palette/alpha) images are converted.

    EXIF orientation is not applied (as MATLAB's imread, which the benchmark protocol follows). A file
    that cannot be read, and 16-bit or float images, raise ValueError naming the file."""
    try:
        with Image.open(path, formats=readable_formats()) as im:  # never EPS (Ghostscript), as load_image
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") or decodes_to_8_bits(im):
                raise ValueError(f"{path}: 16-bit or float images ({im.mode}) are not supported; use 8-bit images")
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, Image.DecompressionBombError) as e:  # unreadable, truncated, not an image, ...
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


#: PNG text key under which a cached LR image records the HR pixels it was made from.
HR_DIGEST_KEY = "dlsr-hr-sha1"


def hr_digest(hr: np.ndarray) -> str:
    """sha1 of an image's shape and pixels (an HR: what an LR made from it depends on)."""
    return hashlib.sha1(f"{hr.shape}|".encode() + np.ascontiguousarray(hr).tobytes()).hexdigest()


def read_cached_png(path: Path, key: str, digest: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """A cache entry written by `write_cached_png`, if it records ``digest`` under ``key`` (the pixels it
    was made from) and has ``shape``; None for a missing, stale, unreadable or damaged one (made again)."""
    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:  # `info`: the text we write before the pixels, read undecoded
            fresh = im.info.get(key) == digest
        cached = load_rgb(path) if fresh else None
    except (OSError, ValueError):
        return None
    return cached if cached is not None and cached.shape == shape else None


def write_cached_png(path: Path, img: np.ndarray, key: str, digest: str) -> None:
    """Write a cache entry atomically, recording ``digest`` under ``key`` in its PNG text."""
    info = PngInfo()
    info.add_text(key, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a uniquely named temp file: runs started together share one cache and may write the same image
    atomic_write(path, lambda f: Image.fromarray(img).save(f, format="PNG", pnginfo=info), overwrite=True)


def make_lr(hr: np.ndarray, scale: int, cache_path: Path | None = None) -> np.ndarray:
    """uint8 LR image ``imresize(hr, 1/scale)`` for an already mod-cropped HR, optionally cached as PNG.

    A cached file records a digest of the HR pixels it was made from and is reused only for those very
    pixels: an image edited in place (same name, same size) gets a fresh LR, never a stale one.
    """
    expected = (hr.shape[0] // scale, hr.shape[1] // scale, 3)
    digest = hr_digest(hr) if cache_path is not None else ""
    if cache_path is not None:
        cached = read_cached_png(cache_path, HR_DIGEST_KEY, digest, expected)
        if cached is not None:
            return cached
    lr = imresize(hr, 1.0 / scale)
    if lr.shape != expected:  # cannot happen for a mod-cropped HR; guards against misuse
        raise ValueError(f"LR shape {lr.shape} != expected {expected}; was the HR image mod-cropped?")
    if cache_path is not None:
        write_cached_png(cache_path, lr, HR_DIGEST_KEY, digest)
    return lr


def _check_scale(scale: Any) -> int:
    if isinstance(scale, bool) or int(scale) != scale or int(scale) < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _run_protocol(
    upscale: Upscaler,
    dataset_dirs: Iterable[str | os.PathLike],
    *,
    scale: int,
    method: str,
    max_images: int | None,
    cache_dir: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    if isinstance(dataset_dirs, (str, os.PathLike)):
        dataset_dirs = [dataset_dirs]
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    results = []
    for ddir in dataset_dirs:
        name = dataset_name(ddir)
        files = dataset_images(ddir)[:max_images]
        per_image = []
        for f in files:
            try:
                hr = modcrop(load_rgb(f), scale)
                cache = Path(cache_dir) / name / f"X{scale}" / f"{f.stem}x{scale}.png" if cache_dir else None
                lr = make_lr(hr, scale, cache)
                sr = upscale(lr)
                if sr.shape != hr.shape:
                    raise ValueError(f"SR shape {sr.shape} != HR shape {hr.shape} (scale {scale})")
                per_image.append(
                    {"image": f.name, "psnr": psnr_y(sr, hr, crop=scale), "ssim": ssim_y(sr, hr, crop=scale)}
                )
            except ValueError as e:  # too small for the scale or the SSIM window, unreadable, ...: say which
                raise ValueError(f"{f}: {e}" if str(f) not in str(e) else str(e)) from None
        results.append(
            {
                "dataset": name,
                "scale": scale,
                "method": method,
                "psnr": float(np.mean([r["psnr"] for r in per_image])),
                "ssim": float(np.mean([r["ssim"] for r in per_image])),
                "images": len(per_image),
                "per_image": per_image,
            }
        )
    return results


class NonFiniteOutput(ValueError):
    """The network's output held NaN or inf: clamped and rounded, it would score as a partly black image."""


def _dihedral(x: Any, code: int, *, inverse: bool = False) -> Any:
    """One of the 8 flips/transposes (code 0..7) of an NCHW tensor, or its inverse."""
    if inverse and code & 4:
        x = x.transpose(-2, -1)
    if code & 1:
        x = x.flip(-1)
    if code & 2:
        x = x.flip(-2)
    if not inverse and code & 4:
        x = x.transpose(-2, -1)
    return x


def super_resolve_fp32(model: Any, lr: np.ndarray, *, scale: int, device: str, ensemble: bool = False) -> np.ndarray:
    """The protocol's forward: ``lr`` (H x W x 3 uint8) -> the SR image (sH x sW x 3 uint8), in float32
    whatever the model was set to run in (its inference_precision) or a caller autocasts to, without
    changing the caller's model (perhaps in use by other threads). `dlsr-eval` and the trainer's validation
    both score this, so the figure that picks a run's best/ is the one dlsr-eval reports.

    ``ensemble``: the mean of the 8 flipped/transposed inputs' outputs, each mapped back (the "self-ensemble"
    of EDSR+; 8x the time), rounded once: what a distillation teacher predicts (`dlsr-search train --teacher`).
    """
    import torch

    from .fast import exact_fp32
    from .tiling import pad_small

    with torch.inference_mode(), exact_fp32(), torch.autocast(torch.device(device).type, enabled=False):
        x = torch.from_numpy(np.ascontiguousarray(lr.transpose(2, 0, 1)))
        x = x.to(device=device, dtype=torch.float32).div_(255.0).unsqueeze(0)
        total = None
        for code in range(8) if ensemble else (0,):
            xc = _dihedral(x, code)
            xp = pad_small(xc)  # an LR under the network's 15 px minimum: padded, and the output cropped back
            full = (1, 3, xp.shape[-2] * scale, xp.shape[-1] * scale)
            y = model(xp)
            if not isinstance(y, torch.Tensor) or tuple(y.shape) != full:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(f"model output shape {got} is not {full}")
            y = _dihedral(y[:, :, :xc.shape[-2] * scale, :xc.shape[-1] * scale].float(), code, inverse=True)
            total = y if total is None else total + y
        y = total / 8 if ensemble else total
        if not bool(torch.isfinite(y).all()):
            raise NonFiniteOutput("the model's output is not finite (NaN or inf): no PSNR can be given")
        # round() is half-to-even; exact .5 values are practically impossible after *255 of floats.
        y = y[0].clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
        return y.permute(1, 2, 0).cpu().numpy()


def evaluate(
    model: Any,
    dataset_dirs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    scale: int | None = None,
    device: str = "cpu",
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    method: str = "model",
    dtype: str = "fp32",
    ensemble: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate ``model`` (NCHW float [0,1] RGB -> NCHW RGB, ``scale`` x larger) on dataset folders.

    ``scale`` defaults to ``model.scale``; giving a different one is an error. The model is moved to
    ``device`` and put in eval mode. ``dtype`` 'fp32' (the published protocol, and the default) runs
    ``model(x)`` in float32; 'auto', 'bf16' or 'fp16' run it the way ``upscale(dtype=...)`` does, to
    measure what a reduced precision costs. ``ensemble`` (fp32 only) scores the x8 self-ensemble (the mean
    over flips and transposes, EDSR+'s "+"), 8x the time: not the paper's Table 2 protocol. Returns one
    dict per dataset with keys ``dataset, scale, method, psnr, ssim, images, per_image`` (``per_image``:
    list of ``{image, psnr, ssim}``).
    """
    if ensemble and dtype != "fp32":
        raise ValueError(f"the self-ensemble is evaluated in fp32 only, not dtype={dtype!r}")
    model_scale = getattr(model, "scale", None)
    if scale is None:
        if model_scale is None:
            raise ValueError("scale not given and the model has no .scale attribute")
        scale = model_scale
    scale = _check_scale(scale)
    if model_scale is not None and int(model_scale) != scale:
        raise ValueError(f"scale {scale} does not match the model's scale {model_scale}")
    from .upscaling import resolve_device

    device = str(resolve_device(device))  # a clear ValueError for 'cuda' without CUDA or a bogus name
    if hasattr(model, "to"):
        model = model.to(device)
    if hasattr(model, "eval"):
        model.eval()
    if dtype == "fp32":
        run = functools.partial(super_resolve_fp32, model, scale=scale, device=device, ensemble=ensemble)
    else:
        from .upscaling import Upscaler as _Upscaler  # whole-image pass, the same rounding to uint8

        run = _Upscaler(model, scale=scale, device=device, dtype=dtype, tile=0).pixels
    return _run_protocol(
        run,
        dataset_dirs,
        scale=scale,
        method=method,
        max_images=max_images,
        cache_dir=cache_dir,
    )


def evaluate_bicubic(
    dataset_dirs: Iterable[str | os.PathLike] | str | os.PathLike,
    *,
    scale: int,
    max_images: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Bicubic baseline: SR = MATLAB-bicubic uint8 ``imresize(lr, scale)``; same protocol and output."""
    scale = _check_scale(scale)

    def upscale(lr: np.ndarray) -> np.ndarray:
        return imresize(lr, output_shape=(lr.shape[0] * scale, lr.shape[1] * scale))

    return _run_protocol(
        upscale, dataset_dirs, scale=scale, method="bicubic", max_images=max_images, cache_dir=cache_dir
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """Plain-text table: dataset, scale, method, PSNR (dB), SSIM, images."""
    header = f"{'dataset':<12} {'scale':>5} {'method':<16} {'PSNR':>8} {'SSIM':>7} {'images':>6}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r['dataset']:<12} {'x' + str(r['scale']):>5} {r['method']:<16} "
            f"{r['psnr']:>8.2f} {r['ssim']:>7.4f} {r['images']:>6d}"
        )
    return "\n".join(lines)


def format_markdown(results: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the same summary (PSNR/SSIM on Y, border = scale)."""
    lines = [
        "| Dataset | Scale | Method | PSNR-Y (dB) | SSIM-Y | Images |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['dataset']} | x{r['scale']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['images']} |"
        )
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (inf PSNR of identical images) by None so the JSON is standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _resolve_datasets(data: Sequence[str] | None, sets: Sequence[str]) -> list[Path]:
    """Turn ``--data``/``--sets`` into dataset folders.

    Each ``--data`` entry that has an ``HR/`` subfolder or images directly is one dataset; any other
    folder is a benchmark root, from which the ``--sets`` subfolders are taken.
    """
    roots_or_sets = [Path(d) for d in data] if data else [default_benchmarks_dir()]
    out: list[Path] = []
    for p in roots_or_sets:
        if not p.is_dir():
            raise ValueError(f"data folder not found: {p}")
        has_images = any(f.suffix.lower() in IMAGE_EXTENSIONS for f in p.iterdir() if f.is_file())
        if (p / "HR").is_dir() or has_images:
            out.append(p)
            continue
        for s in sets:
            if not (p / s).is_dir():
                raise ValueError(f"benchmark set {s!r} not found under {p}")
            out.append(p / s)
    return out


def _parser(prog: str = "dlsr-eval") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="PSNR/SSIM (Y channel, border = scale) of a DLSR model on SR benchmarks, with "
        "MATLAB-bicubic LR images generated from the HR images.",
    )
    ap.add_argument("model", nargs="?",
                    help="model alias (e.g. x2), model directory or hub id; optional with --bicubic")
    ap.add_argument("--data", nargs="+", metavar="DIR",
                    help="dataset folders (<Set> with HR/, or a folder of images) or benchmark roots "
                    "(default: $DLSR_BENCHMARKS, else $DLSR_SHARED/data/benchmarks, else ../shared/data/benchmarks)")
    ap.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), metavar="NAME",
                    help="sets to take from a benchmark root (default: %(default)s)")
    ap.add_argument("--scale", type=int, help="upscale factor (default: the model's; required for --bicubic alone)")
    ap.add_argument("--bicubic", action="store_true",
                    help="also/only evaluate the MATLAB-bicubic baseline (only, when no MODEL is given)")
    ap.add_argument("--json", metavar="PATH", help="write results (with per-image scores) as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the summary table as Markdown")
    ap.add_argument("--overwrite", action="store_true", help="replace existing --json/--markdown files")
    ap.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "auto", "bf16", "fp16"),
                    help="compute precision: fp32 (the published protocol, default) or as upscale(dtype=...) runs "
                    "it (auto: bf16 on CPUs with native bf16)")
    ap.add_argument("--self-ensemble", action="store_true",
                    help="score the x8 self-ensemble (mean over flips/transposes; fp32, 8x the time), reported as "
                    "MODEL+ - not the paper's protocol, which scores one pass")
    ap.add_argument("--cache-dir", metavar="DIR", help="cache generated LR images as PNG here")
    ap.add_argument("--max-images", type=int, metavar="N", help="evaluate only the first N images of each set")
    return ap


def _load_model(name: str) -> Any:
    """``DLSR.from_pretrained(name)``, with load failures turned into ValueError for a clean message."""
    try:
        from .model import DLSR
        from .pretrained import ModelLoadError
    except ImportError as exc:  # pragma: no cover - depends on the rest of the package
        raise ValueError(f"cannot import dlsr_infer.model.DLSR: {exc}") from exc
    try:
        return DLSR.from_pretrained(name)
    except (ModelLoadError, TypeError) as exc:  # TypeError: e.g. an empty name
        raise ValueError(f"cannot load model {name!r}: {exc}") from exc


def main(argv: Sequence[str] | None = None, *, prog: str = "dlsr-eval") -> int:
    """``dlsr-eval`` entry point (also ``dlsr-search eval``: `prog`); returns the exit status (0 ok, 2 bad input)."""
    ap = _parser(prog)
    args = ap.parse_args(argv)
    if args.model is None and not args.bicubic:
        ap.error("MODEL is required unless --bicubic is given")
    if args.self_ensemble and (args.model is None or args.dtype != "fp32"):
        ap.error("--self-ensemble needs a MODEL and --dtype fp32")
    if args.model is None and args.scale is None:
        ap.error("--bicubic without MODEL needs --scale")
    outputs = [(opt, path) for opt, path in (("--json", args.json), ("--markdown", args.markdown))
               if path is not None]
    for opt, path in outputs:  # refused before an evaluation that may take minutes, not after it
        if not path:  # an unset shell variable: nothing would be written, silently
            ap.error(f"{opt} needs a file path, got an empty one")
        try:
            is_dir, exists = Path(path).is_dir(), Path(path).exists()
        except OSError as exc:
            ap.error(f"{opt} {path}: {exc.strerror or exc}")
        if is_dir:
            ap.error(f"{opt} {path} is a folder; give the path of a file to write")
        if exists and not args.overwrite:
            ap.error(f"{opt} {path} already exists; pass --overwrite to replace it")
    if len(outputs) == 2 and Path(args.json).resolve() == Path(args.markdown).resolve():
        ap.error("--json and --markdown name the same file")
    folders = [(opt, Path(path).parent) for opt, path in outputs]
    if args.cache_dir:
        folders.append(("--cache-dir", Path(args.cache_dir)))
    for opt, folder in folders:  # a file where a folder must be (or be made): refused now, not after the run
        try:
            blocked = blocking_file(folder)
        except OSError as exc:  # a name too long, a folder we may not look into
            ap.error(f"{opt}: {folder}: {exc.strerror or exc}")
        if blocked is not None:
            ap.error(f"{opt}: {blocked} is a file, so the folder {folder} cannot be made")
    try:
        datasets = _resolve_datasets(args.data, args.sets)
        for opt, path in outputs:  # an image file among the data is an input (or becomes one): never written
            target = Path(path).resolve()
            if target.suffix.lower() in IMAGE_EXTENSIONS and any(d.resolve() in target.parents for d in datasets):
                raise ValueError(f"{opt} {path} is an image file in the data being evaluated; write the results "
                                 "elsewhere")
        results: list[dict[str, Any]] = []
        scale = args.scale
        if args.model is not None:
            model = _load_model(args.model)
            results += evaluate(model, datasets, scale=scale, device=args.device, max_images=args.max_images,
                                cache_dir=args.cache_dir, method=args.model + ("+" if args.self_ensemble else "")
                                + ("" if args.dtype == "fp32" else f"@{args.dtype}"),
                                dtype=args.dtype, ensemble=args.self_ensemble)
            scale = results[0]["scale"] if results else int(model.scale)
        if args.bicubic:
            results += evaluate_bicubic(datasets, scale=scale, max_images=args.max_images, cache_dir=args.cache_dir)
    except (ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the LR cache unwritable or the disk full, mid-run
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(results))
    payloads = []
    for opt, path in outputs:
        if opt == "--json":
            protocol = "Y (BT.601), border=scale, MATLAB bicubic LR" + (
                f", {args.model}+: x8 self-ensemble" if args.self_ensemble else "") + (
                f", {args.model}@{args.dtype}: run under --dtype {args.dtype}" if args.model and args.dtype != "fp32"
                else "")
            payload = {"model": args.model, "protocol": protocol, "results": results}
            payloads.append((opt, path, (json.dumps(_json_safe(payload), indent=2) + "\n").encode()))
        else:
            payloads.append((opt, path, format_markdown(results).encode()))
    try:  # both whole or neither written: a results file is never left half written or beside a stale other
        for _, path, _ in payloads:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_all([(path, lambda f, data=data: f.write(data)) for _, path, data in payloads],
                         overwrite=args.overwrite)
    except OSError as exc:
        what = " and ".join(f"{opt} {path}" for opt, path, _ in payloads)
        done = [f"{opt} {path}" for opt, path, _ in payloads if Path(path) in getattr(exc, "committed", [])]
        state = f"only {' and '.join(done)} was written" if done else \
            ("neither was written" if len(payloads) > 1 else "it was not written")
        print(f"{prog}: error: cannot write {what}: {exc.strerror or exc} ({state}; the table above is the "
              "result)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
