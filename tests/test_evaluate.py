"""Benchmark evaluation: bicubic baseline end to end (CLI), evaluate() with a tiny model, caching, errors."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dlsr_infer import evaluate as ev
from dlsr_infer.imresize import imresize_torch

# Our measured Set5 bicubic PSNR-Y / SSIM-Y (border = scale, unrounded Y), and literature PSNR-Y
# (e.g. the bicubic rows of the VDSR/EDSR/RFDN tables).
MEASURED = {2: (33.6734, 0.93029), 3: (30.4033, 0.86891), 4: (28.4290, 0.81114)}
LITERATURE_PSNR = {2: 33.66, 3: 30.39, 4: 28.42}


class BicubicNet(torch.nn.Module):
    """Stand-in model: float MATLAB-bicubic upscaling of the NCHW [0, 1] input."""

    def __init__(self, scale: int) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return imresize_torch(x, self.scale)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_cli_bicubic_set5(benchmarks_dir: Path, tmp_path: Path, scale: int, capsys) -> None:
    js, md = tmp_path / "out" / "r.json", tmp_path / "r.md"
    rc = ev.main(["--bicubic", "--scale", str(scale), "--data", str(benchmarks_dir), "--sets", "Set5",
                  "--json", str(js), "--markdown", str(md)])
    assert rc == 0
    assert "Set5" in capsys.readouterr().out
    (row,) = json.loads(js.read_text())["results"]
    assert (row["dataset"], row["scale"], row["method"], row["images"]) == ("Set5", scale, "bicubic", 5)
    psnr_ref, ssim_ref = MEASURED[scale]
    assert row["psnr"] == pytest.approx(psnr_ref, abs=0.02)
    assert row["ssim"] == pytest.approx(ssim_ref, abs=0.002)
    assert abs(row["psnr"] - LITERATURE_PSNR[scale]) < 0.05
    assert len(row["per_image"]) == 5
    assert f"| Set5 | x{scale} | bicubic | {row['psnr']:.2f} |" in md.read_text()


def test_evaluate_with_tiny_model_matches_bicubic(benchmarks_dir: Path) -> None:
    """A float-bicubic 'model' scores within a hair of the uint8 bicubic baseline."""
    set5 = benchmarks_dir / "Set5"
    (res,) = ev.evaluate(BicubicNet(2), [set5])
    (base,) = ev.evaluate_bicubic([set5], scale=2)
    assert res["images"] == 5 and res["scale"] == 2 and res["method"] == "model"
    assert res["psnr"] == pytest.approx(base["psnr"], abs=0.02)
    assert res["ssim"] == pytest.approx(base["ssim"], abs=0.001)
    assert {"image", "psnr", "ssim"} <= set(res["per_image"][0])


def test_real_dlsr_network_runs(benchmarks_dir: Path, tmp_path: Path) -> None:
    """Smoke test with the package's own network (random weights) on a 48x48 crop: finite scores."""
    from dlsr_infer.model import DLSR

    model = DLSR.from_genotype_name("dlsr_x2")
    crop = ev.load_rgb(benchmarks_dir / "Set5" / "HR" / "bird.png")[100:148, 100:148]
    Image.fromarray(crop).save(tmp_path / "bird_crop.png")
    (res,) = ev.evaluate(model, tmp_path, max_images=1)
    assert res["images"] == 1 and math.isfinite(res["psnr"]) and 0 < res["psnr"] < 60


