"""benchmarks/gpu_data.py: the training data split into parts that each fit one device call, and unpacked
on the device into exactly the pixels the trainer reads from ../shared."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlsr_infer.evaluate import load_rgb
from dlsr_search.synthetic import write_images

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_data.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def _shared(root: Path) -> Path:
    """A small ../shared: PNG (RGB, gray, palette) and JPEG training images, and Set5 HR."""
    train = root / "data" / "train"
    write_images(train / "T91", n=3, size=72)
    write_images(train / "SunHays80", n=4, size=160, seed=1)
    Image.fromarray(np.asarray(Image.open(train / "T91" / "img0.png"))[..., 0]).save(train / "T91" / "gray.png")
    Image.open(train / "T91" / "img1.png").convert("P").save(train / "T91" / "pal.png")
    jpg = train / "BSDS500_train200"
    jpg.mkdir(parents=True)
    for i in range(3):
        Image.open(train / "SunHays80" / f"img{i}.png").save(jpg / f"{i}.jpg", quality=90)
    write_images(root / "data" / "benchmarks" / "Set5" / "HR", n=2, size=48, seed=5)
    return root


def _images(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).with_suffix("").as_posix(): load_rgb(p)
            for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg")}


def test_pack_splits_under_the_budget_and_unpack_restores_every_pixel(tmp_path):
    shared = _shared(tmp_path / "shared")
    packed = _run("pack", str(tmp_path / "gpu"), "--shared", str(shared), "--budget-mib", "0.08", "--jobs", "2")
    assert packed.returncode == 0, packed.stderr
    parts = sorted((tmp_path / "gpu").iterdir())
    assert len(parts) >= 2 and [p.name for p in parts] == [f"part{k}" for k in range(1, len(parts) + 1)]
    for part in parts:
        payload = [p for p in part.rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert sum(p.stat().st_size for p in payload) <= 0.08 * 2**20
    stored = [p for part in parts for p in part.rglob("*") if p.is_file() and p.name != "manifest.json"]
    assert {p.suffix for p in stored} == {".webp", ".jpg"}  # PNG travels as lossless WebP, JPEG as it is

    dest = tmp_path / "dest"
    first = _run("unpack", str(parts[0]), str(dest), "--require-complete", "--jobs", "2")
    assert first.returncode == 1 and "incomplete" in first.stderr  # a part is missing: the session must not start
    for part in parts[1:]:
        assert _run("unpack", str(part), str(dest), "--jobs", "2").returncode == 0
    last = _run("unpack", str(parts[-1]), str(dest), "--require-complete")  # unpacking twice is harmless
    assert last.returncode == 0 and "14 of 14 images present" in last.stdout

    want = {**{f"train/{k}": v for k, v in _images(shared / "data" / "train").items()},
            **{f"Set5/HR/{k}": v for k, v in _images(shared / "data" / "benchmarks" / "Set5" / "HR").items()}}
    got = _images(dest)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert not list(dest.rglob("*.tmp"))

    # a different pack (one more image) unpacked into the same folder starts its own count
    write_images(shared / "data" / "train" / "extra", n=1, size=64, seed=9)
    assert _run("pack", str(tmp_path / "gpu2"), "--shared", str(shared), "--budget-mib", "0.08").returncode == 0
    other = _run("unpack", str(tmp_path / "gpu2" / "part1"), str(dest), "--require-complete")
    assert other.returncode == 1 and "of 15 images present" in other.stdout
    # ... and the images of the pack before are gone: a pack without an image leaves none of it behind
    (shared / "data" / "train" / "T91" / "gray.png").unlink()
    assert _run("pack", str(tmp_path / "gpu3"), "--shared", str(shared), "--budget-mib", "0.08").returncode == 0
    for part in sorted((tmp_path / "gpu3").iterdir()):
        done = _run("unpack", str(part), str(dest), "--require-complete")
    assert done.returncode == 0 and "14 of 14 images present" in done.stdout, done.stderr
    assert not (dest / "train" / "T91" / "gray.png").exists() and (dest / "train" / "extra" / "img0.png").is_file()
    # a stray file a trainer would also read (put there by hand, or left by a tool) fails the completeness check
    (dest / "train" / "stray.png").write_bytes((dest / "train" / "extra" / "img0.png").read_bytes())
    stray = _run("unpack", str(sorted((tmp_path / "gpu3").iterdir())[0]), str(dest), "--require-complete")
    assert stray.returncode == 1 and "holds 1 file(s) that are not in this pack (e.g. train/stray.png)" in stray.stderr


def test_the_same_images_split_another_way_are_another_pack(tmp_path):
    """Packed twice under two budgets, the parts had one pack id: part 1 of one and part 2 of the other
    passed --require-complete with images missing (training on a subset, silently)."""
    shared = _shared(tmp_path / "shared")
    for name, budget in (("a", "0.06"), ("b", "0.1")):
        assert _run("pack", str(tmp_path / name), "--shared", str(shared), "--budget-mib", budget).returncode == 0
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert len(a) != len(b)
    ids = {json.loads((p / "manifest.json").read_text())["pack"] for p in (a[0], b[0])}
    assert len(ids) == 2
    dest = tmp_path / "dest"
    assert _run("unpack", str(a[0]), str(dest)).returncode == 0
    mixed = _run("unpack", str(b[-1]), str(dest), "--require-complete")
    assert mixed.returncode == 1 and "held images of another pack; removed" in mixed.stdout


def test_unpack_refuses_a_corrupted_image_and_pack_refuses_to_overwrite(tmp_path):
    shared = _shared(tmp_path / "shared")
    assert _run("pack", str(tmp_path / "gpu"), "--shared", str(shared), "--jobs", "2").returncode == 0
    part = tmp_path / "gpu" / "part1"
    manifest = json.loads((part / "manifest.json").read_text())
    assert manifest["parts"] == 1 and manifest["files_total"] == 14
    entry = next(f for f in manifest["files"] if f["stored"].endswith(".webp"))
    with Image.open(part / entry["stored"]) as im:
        a = np.asarray(im.convert("RGB")).copy()
    a[0, 0] ^= 1  # one pixel off: still a valid image, so only the checksum can tell
    Image.fromarray(a).save(part / entry["stored"], "WEBP", lossless=True)
    bad = _run("unpack", str(part), str(tmp_path / "dest"))
    assert bad.returncode != 0 and entry["path"] in bad.stderr and "pixels differ" in bad.stderr
    assert not (tmp_path / "dest" / entry["path"]).exists()

    nothing = _run("unpack", str(tmp_path / "shared"), str(tmp_path / "dest"))
    assert nothing.returncode != 0 and "no manifest.json" in nothing.stderr

    again = _run("pack", str(tmp_path / "gpu"), "--shared", str(shared))
    assert again.returncode != 0 and "exists" in again.stderr
    assert (part / "manifest.json").is_file()

    tiny = _run("pack", str(tmp_path / "gpu2"), "--shared", str(shared), "--budget-mib", "0.001")
    assert tiny.returncode != 0 and "over the 0.001 MiB budget" in tiny.stderr
    assert not (tmp_path / "gpu2").exists() and not (tmp_path / "gpu2.partial").exists()


def test_default_budget_is_what_a_call_leaves_beside_the_travelling_tree(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import gpu_data
    finally:
        sys.path.remove(str(SCRIPT.parent))
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/big/\n")
    (repo / "tracked.bin").write_bytes(b"\0" * 3 * 2**20)
    subprocess.run(["git", "-C", str(repo), "add", "tracked.bin", ".gitignore"], check=True)
    (repo / "untracked.bin").write_bytes(b"\0" * 2**20)  # not ignored: it travels too
    (repo / "big").mkdir()
    (repo / "big" / "ignored.bin").write_bytes(b"\0" * 5 * 2**20)  # ignored: stays behind
    assert gpu_data.travelling_bytes(repo) == 4 * 2**20 + len("/big/\n")
    # 64 - 2 - 4 MiB, less the .gitignore's 6 bytes: rounded down, never up past what a call can take
    assert gpu_data.auto_budget_mib(repo) == gpu_data.CALL_MIB - gpu_data.SLACK_MIB - 4.1

    with open(repo / "untracked.bin", "r+b") as f:  # a tree that leaves no room for data is refused
        f.truncate(60 * 2**20)
    with pytest.raises(SystemExit, match="leaves no room"):
        gpu_data.auto_budget_mib(repo)
