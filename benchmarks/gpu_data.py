"""Carry all of the training data to a lent GPU machine, in as many device calls as the upload limit needs.

    python benchmarks/gpu_data.py pack .gpu          # here: .gpu/part1, .gpu/part2, ... each fits a call
    # on the device, call 1 (carry .gpu/part1), then call 2 at once (carry .gpu/part2), while it is warm:
    python benchmarks/gpu_data.py unpack .gpu/part1 .gpu_data
    python benchmarks/gpu_data.py unpack .gpu/part2 .gpu_data --require-complete && \
        OUT=$OUT DATA=.gpu_data/train VAL=.gpu_data/Set5/HR END=540 bash benchmarks/gpu_session.sh

Why: a device call uploads the working tree plus the carried folders, 64 MiB in all, and ../shared does
not travel. The 571 training images are about 100 MiB as stored (JPEG and PNG), so one call can not carry
them: the first GPU sessions trained on 440 of them. Here JPEG files travel as they are, PNG/BMP/TIFF as
lossless WebP where that is smaller, and the files are split into parts of at most --budget-mib (by
default what one call leaves beside the working tree as it is when packing: pack after committing). `unpack`
writes PNG back into one folder (`.gpu_data/` is git-ignored, so the device keeps it between calls on
the same warm machine) and checks each image's RGB pixels against the sha256 taken here, so the trainer
sees exactly the pixels it would see from ../shared. `--require-complete` fails while a part is missing
(the machine was given back between the calls: unpack part 1 again) or while the folder holds files that
are not in the pack; a part of a new pack clears a folder that holds another pack's images.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script on the device, where the package may not be installed
    sys.path.insert(0, str(REPO))
from dlsr_infer.evaluate import load_rgb  # noqa: E402  (the trainer's own loader: what it sees is hashed)

CALL_MIB = 64  # what one device call uploads: the working tree that travels plus the carried paths
SLACK_MIB = 2  # for files that change between packing and the call (logs, a new checkpoint)
MANIFEST = "manifest.json"
DONE = ".parts"  # in the unpacked folder: one copy of each unpacked part's manifest
LOSSLESS = (".png", ".bmp", ".tif", ".tiff")
SUFFIXES = LOSSLESS + (".jpg", ".jpeg")


def rgb_sha256(a: np.ndarray) -> str:
    """sha256 of uint8 RGB pixels, with the shape in the hash so that a transposed image does not collide."""
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()


def _encode(job: tuple[str, str, int]) -> dict:
    """One source file -> the bytes that travel, and the manifest entry that restores and checks it."""
    src, rel, method = job
    a = load_rgb(src)
    stored, data = rel, None
    if Path(rel).suffix.lower() in LOSSLESS:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "WEBP", lossless=True, quality=100, method=method)
        if buf.tell() < Path(src).stat().st_size:
            stored, data = Path(rel).with_suffix(".webp").as_posix(), buf.getvalue()
    if data is None:
        data = Path(src).read_bytes()
    return {"path": rel if stored == rel else Path(rel).with_suffix(".png").as_posix(), "stored": stored,
            "rgb_sha256": rgb_sha256(a), "bytes": len(data), "data": data}


def travelling_bytes(repo: Path = REPO) -> int:
    """Bytes of the working tree a device call sends besides `carry`: tracked and untracked-not-ignored files."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    files = (repo / os.fsdecode(f) for f in out.split(b"\0") if f)
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def auto_budget_mib(repo: Path = REPO) -> float:
    """The largest part that still fits one call beside this repository's working tree as it is now."""
    budget = CALL_MIB - SLACK_MIB - travelling_bytes(repo) / 2**20
    if budget < 1:
        raise SystemExit(f"gpu_data: the working tree alone is {CALL_MIB - SLACK_MIB - budget:.1f} MiB; "
                         f"a device call carries {CALL_MIB} MiB in all, which leaves no room for data")
    return math.floor(budget * 10) / 10  # rounded down: never over what the call can take