def test_plain_folder_gray_image_and_cache(benchmarks_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(benchmarks_dir / "Set14" / "HR" / "bridge.png", folder / "bridge.png")  # single channel
    shutil.copy(benchmarks_dir / "Set5" / "HR" / "bird.png", folder / "bird.png")
    (folder / "notes.txt").write_text("not an image")
    assert ev.load_rgb(folder / "bridge.png").shape == (512, 512, 3)
    cache = tmp_path / "cache"
    (first,) = ev.evaluate_bicubic(folder, scale=3, cache_dir=cache)
    assert first["dataset"] == "mine" and first["images"] == 2
    cached = cache / "mine" / "X3" / "birdx3.png"
    oracle = benchmarks_dir / "Set5" / "LR_bicubic" / "X3" / "birdx3.png"
    assert np.array_equal(ev.load_rgb(cached), ev.load_rgb(oracle))
    # Second run reads the cache; a stale (wrong-size) cache entry is regenerated.
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(cache / "mine" / "X3" / "bridgex3.png")
    (second,) = ev.evaluate_bicubic(folder, scale=3, cache_dir=cache)
    assert second["psnr"] == pytest.approx(first["psnr"], abs=1e-12)
    assert ev.load_rgb(cache / "mine" / "X3" / "bridgex3.png").shape == (170, 170, 3)


def test_an_image_edited_in_place_never_gets_its_stale_cached_lr(benchmarks_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    shutil.copy(benchmarks_dir / "Set5" / "HR" / "bird.png", folder / "bird.png")
    cache = tmp_path / "cache"
    (before,) = ev.evaluate_bicubic(folder, scale=2, cache_dir=cache)
    hr = ev.load_rgb(folder / "bird.png")
    noisy = np.clip(hr + np.random.default_rng(0).normal(0, 8, hr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(folder / "bird.png")  # same name and size, new pixels
    (cached,) = ev.evaluate_bicubic(folder, scale=2, cache_dir=cache)
    (fresh,) = ev.evaluate_bicubic(folder, scale=2)
    assert cached["psnr"] == pytest.approx(fresh["psnr"], abs=1e-12)
    assert cached["psnr"] != pytest.approx(before["psnr"], abs=1e-3)  # the edit does change the score
    # an entry written by another tool (no digest) is not trusted either: it is made again
    entry = cache / "mine" / "X2" / "birdx2.png"
    Image.fromarray(np.zeros_like(ev.load_rgb(entry))).save(entry)
    (again,) = ev.evaluate_bicubic(folder, scale=2, cache_dir=cache)
    assert again["psnr"] == pytest.approx(fresh["psnr"], abs=1e-12)


def test_two_writers_of_one_cache_entry_both_succeed(tmp_path: Path, monkeypatch) -> None:
    """Two training runs started together share an LR cache: another writer finishing the same entry while
    ours is half written (here: between our encode and our rename) must not fail ours, nor leave temp files."""
    hr = np.random.default_rng(0).integers(0, 256, (24, 36, 3), dtype=np.uint8)
    cache = tmp_path / "X2" / "img.png"
    real_save = Image.Image.save
    other_writer = {"runs": 0}

    def save_then_other_writer_finishes(im, fp, *args, **kwargs):
        real_save(im, fp, *args, **kwargs)
        if other_writer["runs"] == 0:
            other_writer["runs"] += 1
            assert not cache.exists()  # the other writer also saw a miss
            ev.make_lr(hr, 2, cache)

    monkeypatch.setattr(Image.Image, "save", save_then_other_writer_finishes)
    lr = ev.make_lr(hr, 2, cache)
    assert other_writer["runs"] == 1
    assert np.array_equal(ev.load_rgb(cache), lr) and lr.shape == (12, 18, 3)
    assert [p.name for p in cache.parent.iterdir()] == ["img.png"]


def test_dataset_naming_and_default_root(benchmarks_dir: Path, monkeypatch) -> None:
    assert ev.dataset_name(benchmarks_dir / "Set5" / "HR") == "Set5"
    assert ev.dataset_name(benchmarks_dir / "Set5") == "Set5"
    assert len(ev.dataset_images(benchmarks_dir / "Set5")) == 5
    monkeypatch.setenv("DLSR_BENCHMARKS", str(benchmarks_dir))
    assert ev.default_benchmarks_dir() == benchmarks_dir
    monkeypatch.delenv("DLSR_BENCHMARKS")
    monkeypatch.setenv("DLSR_SHARED", "/somewhere")
    assert ev.default_benchmarks_dir() == Path("/somewhere/data/benchmarks")
    # the trainer finds the shared folder by the same rule
    from dlsr_search.data import default_data_roots

    monkeypatch.delenv("DLSR_DATA", raising=False)
    assert default_data_roots() == [Path("/somewhere/data/train")]


def test_the_shared_folder_is_found_from_an_installed_package(tmp_path: Path, monkeypatch) -> None:
    """After `pip install .` the package runs from site-packages, where no ../shared is beside it: the
    default then is ../shared seen from the current folder (a checkout of the repo)."""
    import dlsr_infer.evaluate as evaluate_mod

    monkeypatch.delenv("DLSR_SHARED", raising=False)
    monkeypatch.delenv("DLSR_BENCHMARKS", raising=False)
    installed = tmp_path / "venv" / "lib" / "site-packages" / "dlsr_infer" / "evaluate.py"
    monkeypatch.setattr(evaluate_mod, "__file__", str(installed))
    (tmp_path / "shared").mkdir()
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    assert ev.default_benchmarks_dir() == tmp_path / "shared" / "data" / "benchmarks"
    (tmp_path / "shared").rmdir()  # nowhere: the error names ../shared from here
    assert ev.default_shared_dir() == tmp_path / "shared"


def test_cli_with_model(benchmarks_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """MODEL goes through DLSR.from_pretrained; with --bicubic both rows are reported."""
    model_mod = pytest.importorskip("dlsr_infer.model")
    seen = []

    def fake_from_pretrained(name, **kwargs):
        seen.append(name)
        return BicubicNet(4)

    monkeypatch.setattr(model_mod.DLSR, "from_pretrained", staticmethod(fake_from_pretrained))
    js = tmp_path / "r.json"
    rc = ev.main(["x4", "--bicubic", "--data", str(benchmarks_dir / "Set5"), "--max-images", "2", "--json", str(js)])
    assert rc == 0 and seen == ["x4"]
    rows = json.loads(js.read_text())["results"]
    assert [(r["method"], r["scale"], r["images"]) for r in rows] == [("x4", 4, 2), ("bicubic", 4, 2)]
    assert "x4" in capsys.readouterr().out
    # a reduced-precision run is labelled as one: it is not the published (fp32) protocol's figure
    assert ev.main(["x4", "--data", str(benchmarks_dir / "Set5"), "--max-images", "1", "--dtype", "bf16",
                    "--json", str(js), "--overwrite"]) == 0
    payload = json.loads(js.read_text())
    assert payload["results"][0]["method"] == "x4@bf16" and "x4@bf16: run under --dtype bf16" in payload["protocol"]
    assert "x4@bf16" in capsys.readouterr().out
    assert ev.main(["x4", "--scale", "2", "--data", str(benchmarks_dir / "Set5")]) == 2
    assert "does not match" in capsys.readouterr().err


def test_result_files_are_not_written_over_unasked_and_never_over_the_data(benchmarks_dir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """--json/--markdown replaced any existing file without a word, an HR image being evaluated included;
    an empty path (an unset shell variable) was taken as 'no file'."""
    import shutil

    data = tmp_path / "Set5"
    shutil.copytree(benchmarks_dir / "Set5", data)
    hr = sorted((data / "HR").iterdir())[0]
    before = hr.read_bytes()
    common = ["--bicubic", "--scale", "2", "--data", str(data), "--max-images", "1"]
    (tmp_path / "old.json").write_text("an earlier run's results")
    for opt, path in (("--json", tmp_path / "old.json"), ("--markdown", hr), ("--json", "")):
        with pytest.raises(SystemExit) as exit_:
            ev.main([*common, opt, str(path)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and (f"{opt} {path} already exists; pass --overwrite" in err if path
                                          else "--json needs a file path" in err), err
    assert ev.main([*common, "--json", str(hr), "--overwrite"]) == 2  # an input, even with --overwrite
    assert "is an image file in the data being evaluated" in capsys.readouterr().err
    assert ev.main([*common, "--markdown", str(data / "HR" / "new.png")]) == 2  # it would join the set
    capsys.readouterr()
    assert hr.read_bytes() == before and (tmp_path / "old.json").read_text() == "an earlier run's results"
    assert ev.main([*common, "--json", str(tmp_path / "old.json"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "old.json").read_text())["results"][0]["method"] == "bicubic"


def test_result_files_that_cannot_be_written(benchmarks_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """A folder given as --json/--markdown is refused before the evaluation (which may take minutes); an
    unwritable path is a clean error after it, with the table printed and no half-written file."""
    def not_now(*a, **k):
        raise AssertionError("evaluated although the output path was bad")

    monkeypatch.setattr(ev, "evaluate_bicubic", not_now)
    common = ["--bicubic", "--scale", "2", "--data", str(benchmarks_dir / "Set5"), "--max-images", "1"]
    for opt in ("--json", "--markdown"):
        with pytest.raises(SystemExit) as exit_:
            ev.main([*common, opt, str(tmp_path)])
        assert exit_.value.code == 2 and f"{opt} {tmp_path} is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main([*common, "--json", str(tmp_path / "r"), "--markdown", str(tmp_path / "r")])
    assert "name the same file" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")  # a file where a folder must be made: refused before the run too
    for opt in ("--json", "--markdown", "--cache-dir"):
        with pytest.raises(SystemExit) as exit_:
            ev.main([*common, "--json", str(tmp_path / "ok.json"), opt, str(tmp_path / "file" / "sub" / "r")])
        assert exit_.value.code == 2 and f"{opt}: {tmp_path / 'file'} is a file" in capsys.readouterr().err
        with pytest.raises(SystemExit) as exit_:  # a name the file system refuses: a usage error, no traceback
            ev.main([*common, opt, str(tmp_path / ("d" * 300) / "r")])
        assert exit_.value.code == 2 and "File name too long" in capsys.readouterr().err
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

    import dlsr_infer.imageio as imageio_mod
    real_stage = imageio_mod._stage_temp

    def disk_full_for_markdown(path, write, suffix):
        if str(path).endswith(".md"):
            raise OSError(28, "No space left on device")
        return real_stage(path, write, suffix)

    (tmp_path / "ok.json").write_text("an earlier run's results")
    monkeypatch.setattr(imageio_mod, "_stage_temp", disk_full_for_markdown)
    assert ev.main([*common, "--json", str(tmp_path / "ok.json"), "--markdown", str(tmp_path / "r.md"), "--overwrite"]) == 1
    out, err = capsys.readouterr()
    assert "Set5" in out and (f"dlsr-eval: error: cannot write --json {tmp_path / 'ok.json'} and --markdown "
                              f"{tmp_path / 'r.md'}: No space left on device (neither was written") in err, err
    # both or neither: the JSON is not replaced when its Markdown table cannot be written beside it
    assert "Traceback" not in err and (tmp_path / "ok.json").read_text() == "an earlier run's results"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ok.json"]
    monkeypatch.undo()
    # the renames come one after the other: a rename that fails after the JSON's says the JSON was written
    real_commit = imageio_mod._commit_temp

    def md_rename_fails(tmp, path, overwrite):
        if str(path).endswith(".md"):
            raise OSError(13, "Permission denied")
        return real_commit(tmp, path, overwrite)

    monkeypatch.setattr(imageio_mod, "_commit_temp", md_rename_fails)
    assert ev.main([*common, "--json", str(tmp_path / "ok.json"), "--markdown", str(tmp_path / "r.md"), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"Permission denied (only --json {tmp_path / 'ok.json'} was written; the table above" in err, err
    assert json.loads((tmp_path / "ok.json").read_text())["results"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ok.json"]
    monkeypatch.undo()
    assert ev.main([*common, "--json", str(tmp_path / "ok.json"), "--markdown", str(tmp_path / "r.md"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["results"][0]["images"] == 1
    assert "| Set5 | x2 | bicubic |" in (tmp_path / "r.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ok.json", "r.md"]


def test_errors(benchmarks_dir: Path, tmp_path: Path, capsys) -> None:
    for argv, message in (([], "MODEL is required unless --bicubic is given"),
                          (["--bicubic"], "--bicubic without MODEL needs --scale")):
        with pytest.raises(SystemExit) as exit_:
            ev.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert ev.main(["--bicubic", "--scale", "2", "--data", str(benchmarks_dir), "--sets", "Nope"]) == 2
    assert "'Nope' not found" in capsys.readouterr().err
    assert ev.main(["--bicubic", "--scale", "2", "--data", str(tmp_path / "missing")]) == 2
    with pytest.raises(ValueError, match="no images"):
        ev.evaluate_bicubic(tmp_path, scale=2)
    with pytest.raises(ValueError, match="positive integer"):
        ev.evaluate_bicubic(benchmarks_dir / "Set5", scale=0)
    with pytest.raises(ValueError, match="no .scale"):
        ev.evaluate(torch.nn.Identity(), benchmarks_dir / "Set5")
    with pytest.raises(ValueError, match="output shape"):
        ev.evaluate(torch.nn.Identity(), benchmarks_dir / "Set5", scale=2, max_images=1)
    # a device that is not there, an empty model name, an image too small: clean errors naming the problem
    for device in ("bogus", *(() if torch.cuda.is_available() else ("cuda",))):
        assert ev.main(["x2", "--data", str(benchmarks_dir / "Set5"), "--max-images", "1", "--device", device]) == 2
        assert "dlsr-eval: error: " in capsys.readouterr().err
    assert ev.main(["", "--data", str(benchmarks_dir / "Set5")]) == 2
    assert "cannot load model ''" in capsys.readouterr().err
    (tmp_path / "tiny").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "tiny" / "t.png")
    assert ev.main(["--bicubic", "--scale", "4", "--data", str(tmp_path / "tiny")]) == 2
    assert f"dlsr-eval: error: {tmp_path / 'tiny' / 't.png'}: " in capsys.readouterr().err


def test_fp32_is_fp32_whatever_the_model_is_set_to_run_in(benchmarks_dir: Path) -> None:
    from dlsr_infer import DLSR
    from dlsr_infer.genotype import builtin

    torch.manual_seed(0)
    model = DLSR(builtin("dlsr_s_x2").replace(channels=8))
    ref = ev.evaluate(model, benchmarks_dir / "Set5", max_images=1)[0]["psnr"]
    model.inference_precision = "bf16"
    during: list[str] = []  # the caller's model is never switched, not even for the call (other threads)
    handle = model.register_forward_pre_hook(lambda m, args: during.append(model.inference_precision))
    assert ev.evaluate(model, benchmarks_dir / "Set5", max_images=1)[0]["psnr"] == ref
    handle.remove()
    assert during == ["bf16"] and model.inference_precision == "bf16"


def test_unreadable_and_16_bit_images_are_clean_errors(tmp_path: Path, capsys) -> None:
    """A file with an image extension that is not one (a macOS ._ file, a truncated PNG) and a 16-bit
    colour PNG (which Pillow would cut to its high bytes) are named errors, exit 2, not tracebacks."""
    from dlsr_infer.imageio import encode_png16

    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    cases = {
        "junk": ("._a.png", b"junk", "cannot read the image"),
        "trunc": ("a.png", None, "cannot read the image"),
        "deep": ("a.png", encode_png16(rgb.astype(np.uint16) * 257), "16-bit or float images"),
    }
    for folder, (name, data, message) in cases.items():
        (tmp_path / folder).mkdir()
        if data is None:
            Image.fromarray(rgb).save(tmp_path / "whole.png")
            data = (tmp_path / "whole.png").read_bytes()[:300]
        (tmp_path / folder / name).write_bytes(data)
        with pytest.raises(ValueError, match=message):
            ev.load_rgb(tmp_path / folder / name)
        assert ev.main(["--bicubic", "--scale", "2", "--data", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert f"dlsr-eval: error: {tmp_path / folder / name}: {message}" in err, err


def test_a_damaged_cache_entry_is_made_again(benchmarks_dir: Path, tmp_path: Path) -> None:
    hr = ev.load_rgb(benchmarks_dir / "Set5" / "HR" / "bird.png")[:96, :96]
    cache = tmp_path / "birdx2.png"
    first = ev.make_lr(hr, 2, cache)
    cache.write_bytes(cache.read_bytes()[:-200])  # cut short: header and digest readable, pixels not
    assert np.array_equal(ev.make_lr(hr, 2, cache), first)
    assert np.array_equal(ev.load_rgb(cache), first)


def test_fp32_protocol_pads_images_under_the_network_minimum(tmp_path: Path) -> None:
    """An HR whose LR is under 15 px was an error on the default fp32 path but scored by --dtype auto."""
    from dlsr_infer.genotype import builtin
    from dlsr_infer.model import DLSR
    from dlsr_infer.upscaling import upscale

    torch.manual_seed(0)
    model = DLSR(builtin("dlsr_s_x2")).eval()
    hr = np.random.default_rng(1).integers(0, 256, (20, 22, 3), dtype=np.uint8)
    (tmp_path / "small").mkdir()
    Image.fromarray(hr).save(tmp_path / "small" / "s.png")
    (row,) = ev.evaluate(model, tmp_path / "small", scale=2, dtype="fp32")
    sr = upscale(ev.make_lr(hr, 2), model=model, dtype="fp32", tile=0)
    assert row["psnr"] == pytest.approx(ev.psnr_y(sr, hr, crop=2), abs=1e-9)
    # cropping the padding away must not hide an output of the wrong size (a model saying x2 but doing x4)
    liar = torch.nn.Upsample(scale_factor=4)
    liar.scale = 2
    with pytest.raises(ValueError, match=r"model output shape \(1, 3, 60, 60\) is not \(1, 3, 30, 30\)"):
        ev.evaluate(liar, tmp_path / "small", scale=2, dtype="fp32")


def test_a_non_finite_output_is_an_error_naming_the_image_not_a_score(tmp_path: Path) -> None:
    """Clamped and rounded, a NaN output scored as a black image: a finite, meaningless PSNR."""
    import torch

    hr = np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    (tmp_path / "set").mkdir()
    Image.fromarray(hr).save(tmp_path / "set" / "n.png")
    nan_model = torch.nn.Upsample(scale_factor=2)
    nan_model.scale = 2
    nan_model.register_forward_hook(lambda m, i, y: y * float("nan"))
    with pytest.raises(ValueError, match=r"n\.png: the model's output is not finite"):
        ev.evaluate(nan_model, tmp_path / "set", scale=2, dtype="fp32")
