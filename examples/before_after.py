"""Make the README's before/after picture: a crop of an HR image, its MATLAB-bicubic x4 LR upscaled by
bicubic and by DLSR, side by side.

    python examples/before_after.py ../shared/data/benchmarks/Set5/HR/butterfly.png -o docs/x4_before_after.png \
        --crop 60 60 110 110

The LR image is made exactly as in evaluation (modcrop, MATLAB-style bicubic to 1/4), so the picture
shows what the PSNR table measures.
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from dlsr_infer import upscale
from dlsr_infer.evaluate import load_rgb
from dlsr_infer.imresize import imresize, modcrop
from dlsr_infer.metrics import psnr_y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hr", help="an HR image")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--scale", type=int, default=4, choices=(2, 3, 4))
    ap.add_argument("--model", default=None, help="default: the bundled x<scale>")
    ap.add_argument("--crop", type=int, nargs=4, metavar=("TOP", "LEFT", "H", "W"), default=None,
                    help="HR crop box (default: a centred square)")
    ap.add_argument("--zoom", type=int, default=2, help="pixel zoom of the crops (nearest)")
    args = ap.parse_args()

    s = args.scale
    hr = modcrop(load_rgb(args.hr), s)
    lr = imresize(hr, 1 / s)
    bicubic = imresize(lr, s)
    sr = upscale(lr, scale=s, model=args.model or f"x{s}", tile=0, dtype="fp32")  # as dlsr-eval measures
    top, left, h, w = args.crop or ((hr.shape[0] - 96) // 2, (hr.shape[1] - 96) // 2, 96, 96)
    panels = [("bicubic", bicubic), (f"DLSR x{s}", sr), ("HR", hr)]
    tiles = []
    for label, img in panels:
        crop = Image.fromarray(np.ascontiguousarray(img[top:top + h, left:left + w]))
        crop = crop.resize((w * args.zoom, h * args.zoom), Image.NEAREST)
        text = label if label == "HR" else f"{label}  {psnr_y(img, hr, crop=s):.2f} dB"
        canvas = Image.new("RGB", (crop.width, crop.height + 18), "white")
        canvas.paste(crop, (0, 18))
        ImageDraw.Draw(canvas).text((4, 3), text, fill="black")
        tiles.append(canvas)
    out = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for t in tiles:
        out.paste(t, (x, 0))
        x += t.width + 8
    out.save(args.output)
    print(f"wrote {args.output} (PSNR-Y on the whole image; crop box {top},{left},{h},{w})")


if __name__ == "__main__":
    main()
