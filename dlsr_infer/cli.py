"""`dlsr-upscale`: upscale image files, folders and globs with a DLSR model.

    dlsr-upscale photo.jpg                       # -> photo_x4.jpg next to it
    dlsr-upscale shots/ -o big/ --scale 2        # every image in shots/ -> big/<name>.<ext>
    dlsr-upscale 'scans/*.tif' -o out/ --format png --tile 256 --device cuda

Every input is processed even when some fail; failures are listed at the end and make the exit code 1.
Outputs are written atomically (never a truncated file under the final name), an existing file is
replaced only with --overwrite, and an input is never overwritten. Ctrl-C stops after cleaning up the
file being written, prints the summary and exits 130 (SIGTERM: 143). A run killed outright (SIGKILL)
can leave a hidden `.<output>.<random>.partial` file; the next run writing that output removes it.
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .imageio import (DEFAULT_MAX_PIXELS, FORMATS, IMAGE_EXTENSIONS, ImageLoadError, OutputExistsError,
                      check_quality, format_for, load_image, remove_stale_temps, save_image)

PROG = "dlsr-upscale"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143
#: Images with more tiles than this get a second progress bar over their tiles.
TILE_BAR_MIN_TILES = 4
#: Input formats we re-encode as PNG by default (palette/animation formats, or ones we do not write).
_DEFAULT_TO_PNG = {".gif", ".tga", ".pgm", ".ppm"}
#: oneDNN (CPU convolutions) keeps the kernels it builds for every input shape, up to 1024: over 500
#: differently sized images RSS grew by 129 MiB, 43 of them this cache (benchmarks/bench_load.py; the
#: rest is ideep's LRU_CACHE_CAPACITY, read when torch is imported, so only settable from outside).
#: One image is one shape (its tiles share one) and a forward pass builds ~35 kernels, so 256 keeps
#: several images' worth and hits as before where it can. Set before the first convolution; an
#: explicit ONEDNN_PRIMITIVE_CACHE_CAPACITY in the environment wins.
ONEDNN_CACHE_CAPACITY = 256


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the current write is cleaned up like on Ctrl-C."""