def pack(shared: Path, out: Path, budget_mib: float, method: int, jobs: int) -> list[Path]:
    train, set5 = shared / "data" / "train", shared / "data" / "benchmarks" / "Set5" / "HR"
    if not train.is_dir() or not set5.is_dir():
        raise SystemExit(f"gpu_data: no {train} or {set5} (set --shared or DLSR_SHARED)")
    if out.exists():
        raise SystemExit(f"gpu_data: {out} exists; remove it first")
    sources = [(p, "train/" + p.relative_to(train).as_posix()) for p in sorted(train.rglob("*"))
               if p.is_file() and p.suffix.lower() in SUFFIXES]
    sources += [(p, "Set5/HR/" + p.name) for p in sorted(set5.iterdir()) if p.suffix.lower() in SUFFIXES]
    with ProcessPoolExecutor(jobs) as pool:
        entries = list(pool.map(_encode, [(str(p), rel, method) for p, rel in sources]))
    clash = [p for p, n in Counter(e["path"] for e in entries).items() if n > 1]
    if clash:
        raise SystemExit(f"gpu_data: two source images would both unpack to {clash[0]}")
    budget = int(budget_mib * 2**20)
    too_big = [e["stored"] for e in entries if e["bytes"] > budget]
    if too_big:
        raise SystemExit(f"gpu_data: {too_big[0]} alone is over the {budget_mib} MiB budget of a part")
    # first fit, largest first: few parts, each under the budget
    parts: list[list[dict]] = []
    for e in sorted(entries, key=lambda e: -e["bytes"]):
        for part in parts:
            if sum(x["bytes"] for x in part) + e["bytes"] <= budget:
                part.append(e)
                break
        else:
            parts.append([e])
    # names this pack, so that parts of two different packs are never counted as one complete set: the
    # images and how they are split (the same images packed under another budget split otherwise)
    listing = json.dumps([sorted((e["path"], e["rgb_sha256"]) for e in entries),
                          [sorted(e["path"] for e in part) for part in parts]])
    pack_id = hashlib.sha256(listing.encode()).hexdigest()[:16]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    dirs = []
    for k, part in enumerate(parts, 1):
        d = tmp / f"part{k}"
        for e in part:
            (d / e["stored"]).parent.mkdir(parents=True, exist_ok=True)
            (d / e["stored"]).write_bytes(e["data"])
        files = [{key: e[key] for key in ("path", "stored", "rgb_sha256")}
                 for e in sorted(part, key=lambda e: e["path"])]
        (d / MANIFEST).write_text(json.dumps({"pack": pack_id, "part": k, "parts": len(parts),
                                              "files_total": len(entries), "files": files}, indent=1) + "\n")
        dirs.append(out / f"part{k}")
    tmp.rename(out)  # all parts or none
    n_train = sum(rel.startswith("train/") for _, rel in sources)
    print(f"{out}: {n_train} training images + {len(sources) - n_train} Set5 images in {len(parts)} parts")
    for d in dirs:
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
        print(f"  {d}: {sum(1 for _ in d.rglob('*') if _.is_file()) - 1} files, {size / 2**20:.1f} MiB")
    return dirs


def _restore(job: tuple[str, str, str, str]) -> str | None:
    """Write one file of a part into the unpacked folder; None when its pixels match, else the problem."""
    src, dst, path, want = job
    a = load_rgb(src)
    got = rgb_sha256(a)
    if got != want:
        return f"{path}: pixels differ from the packed image (sha256 {got[:12]} != {want[:12]})"
    out = Path(dst) / path
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if Path(src).suffix.lower() == ".webp":
        Image.fromarray(a).save(tmp, "PNG", compress_level=1)
    else:
        shutil.copyfile(src, tmp)
    os.replace(tmp, out)  # never a half-written image under its real name
    return None


