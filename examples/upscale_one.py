"""Upscale one image file with `upscale()` and save it.

    python examples/upscale_one.py examples/sample.png -o sample_x4.png
    python examples/upscale_one.py photo.jpg -o photo_x2.jpg --scale 2 --model x2

A path in gives a PIL image out (EXIF orientation applied, ICC profile in .info), which we save with
its profile. For files that must keep 16 bits per channel use `upscale_file` (see the end).
"""
from __future__ import annotations

import argparse
import sys

from _common import add_model_args, explain_model_error, model_from_args

from dlsr_infer import ModelLoadError, upscale
from dlsr_infer.upscaling import upscale_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--keep-depth", action="store_true", help="16-bit in, 16-bit out (via upscale_file)")
    add_model_args(ap)
    args = ap.parse_args()
    try:
        if args.keep_depth:
            notes = upscale_file(args.input, args.output, args.scale, model_from_args(args), overwrite=True)
            for n in notes:
                print(f"note: {n}")
        else:
            big = upscale(args.input, scale=args.scale, model=model_from_args(args))
            if not hasattr(big, "save"):  # 16-bit colour comes back as a uint16 array (PIL has no such mode)
                print("error: the input has 16 bits per channel; pass --keep-depth to write a 16-bit PNG",
                      file=sys.stderr)
                raise SystemExit(2)
            big.save(args.output, icc_profile=big.info.get("icc_profile"))
    except ModelLoadError as e:
        explain_model_error(e)
    except (ValueError, TypeError, OSError) as e:  # e.g. --scale 3 with an x2 model, an unreadable input
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
