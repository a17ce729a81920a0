"""Upscale every image in a folder, reusing one loaded model (`Upscaler`), skipping failures.

    python examples/upscale_folder.py photos/ out/ --scale 2

The `dlsr-upscale photos/ -o out/` command does the same with progress bars, --overwrite and Ctrl-C
handling; this is the library version of it in a dozen lines.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from _common import add_model_args, explain_model_error, model_from_args

from dlsr_infer import ModelLoadError
from dlsr_infer.imageio import IMAGE_EXTENSIONS, ImageLoadError, load_image, save_image
from dlsr_infer.upscaling import Upscaler


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("output", type=Path)
    add_model_args(ap)
    args = ap.parse_args()
    try:
        upscaler = Upscaler(model_from_args(args), scale=args.scale)  # loaded once, used for every file
    except ModelLoadError as e:
        explain_model_error(e)
    args.output.mkdir(parents=True, exist_ok=True)
    failed = []
    paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    stems = [p.stem for p in paths]
    # a.jpg and a.png would both become a.png: such names keep their suffix (a.jpg.png, a.png.png)
    names = [f"{p.stem}.png" if stems.count(p.stem) == 1 else f"{p.name}.png" for p in paths]
    clashes = {n for n in names if names.count(n) > 1}  # a.jpg.png as an input beside a.jpg and a.png
    for path, name in zip(paths, names):
        if name in clashes:
            failed.append(path)
            print(f"{path.name}: FAILED: its output {name} is also another input's; rename one")
            continue
        try:
            result = upscaler.image_data(load_image(path))  # keeps 16-bit, alpha, ICC profile, EXIF
            save_image(result, args.output / name, overwrite=True)  # atomic write
            print(f"{path.name}: {result.width}x{result.height}")
        except (ImageLoadError, OSError, ValueError) as e:
            failed.append(path)
            print(f"{path.name}: FAILED: {e}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