def unpack(part: Path, dest: Path, jobs: int, require_complete: bool) -> int:
    if not (part / MANIFEST).is_file():
        raise SystemExit(f"gpu_data: {part} has no {MANIFEST}: not a part written by `gpu_data.py pack`")
    manifest = json.loads((part / MANIFEST).read_text())
    missing = [f["stored"] for f in manifest["files"] if not (part / f["stored"]).is_file()]
    if missing:
        raise SystemExit(f"gpu_data: {part} lacks {len(missing)} of its files, e.g. {missing[0]}")
    done = {}  # part number -> manifest, of this pack's parts unpacked here, each record read once
    for record in sorted((dest / DONE).glob("part*.json")):
        m = json.loads(record.read_text())
        if m.get("pack") != manifest["pack"]:  # another pack's images (a warm machine keeps dest): the
            shutil.rmtree(dest)                # trainer would train on them too, so none of them stays
            print(f"{dest}: held images of another pack; removed")
            done = {}
            break
        done[int(record.stem[4:])] = m
    jobs_ = [(str(part / f["stored"]), str(dest), f["path"], f["rgb_sha256"]) for f in manifest["files"]]
    with ProcessPoolExecutor(jobs) as pool:
        problems = [p for p in pool.map(_restore, jobs_) if p]
    if problems:
        raise SystemExit(f"gpu_data: {len(problems)} images of {part} are corrupt, e.g. {problems[0]}")
    (dest / DONE).mkdir(parents=True, exist_ok=True)
    (dest / DONE / f"part{manifest['part']}.json").write_text(json.dumps(manifest))
    done[manifest["part"]] = manifest
    have = sum(len(m["files"]) for m in done.values())
    lacking = sorted(set(range(1, manifest["parts"] + 1)) - set(done))
    print(f"{dest}: part {manifest['part']} of {manifest['parts']} unpacked ({len(jobs_)} images); "
          f"{have} of {manifest['files_total']} images present"
          + (f"; parts {lacking} still missing" if lacking else ""))
    if lacking and require_complete:
        print(f"gpu_data: {dest} is incomplete: unpack parts {lacking} first", file=sys.stderr)
        return 1
    if require_complete:  # exactly the pack's images: nothing else in dest that a trainer would also read
        listed = {f["path"] for m in done.values() for f in m["files"]}
        if len(listed) != manifest["files_total"]:  # (parts of one split cover them all; a check all the same)
            print(f"gpu_data: {dest}: its parts list {len(listed)} of the pack's {manifest['files_total']} images: "
                  f"remove {dest} and unpack every part again", file=sys.stderr)
            return 1
        present = {p.relative_to(dest).as_posix() for p in dest.rglob("*")
                   if p.is_file() and DONE not in p.relative_to(dest).parts}
        extra = sorted(present - listed)
        if extra or listed - present:
            print(f"gpu_data: {dest} holds {len(extra)} file(s) that are not in this pack (e.g. "
                  f"{(extra or ['-'])[0]}) and lacks {len(listed - present)} of its images: remove {dest} and "
                  "unpack every part again", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="split ../shared's training images and Set5 into parts that each fit a call")
    p.add_argument("out", type=Path)
    p.add_argument("--shared", type=Path, default=Path(os.environ.get("DLSR_SHARED", REPO.parent / "shared")))
    p.add_argument("--budget-mib", type=float, default=None,
                   help=f"most MiB per part (default: {CALL_MIB} MiB per call less the working tree that travels "
                        f"with it, measured now, and {SLACK_MIB} MiB of slack)")
    p.add_argument("--webp-method", type=int, default=4, choices=range(7), help="WebP effort 0-6 (default 4)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    u = sub.add_parser("unpack", help="restore one part into a folder of PNG/JPEG, checking every image's pixels")
    u.add_argument("part", type=Path)
    u.add_argument("dest", type=Path)
    u.add_argument("--require-complete", action="store_true", help="exit 1 unless every part is now unpacked")
    u.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        budget = args.budget_mib if args.budget_mib is not None else auto_budget_mib()
        print(f"gpu_data: parts of at most {budget} MiB", file=sys.stderr)
        pack(args.shared, args.out, budget, args.webp_method, args.jobs)
        return 0
    return unpack(args.part, args.dest, args.jobs, args.require_complete)


if __name__ == "__main__":
    raise SystemExit(main())
