"""Build the folder of training data that travels to a lent GPU machine for `gpu_session.sh`.

    python benchmarks/gpu_data.py .gpu        # what the first H100 session carried: 57 MB
    echo /.gpu/ >> .git/info/exclude          # keep it out of git; name it in the device call's carry

The device tool uploads the working tree plus carried folders, 64 MiB in all, and ../shared does not
travel. So: BSDS500 train+test as they are (JPEG), every N-th Sun-Hays image as lossless WebP
(`gpu_session.sh` decodes it back to the same pixels), T91 only with --t91, and Set5 HR for validation.
The total is printed; check it against 64 MiB minus the tracked tree.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="folder to write (train/ and Set5/HR/ inside)")
    ap.add_argument("--shared", type=Path, default=Path(os.environ.get("DLSR_SHARED", REPO.parent / "shared")))
    ap.add_argument("--sunhays-every", type=int, default=2, help="take every N-th Sun-Hays image (default 2)")
    ap.add_argument("--t91", action="store_true", help="also T91 (9.4 MB)")
    args = ap.parse_args(argv)
    train, bench = args.shared / "data" / "train", args.shared / "data" / "benchmarks"
    if not train.is_dir():
        raise SystemExit(f"gpu_data: no training data at {train} (set --shared or DLSR_SHARED)")
    if args.out.exists():
        raise SystemExit(f"gpu_data: {args.out} exists; remove it first")
    for name in ["BSDS500_train200", "BSDS500_test200"] + (["T91"] if args.t91 else []):
        shutil.copytree(train / name, args.out / "train" / name)
    sunhays = args.out / "train" / "SunHays80"
    sunhays.mkdir(parents=True)
    for f in sorted((train / "SunHays80").glob("*.png"))[::args.sunhays_every]:
        with Image.open(f) as im:
            im.convert("RGB").save(sunhays / f"{f.stem}.webp", "WEBP", lossless=True, quality=100, method=4)
    shutil.copytree(bench / "Set5" / "HR", args.out / "Set5" / "HR")
    files = [p for p in args.out.rglob("*") if p.is_file()]
    print(f"{args.out}: {len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
