"""Upscale a huge image in tiles, with a progress bar, and report the peak memory it took.

    python examples/upscale_huge_tiled.py big_scan.png -o big_scan_x4.png --tile 256
    python examples/upscale_huge_tiled.py --synthetic 4000x3000 -o /tmp/huge_x4.png --random-weights

Memory stays bounded by a tile (plus the output): tiles overlap by `tile_overlap` LR pixels and are
cross-faded, so there are no seams. `--max-pixels` raises the decompression-bomb limit for trusted files.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
from _common import add_model_args, explain_model_error, model_from_args

from dlsr_infer import ModelLoadError
from dlsr_infer.imageio import ImageData, load_image, save_image
from dlsr_infer.upscaling import Upscaler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input", nargs="?")
    ap.add_argument("--synthetic", metavar="WxH", help="make up a random image of this size instead")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--tile", type=int, default=256, help="LR tile size (0 = whole image)")
    ap.add_argument("--max-pixels", type=int, default=500_000_000)
    add_model_args(ap)
    args = ap.parse_args()
    if args.synthetic:
        try:
            w, h = (int(v) for v in args.synthetic.lower().split("x"))
        except ValueError:
            ap.error(f"--synthetic takes WxH, e.g. 4000x3000, not {args.synthetic!r}")
        data = ImageData(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
    elif args.input:
        data = load_image(args.input, max_pixels=args.max_pixels)
    else:
        ap.error("give an input file or --synthetic WxH")
    try:
        upscaler = Upscaler(model_from_args(args), scale=args.scale, tile=args.tile, progress=True)
    except ModelLoadError as e:
        explain_model_error(e)
    t0 = time.perf_counter()
    try:
        result = upscaler.image_data(data)
    except ValueError as e:  # e.g. a tile too small for its overlap: the message says what to change
        ap.error(str(e))
    seconds = time.perf_counter() - t0
    save_image(result, args.output, overwrite=True)
    stats = upscaler.last_stats
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{data.width}x{data.height} -> {result.width}x{result.height} in {seconds:.1f}s, "
          f"{stats.num_tiles} tiles of {stats.tile_w}x{stats.tile_h}, peak RSS {peak:.0f} MB; wrote {args.output}")


if __name__ == "__main__":
    main()
