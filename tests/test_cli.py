"""`dlsr-upscale` (`dlsr_infer.cli`): batches with failures, no clobbering, atomic outputs, interrupts."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from conftest import lively_model, write_image as image, write_image_folder
from dlsr_infer.cli import main
from dlsr_infer.imageio import encode_png16, load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A random-weight 18-channel x2 model directory (output kept inside [0, 1])."""
    return lively_model("dlsr_s_x2").save_pretrained(tmp_path_factory.mktemp("model") / "dlsr-test-x2")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three good images and a corrupt one (a non-image with a .png extension)."""
    d = write_image_folder(tmp_path / "in")
    (d / "corrupt.png").write_bytes(b"this is not a PNG\n" * 20)
    (d / "notes.txt").write_text("not an image and not picked up from a folder")
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def outputs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_a_corrupt_file_fails_alone(capsys, folder: Path, model_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, folder, "-o", f"{out_dir}/", "--model", model_dir)
    assert rc == 1
    assert outputs(out_dir) == ["a.png", "b.jpg", "c.png"]
    assert load_image(out_dir / "a.png").pixels.shape == (48, 60, 3)
    assert load_image(out_dir / "c.png").pixels.shape == (32, 34, 3)
    assert f"FAILED {folder / 'corrupt.png'}: not an image" in err
    assert "3 of 4 image(s) upscaled x2" in out and "1 failed" in out


def test_rerun_refuses_to_clobber_unless_told(capsys, folder: Path, model_dir: Path, tmp_path: Path) -> None:
    (folder / "corrupt.png").unlink()
    out_dir = tmp_path / "out"
    assert run(capsys, folder, "-o", out_dir, "--model", model_dir)[0] == 0
    before = {p: (out_dir / p).read_bytes() for p in outputs(out_dir)}
    (out_dir / "a.png").write_bytes(b"precious")
    rc, out, err = run(capsys, folder, "-o", out_dir, "--model", model_dir)
    assert rc == 1 and err.count("exists (use --overwrite") == 3
    assert (out_dir / "a.png").read_bytes() == b"precious"
    rc, out, err = run(capsys, folder, "-o", out_dir, "--model", model_dir, "--skip-existing")
    assert rc == 0 and "3 skipped (3 with existing output)" in out
    assert (out_dir / "a.png").read_bytes() == b"precious"
    rc, out, err = run(capsys, folder, "-o", out_dir, "--model", model_dir, "--overwrite")
    assert rc == 0 and {p: (out_dir / p).read_bytes() for p in outputs(out_dir)} == before


def test_an_input_is_never_overwritten(capsys, folder: Path, model_dir: Path) -> None:
    src = folder / "a.png"
    original = src.read_bytes()
    rc, out, err = run(capsys, src, "-o", src, "--model", model_dir, "--overwrite")
    assert rc == 1 and "would overwrite an input" in err and src.read_bytes() == original
    rc, out, err = run(capsys, folder / "a.png", "-o", folder, "--model", model_dir, "--overwrite")
    assert rc == 1 and "would overwrite an input" in err and src.read_bytes() == original
    # b.tga's output is b.png, which is also its own output (--suffix ""): b.png is an input, not an output
    # of another input, so neither job may write over it (it was dropped as "ours", then overwritten)
    shots = folder.parent / "shots"
    shots.mkdir()
    (shots / "b.png").write_bytes(original)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(shots / "b.tga")
    for extra in ([], ["--overwrite"]):
        rc, out, err = run(capsys, shots, "-o", shots, "--model", model_dir, *extra)
        assert rc == 1 and err.count("would overwrite an input") == 2, err
        assert (shots / "b.png").read_bytes() == original
    # a_x2.png named on the command line beside a.png may be an original that only looks like a.png's output:
    # it was skipped as "ours", then a.png's result went over it with --overwrite
    twin = folder.parent / "twin"
    twin.mkdir()
    (twin / "a.png").write_bytes(original)
    Image.new("RGB", (16, 16), (10, 200, 10)).save(twin / "a_x2.png")
    kept = (twin / "a_x2.png").read_bytes()
    rc, out, err = run(capsys, twin / "a.png", twin / "a_x2.png", "--model", model_dir, "--overwrite")
    assert rc == 1 and "a_x2.png would overwrite an input" in err and (twin / "a_x2.png").read_bytes() == kept
    # while a rerun over a shell glob (which names every file, outputs included) still skips its own outputs
    (twin / "a_x2.png").unlink()
    assert run(capsys, twin / "a.png", "--model", model_dir)[0] == 0
    rc, out, err = run(capsys, *sorted(twin.glob("*.png")), "--model", model_dir, "--skip-existing")
    assert rc == 0 and "2 skipped" in out and not (twin / "a_x2_x2.png").exists()


def test_an_empty_argument_is_no_file_not_the_current_folder(capsys, folder: Path, model_dir: Path,
                                                            monkeypatch) -> None:
    monkeypatch.chdir(folder)
    before = sorted(p.name for p in folder.iterdir())
    rc, out, err = run(capsys, "", "--model", model_dir)
    assert rc == 1 and "an empty argument names no file or folder" in err
    assert sorted(p.name for p in folder.iterdir()) == before


def test_default_naming_glob_format_and_single_file_output(capsys, folder: Path, model_dir: Path,
                                                           tmp_path: Path) -> None:
    rc, out, err = run(capsys, str(folder / "*.png"), "--model", model_dir)
    assert rc == 1  # corrupt.png matches the glob too
    assert (folder / "a_x2.png").is_file() and (folder / "c_x2.png").is_file() and not (folder / "b_x2.jpg").exists()
    # A rerun over the same folder does not upscale its own outputs again (no a_x2_x2.png).
    rc, out, err = run(capsys, folder, "--model", model_dir, "--skip-existing")
    assert "2 being outputs of other inputs" in out and not (folder / "a_x2_x2.png").exists()
    assert (folder / "b_x2.jpg").is_file()
    rc, out, err = run(capsys, folder / "b.jpg", "-o", tmp_path / "single.webp", "--model", model_dir)
    assert rc == 0 and load_image(tmp_path / "single.webp").pixels.shape == (48, 60, 3)
    rc, out, err = run(capsys, folder / "a.png", "-o", tmp_path / "f", "--format", "jpg", "--suffix", "_big",
                       "--model", model_dir)
    assert rc == 0 and (tmp_path / "f" / "a_big.jpg").is_file()


def test_sixteen_bit_and_icc_go_through(capsys, model_dir: Path, tmp_path: Path) -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    a16 = np.random.default_rng(0).integers(0, 65536, (14, 16, 3), dtype=np.uint16)
    (tmp_path / "deep.png").write_bytes(encode_png16(a16, icc_profile=icc))
    rc, out, err = run(capsys, tmp_path / "deep.png", "--model", model_dir)
    assert rc == 0, err
    back = load_image(tmp_path / "deep_x2.png")
    assert back.pixels.dtype == np.uint16 and back.pixels.shape == (28, 32, 3) and back.icc_profile == icc


def test_bad_inputs_each_get_a_specific_error(capsys, model_dir: Path, tmp_path: Path) -> None:
    good = image(tmp_path / "good.png", 40, 40)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "half.png").write_bytes(image(tmp_path / "small.png", 30, 30).read_bytes()[:200])
    rc, out, err = run(capsys, tmp_path / "empty.png", tmp_path / "half.png", tmp_path / "missing.png", good,
                       "-o", tmp_path / "out", "--model", model_dir, "--max-pixels", "1000")
    assert rc == 1
    assert "empty.png: empty file (0 bytes)" in err
    assert "half.png: truncated or corrupt image data" in err
    assert "missing.png: no such file or folder" in err
    assert "good.png: 40x40 = 1,600 pixels is over the limit of 1,000" in err
    assert outputs(tmp_path / "out") == []


def test_usage_errors_exit_2(capsys, model_dir: Path, tmp_path: Path) -> None:
    a, b = image(tmp_path / "a.png"), image(tmp_path / "b.png")
    rc, out, err = run(capsys, a, "--tile", "-3", "--model", model_dir)
    assert rc == 2 and "--tile must be >= 0" in err
    rc, out, err = run(capsys, a, "--tile", "40", "--model", model_dir)  # under 2 * 64 + the ESA alignment
    assert rc == 2 and "--tile 40 is too small for --tile-overlap 64: tiles must be at least 134 px" in err
    rc, out, err = run(capsys, a, "--tile", "10", "--tile-overlap", "0", "--model", model_dir)
    assert rc == 2 and "tiles must be at least 15 px; use a larger --tile\n" in err  # the network's own minimum
    rc, out, err = run(capsys, a, "--device", "meta", "--model", model_dir)
    assert rc == 2 and "cannot set up the model: device 'meta' holds no data" in err
    if not torch.backends.mps.is_available():  # a Mac-only backend: not in this torch build
        rc, out, err = run(capsys, a, "--device", "mps", "--model", model_dir)
        assert rc == 2 and "device 'mps' is not available here" in err and "Traceback" not in err
    rc, out, err = run(capsys, a, "--tile", "40", "--tile-overlap", "8", "--model", model_dir,
                       "-o", tmp_path / "t.png")
    assert rc == 0 and (tmp_path / "t.png").exists()
    assert run(capsys, a, "--dtype", "int8")[0] == 2  # argparse's own choice check
    assert run(capsys, a, b, "-o", a, "--model", model_dir)[0] == 2  # a file, but two inputs
    rc, out, err = run(capsys, a, "--model", tmp_path / "no-such-model")
    assert rc == 2 and "cannot set up the model" in err
    rc, out, err = run(capsys, a, "--model", model_dir, "--scale", "4")
    assert rc == 2 and "upscales x2 but scale=4" in err
    # --format jpg with -o out.png wrote JPEG bytes into a .png; -o naming an extension-less file
    rc, out, err = run(capsys, a, "-o", tmp_path / "out.png", "--format", "jpg", "--model", model_dir)
    assert rc == 2 and "names a PNG file but --format jpg was given" in err and not (tmp_path / "out.png").exists()
    assert run(capsys, a, "-o", tmp_path / "out.jpeg", "--format", "jpg", "--model", model_dir)[0] == 0
    (tmp_path / "result").write_text("x")
    rc, out, err = run(capsys, a, "-o", tmp_path / "result", "--model", model_dir)
    assert rc == 2 and "is an existing file without an image extension" in err
    # -o naming an image file with two inputs made a folder called one.png (exit 0)
    rc, out, err = run(capsys, a, b, "-o", tmp_path / "one.png", "--model", model_dir)
    assert rc == 2 and "-o" in err and "names an image file, but 2 inputs need an output folder" in err
    assert not (tmp_path / "one.png").exists()
    assert run(capsys, a, b, "-o", f"{tmp_path / 'one.png'}/", "--model", model_dir)[0] == 0  # asked for: a folder
    assert outputs(tmp_path / "one.png") == ["a.png", "b.png"]


def test_a_failing_write_leaves_nothing_behind(capsys, monkeypatch, folder: Path, model_dir: Path,
                                               tmp_path: Path) -> None:
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, folder / "a.png", folder / "c.png", "-o", out_dir, "--model", model_dir)
    assert rc == 1 and err.count("No space left on device") == 2
    assert outputs(out_dir) == []  # no outputs and no temporary files


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell file from folder fsyncs")
def test_ctrl_c_stops_cleanly_with_a_summary(capsys, monkeypatch, folder: Path, model_dir: Path,
                                             tmp_path: Path) -> None:
    calls = []
    real_fsync = os.fsync

    def interrupted_on_second_write(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".partial"):  # not the folder's fsync
            calls.append(fd)
            if len(calls) == 2:  # in the middle of writing the second output
                raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", interrupted_on_second_write)
    out_dir = tmp_path / "out"
    rc, out, err = run(capsys, folder / "a.png", folder / "b.jpg", folder / "c.png", "-o", out_dir,
                       "--model", model_dir)
    assert rc == 130
    assert "1 of 3 image(s) upscaled" in err and "interrupted while on" in err and "1 not started" in err
    assert outputs(out_dir) == ["a.png"]  # b.jpg's temporary file was removed


def test_python_dash_m_help() -> None:
    out = subprocess.run([sys.executable, "-m", "dlsr_infer", "--help"], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert out.returncode == 0 and "--tile-overlap" in out.stdout and "--max-pixels" in out.stdout


def test_folder_expansion(tmp_path: Path) -> None:
    from dlsr_infer.cli import expand_inputs

    image(tmp_path / "d" / "a.png")
    image(tmp_path / "d" / "sub" / "b.png")
    (tmp_path / "d" / ".hidden.png").write_bytes(b"x")
    (tmp_path / "d" / "readme.txt").write_text("x")
    flat = expand_inputs([str(tmp_path / "d")])
    deep = expand_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "a.png")], recursive=True)
    assert [p.name for p, _, err in flat] == ["a.png"]
    assert [p.name for p, _, err in deep] == ["a.png", "b.png"]  # and the repeated a.png only once
    assert expand_inputs([str(tmp_path / "empty*.png")])[0][2] == "no file matches this pattern"


@pytest.mark.parametrize("setting, tuned", [(None, True), ("1", True), ("0", False), ("off", False), ("", False)])
def test_the_cli_tunes_malloc_for_its_own_process_unless_told_not_to(capsys, monkeypatch, folder: Path,
                                                                     model_dir: Path, tmp_path: Path,
                                                                     setting, tuned) -> None:
    from dlsr_infer import fast

    calls: list[int] = []
    monkeypatch.setattr(fast, "tune_malloc", lambda *a, **k: calls.append(1) or True)  # record, change nothing
    if setting is None:
        monkeypatch.delenv("DLSR_TUNE_MALLOC", raising=False)
    else:
        monkeypatch.setenv("DLSR_TUNE_MALLOC", setting)
    rc, _, _ = run(capsys, folder / "a.png", "-o", tmp_path / "a.png", "--model", model_dir)
    assert rc == 0 and (tmp_path / "a.png").is_file()
    assert calls == ([1] if tuned else [])