@dataclass
class Job:
    source: Path
    output: Path | None = None
    error: str | None = None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Upscale images with a DLSR super-resolution network (tiled; CPU or CUDA).",
        epilog="Exit status: 0 all done, 1 some inputs failed (listed), 2 bad usage, 130 interrupted, 143 terminated (SIGTERM).")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, folders (their images; see --recursive) or glob patterns ('*.png')")
    p.add_argument("-o", "--output", metavar="PATH",
                   help="output file (one input; needs an extension) or folder (created if needed; a trailing / "
                        "or no extension means a folder). Default: next to each input, named <stem><suffix>.<ext>")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), help="upscale factor (default: the model's, or 4)")
    p.add_argument("--model", metavar="NAME",
                   help="alias (x2, x3, x4, x2-s), model directory or Hub repo id (default: x<scale>)")
    p.add_argument("--tile", type=int, metavar="N",
                   help="LR tile size in pixels; 0 = whole image at once (default: from free memory). At least "
                        "2 x --tile-overlap + the network's alignment (134 with the default overlap), checked up "
                        "front, also where every input is smaller than one tile")
    p.add_argument("--tile-overlap", type=int, metavar="N", help="overlap between tiles in LR pixels (default 64)")
    p.add_argument("--batch-size", type=int, metavar="N", help="tiles per batch (default: from memory)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="compute precision (auto: on CUDA fp16 for passes of 160k+ LR pixels, else fp32; on CPU bf16 "
                        "where native and parity holds, else fp32; with --compile: fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--alpha", default="model", choices=("model", "bicubic"), help="how alpha channels are upscaled")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (worth it for many images)")
    p.add_argument("--suffix", help="added to output file names (default: _x<scale> next to the inputs, none with -o)")
    p.add_argument("--format", choices=sorted({k[1:] for k in FORMATS}), help="output format (default: the input's; PNG for GIF, TGA, PPM and PGM inputs)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG/WebP quality (default 95)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group.add_argument("--skip-existing", action="store_true",
                       help="skip inputs whose output exists (counted as skipped, not failed)")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into subfolders of folder inputs")
    p.add_argument("--max-pixels", type=_max_pixels, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels than this (decompression-bomb guard; default "
                        f"{DEFAULT_MAX_PIXELS:,}; 0 = no limit)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes; summary and errors only")
    return p


def _max_pixels(value: str) -> int | None:
    try:
        n = int(value.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a pixel count: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0 = no limit)")
    return n or None


# --- planning ----------------------------------------------------------------------------------------
def _has_magic(s: str) -> bool:
    return any(ch in s for ch in "*?[")


def expand_inputs(args: Sequence[str], *, recursive: bool = False) -> list[tuple[Path, Path | None, str | None]]:
    """(file, folder it was found in or None, error) for every input argument, in order, deduplicated."""
    found: list[tuple[Path, Path | None, str | None]] = []
    seen: set[str] = set()

    def add(path: Path, root: Path | None, error: str | None = None) -> None:
        key = os.path.realpath(path)
        if error is None and key in seen:
            return
        seen.add(key)
        found.append((path, root, error))

    for arg in args:
        path = Path(arg)
        if not arg:  # Path("") is ".": an unset shell variable would upscale the whole current folder
            add(path, None, "an empty argument names no file or folder")
        elif path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in path.glob(pattern) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.name.startswith("."))
            if not files:
                add(path, None, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder")
            for f in files:
                add(f, path, None)
        elif path.exists():
            add(path, None, None)
        elif _has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                add(path, None, "no file matches this pattern")
            for m in matches:
                add(m, None, None)
        else:
            add(path, None, "no such file or folder")
    return found


def output_path(source: Path, root: Path | None, *, output: str | None, as_folder: bool, suffix: str,
                fmt: str | None) -> Path:
    """Where `source` goes: `output` itself (file mode), or <folder>/<relative stem><suffix>.<ext>."""
    ext = source.suffix.lower()
    if fmt:
        ext = "." + fmt.lower()
    elif ext not in FORMATS or ext in _DEFAULT_TO_PNG:
        ext = ".png"
    if output is not None and not as_folder:
        return Path(output)
    if output is None:
        folder = source.parent
    else:
        folder = Path(output)
        if root is not None:
            folder = folder / source.parent.relative_to(root)
    return folder / f"{source.stem}{suffix}{ext}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


# --- running -----------------------------------------------------------------------------------------
def _tile_progress(tqdm: Any, quiet: bool, name: str) -> tuple[Any, Any]:
    """A per-tile progress callback that only shows a bar for images with many tiles."""
    state: dict[str, Any] = {"bar": None}

    def update(done: int, total: int) -> None:
        if quiet or total <= TILE_BAR_MIN_TILES:
            return
        bar = state["bar"]
        if bar is None:
            bar = state["bar"] = tqdm(total=total, unit="tile", desc=name[:30], position=1, leave=False)
        if bar.total != total:  # a retry with smaller tiles after running out of memory
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    def close() -> None:
        if state["bar"] is not None:
            state["bar"].close()

    return update, close


def main(argv: Sequence[str] | None = None) -> int:
    """Run `dlsr-upscale`; returns the exit status (0 ok, 1 some inputs failed, 2 usage, 130 interrupted)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error argparse has already printed
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USAGE

    def usage(message: str) -> int:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    for name in ("tile", "tile_overlap", "batch_size"):
        v = getattr(args, name)
        if v is not None and (v < 0 or (name == "batch_size" and v == 0)):
            return usage(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'batch_size' else '>= 0'}")
    try:
        check_quality(args.quality)
    except ValueError as e:
        return usage(f"--{e}")

    sources = expand_inputs(args.inputs, recursive=args.recursive)
    # -o is a folder when it says so (trailing /), exists as one, has no extension, or must be one.
    said_folder = args.output is not None and (args.output.endswith(("/", os.sep)) or Path(args.output).is_dir())
    needs_folder = len(sources) > 1 or any(root is not None for _, root, _ in sources)
    out_is_folder = args.output is not None and (said_folder or not Path(args.output).suffix or needs_folder)
    if args.output is not None and not out_is_folder:
        named = FORMATS.get(Path(args.output).suffix.lower())
        if args.format and named and named != FORMATS.get("." + args.format.lower()):  # a .png holding a JPEG
            return usage(f"-o {args.output} names a {named} file but --format {args.format} was given; drop one")
        try:
            format_for(args.output, args.format)
        except ValueError as e:
            return usage(f"-o {args.output}: {e}")
    if args.output is not None and needs_folder and not said_folder and Path(args.output).suffix.lower() in FORMATS:
        many = f"{len(sources)} inputs need" if len(sources) > 1 else "a folder input needs"
        return usage(f"-o {args.output} names an image file, but {many} an output folder (end it with / for a "
                     "folder of that name)")
    if args.output is not None and out_is_folder and Path(args.output).is_file():
        if not Path(args.output).suffix:
            return usage(f"-o {args.output} is an existing file without an image extension: name the output "
                         "with one (e.g. out.png) or give a folder")
        return usage(f"-o {args.output} is a file, but {len(sources)} inputs need an output folder")

    # Heavy imports only once the command line is known to be sane (--help stays fast).
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_CACHE_CAPACITY))
    import torch
    from tqdm.auto import tqdm

    from .fast import env_flag, tune_malloc
    from .pretrained import ModelLoadError
    from .tiling import TileOOMError
    from .upscaling import Upscaler

    # This process is ours and a batch job: keep freed large blocks in glibc's heap instead of a fresh,
    # page-faulted mmap per tensor (8K-output x4, 1 thread: 2.0x less CPU time in fp32, 1.13x in bf16, for
    # 10-36% more peak RSS, still under 1.5 GB; benchmarks/README.md). DLSR_TUNE_MALLOC=0 turns it off.
    # Library callers opt in themselves: it is process-wide.
    if env_flag("DLSR_TUNE_MALLOC") is not False:
        tune_malloc()

    try:
        upscaler = Upscaler(args.model, scale=args.scale, tile=args.tile, tile_overlap=args.tile_overlap,
                            batch_size=args.batch_size, device=args.device, dtype=args.dtype, alpha=args.alpha,
                            compile=args.compile)
    except (ModelLoadError, ValueError, TypeError, OSError) as e:
        print(f"{PROG}: error: cannot set up the model: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted while loading the model; nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    if args.tile:  # a tile the overlap does not fit would fail every image in turn: say so once
        from .tiling import DEFAULT_OVERLAP, context_alignment, least_tile

        overlap = DEFAULT_OVERLAP if args.tile_overlap is None else args.tile_overlap
        align = context_alignment(upscaler.eager)
        least = least_tile(overlap, align)
        if args.tile < least:
            hint = "a larger --tile" if least_tile(0, align) >= least else "a larger --tile or a smaller --tile-overlap"
            return usage(f"--tile {args.tile} is too small for --tile-overlap {overlap}: tiles must be at least "
                         f"{least} px; use {hint}")
    scale = upscaler.scale
    suffix = args.suffix if args.suffix is not None else ("" if args.output is not None else f"_x{scale}")

    def out_for(src: Path, root: Path | None) -> Path:
        return output_path(src, root, output=args.output, as_folder=out_is_folder, suffix=suffix, fmt=args.format)

    # An input that is another input's output (a_x2.png next to a.png on a rerun) is not upscaled again.
    # One whose own output is itself (b.png with --suffix "" in its own folder) is an original, even where
    # another input also maps onto it (b.tga -> b.png): it stays an input, so neither job may write over it.
    own = {src: os.path.realpath(out_for(src, root)) for src, root, err in sources if err is None}
    outputs_of: dict[str, list[Path]] = {}
    for src, out in own.items():
        outputs_of.setdefault(out, []).append(src)
    ours = [src for src, out in own.items() if out != os.path.realpath(src)
            and any(other != src for other in outputs_of.get(os.path.realpath(src), []))]
    sources = [entry for entry in sources if entry[0] not in ours]
    # A file named on the command line may be an original that only looks like another input's output (a_x2.png
    # beside a.png, or a shell glob's expansion of both on a rerun): it is skipped as above, but --overwrite never
    # writes over it (it did: a.png's result replaced it)
    named = {os.path.realpath(arg) for arg in args.inputs if arg and os.path.isfile(arg)} if args.overwrite else set()

    jobs: list[Job] = []
    claimed: dict[str, Path] = {}
    input_keys = {os.path.realpath(p) for p, _, err in sources if err is None} | named
    for src, root, err in sources:
        job = Job(src, error=err)
        if err is None:
            job.output = out_for(src, root)
            key = os.path.realpath(job.output)
            if key in input_keys or _same_file(src, job.output):
                job.error = f"output {job.output} would overwrite an input; use -o or --suffix"
            elif key in claimed:
                job.error = f"output {job.output} is also the output of {claimed[key]}; use --suffix or -o"
            else:
                claimed[key] = src
        jobs.append(job)

    done, skipped = 0, len(ours)
    failed: list[Job] = [j for j in jobs if j.error]
    todo = [j for j in jobs if not j.error]
    _remove_stale_temps(todo, quiet=args.quiet)
    interrupted = 0
    previous_term = None
    try:
        previous_term = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (e.g. called from a worker): leave SIGTERM alone
        pass
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc=PROG, disable=True if args.quiet else None, position=0)
    current: Job | None = None
    try:
        for job in todo:
            current = job
            assert job.output is not None
            name = job.source.name
            bar.set_postfix_str(name[:40], refresh=True)
            if job.output.exists() and not args.overwrite:
                if args.skip_existing:
                    skipped += 1
                else:
                    job.error = f"output {job.output} exists (use --overwrite to replace it, --skip-existing to skip)"
                    failed.append(job)
                bar.update(1)
                continue
            update, close = _tile_progress(tqdm, args.quiet, name)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    data = load_image(job.source, max_pixels=args.max_pixels)
                    result = upscaler.image_data(data, progress=update)
                    job.output.parent.mkdir(parents=True, exist_ok=True)
                    save_image(result, job.output, format=args.format, quality=args.quality,
                               overwrite=args.overwrite)
                done += 1
                if not args.quiet:
                    prefix = f"{job.source}: "
                    notes = [str(w.message) for w in caught] + list(data.notes)
                    for note in dict.fromkeys(n[len(prefix):] if n.startswith(prefix) else n for n in notes):
                        tqdm.write(f"note: {job.source}: {note}", file=sys.stderr)
            except (ImageLoadError, OutputExistsError) as e:
                job.error = str(e)
                failed.append(job)
            except (TileOOMError, ValueError, TypeError, OSError, RuntimeError, MemoryError) as e:
                job.error = f"{type(e).__name__}: {e}"
                failed.append(job)
            finally:
                close()
            bar.update(1)
        current = None
    except KeyboardInterrupt as e:
        interrupted = EXIT_TERMINATED if isinstance(e, _Terminated) else EXIT_INTERRUPTED
    finally:
        bar.close()
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
        if "torch" in sys.modules and torch.cuda.is_available():
            torch.cuda.empty_cache()

    elapsed = time.perf_counter() - t0
    for job in failed:
        reason = str(job.error)
        if reason.startswith(f"{job.source}: "):
            reason = reason[len(f"{job.source}: "):]
        print(f"{PROG}: FAILED {job.source}: {reason}", file=sys.stderr)
    parts = [f"{done} of {len(jobs) + len(ours)} image(s) upscaled x{scale} in {elapsed:.1f}s"]
    if skipped:
        reasons = ([f"{skipped - len(ours)} with existing output"] if skipped > len(ours) else []) + \
                  ([f"{len(ours)} being outputs of other inputs"] if ours else [])
        parts.append(f"{skipped} skipped ({', '.join(reasons)})")
    if failed:
        parts.append(f"{len(failed)} failed")
    if interrupted:
        left = len(todo) - done - (skipped - len(ours)) - sum(1 for j in failed if j in todo) - (current is not None)
        parts.append(f"interrupted{f' while on {current.source}' if current else ''}; {max(left, 0)} not started")
    print(f"{PROG}: " + ", ".join(parts), file=sys.stderr if interrupted else sys.stdout)
    if interrupted:
        return interrupted
    return EXIT_FAILED if failed else EXIT_OK


def _remove_stale_temps(jobs: Sequence[Job], *, quiet: bool) -> None:
    """Remove the hidden temporary files (`.<output name>.<random>.partial`) that an earlier run, killed
    while writing one of these outputs, left next to it; never anything else (see `remove_stale_temps`)."""
    by_folder: dict[Path, set[str]] = {}
    for job in jobs:
        if job.output is not None:
            by_folder.setdefault(job.output.parent, set()).add(job.output.name)
    for folder, names in by_folder.items():
        removed = remove_stale_temps(folder, names)
        if removed and not quiet:
            print(f"note: removed {len(removed)} temporary file(s) left in {folder} by an interrupted run",
                  file=sys.stderr)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
