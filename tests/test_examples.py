"""The example scripts run as their docstrings say (small inputs, CPU, bundled or random weights), and
bad arguments end in a usage error, not a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT
from dlsr_infer.imageio import encode_png16

EXAMPLES = REPO_ROOT / "examples"


def run(*args: str | Path, ok: bool = True, rc: int | None = None) -> subprocess.CompletedProcess:
    """Run an example; `ok=False`: expect a usage error (exit 2, no traceback); `rc`: expect that exit status."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=REPO_ROOT)
    expected = rc if rc is not None else (0 if ok else 2)
    assert proc.returncode == expected and "Traceback" not in proc.stderr, proc.stdout[-1000:] + proc.stderr[-3000:]
    return proc


def size_of(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_make_sample_reproduces_the_bundled_sample(tmp_path: Path) -> None:
    run(EXAMPLES / "make_sample.py", "-o", tmp_path / "s.png")
    same = np.array_equal(np.asarray(Image.open(tmp_path / "s.png")), np.asarray(Image.open(EXAMPLES / "sample.png")))
    assert same, "examples/sample.png is no longer what make_sample.py makes"
    assert "--size must be at least 64" in run(EXAMPLES / "make_sample.py", "-o", tmp_path / "t.png", "--size", "48",
                                               ok=False).stderr


def test_upscale_one_and_folder_with_bundled_weights(tmp_path: Path) -> None:
    run(EXAMPLES / "upscale_one.py", EXAMPLES / "sample.png", "-o", tmp_path / "one.png", "--scale", "2",
        "--model", "x2-s")
    assert size_of(tmp_path / "one.png") == (256, 256)
    err = run(EXAMPLES / "upscale_one.py", EXAMPLES / "sample.png", "-o", tmp_path / "bad.png", "--scale", "3",
              "--model", "x2-s", ok=False).stderr
    assert "upscales x2 but scale=3 was asked" in err and not (tmp_path / "bad.png").exists()
    deep = np.random.default_rng(0).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(encode_png16(deep))
    err = run(EXAMPLES / "upscale_one.py", tmp_path / "deep.png", "-o", tmp_path / "deep_x2.png", "--scale", "2",
              "--model", "x2-s", ok=False).stderr
    assert "16 bits per channel; pass --keep-depth" in err and not (tmp_path / "deep_x2.png").exists()
    run(EXAMPLES / "upscale_one.py", tmp_path / "deep.png", "-o", tmp_path / "deep_x2.png", "--scale", "2",
        "--model", "x2-s", "--keep-depth")
    assert size_of(tmp_path / "deep_x2.png") == (48, 40)

    (tmp_path / "in").mkdir()
    Image.open(EXAMPLES / "sample.png").crop((0, 0, 40, 30)).save(tmp_path / "in" / "a.png")
    Image.open(EXAMPLES / "sample.png").crop((0, 0, 20, 24)).convert("RGB").save(tmp_path / "in" / "b.jpg")
    Image.open(EXAMPLES / "sample.png").crop((0, 0, 30, 20)).save(tmp_path / "in" / "b.png")
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    proc = run(EXAMPLES / "upscale_folder.py", tmp_path / "in", tmp_path / "out", "--scale", "2", "--model", "x2-s",
               rc=1)  # 1: some file failed
    # the broken file is skipped; b.jpg and b.png keep their suffixes rather than both writing b.png
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.jpg.png", "b.png.png"]
    assert size_of(tmp_path / "out" / "a.png") == (80, 60) and "broken.png: FAILED" in proc.stdout
    assert size_of(tmp_path / "out" / "b.jpg.png") == (40, 48) and size_of(tmp_path / "out" / "b.png.png") == (60, 40)
    (tmp_path / "in2").mkdir()  # c.jpg -> c.jpg.png, which is also what the input c.jpg.png maps to
    for name in ("c.jpg", "c.png", "c.jpg.png"):
        Image.open(EXAMPLES / "sample.png").crop((0, 0, 20, 20)).convert("RGB").save(tmp_path / "in2" / name,
                                                                                    format="JPEG" if name == "c.jpg" else "PNG")
    proc = run(EXAMPLES / "upscale_folder.py", tmp_path / "in2", tmp_path / "out2", "--scale", "2", "--model", "x2-s",
               rc=1)
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["c.png.png"]
    assert proc.stdout.count("is also another input's") == 2


def test_tiled_and_tensor_batch_examples_with_random_weights(tmp_path: Path) -> None:
    proc = run(EXAMPLES / "upscale_huge_tiled.py", "--synthetic", "200x150", "-o", tmp_path / "h.png",
               "--random-weights", "--scale", "2", "--tile", "140")
    assert size_of(tmp_path / "h.png") == (400, 300) and "tiles of" in proc.stdout
    err = run(EXAMPLES / "upscale_huge_tiled.py", "--synthetic", "200x150", "-o", tmp_path / "x.png",
              "--random-weights", "--scale", "2", "--tile", "64", ok=False).stderr
    assert "tile 64 is too small" in err and not (tmp_path / "x.png").exists()
    assert "--synthetic takes WxH" in run(EXAMPLES / "upscale_huge_tiled.py", "--synthetic", "20ax1", "-o",
                                          tmp_path / "x.png", "--random-weights", ok=False).stderr

    proc = run(EXAMPLES / "upscale_tensor_batch_gpu.py", "--random-weights", "--frames", "2", "--size", "32x40",
               "--scale", "2")
    assert "(2, 3, 32, 40)" in proc.stdout and "(2, 3, 64, 80)" in proc.stdout


def test_before_after_picture(benchmarks_dir: Path, tmp_path: Path) -> None:
    run(EXAMPLES / "before_after.py", benchmarks_dir / "Set5" / "HR" / "butterfly.png", "-o", tmp_path / "ba.png",
        "--crop", "60", "60", "110", "110")
    w, h = size_of(tmp_path / "ba.png")
    assert w > 3 * 220 and h >= 220  # three 2x-zoomed 110 px crops side by side
