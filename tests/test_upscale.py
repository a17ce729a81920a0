"""`upscale()`: every input kind and image mode round-trips with the right type, dtype, size and mode.

All with a small random-weight 18-channel x2 network (weights drawn so its output is image-like, not
clamped flat) on small images; tiling itself is tested in test_tiling.py.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

import dlsr_infer
from dlsr_infer import DLSR
from dlsr_infer.imageio import ColorConversionWarning, encode_png16, load_image
from dlsr_infer.upscaling import LUMA, Upscaler, clear_model_cache, get_model, upscale, upscale_file
from conftest import lively_model

REPO = Path(__file__).resolve().parents[1]


def lively(name: str = "dlsr_s_x2", seed: int = 0) -> DLSR:
    return lively_model(name, seed=seed)


@pytest.fixture(scope="module")
def model() -> DLSR:
    return lively()


def rgb(h: int = 20, w: int = 26, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --- numpy ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("channels", [None, 1, 2, 3, 4])
def test_numpy_round_trips_layout_and_dtype(model: DLSR, dtype, channels) -> None:
    a = rgb(12, 17)
    a = np.dstack([a, a[:, :, :1]]) if channels == 4 else a[:, :, :channels] if channels else a[:, :, 0]
    if dtype == np.uint16:
        a = a.astype(np.uint16) * 257
    elif dtype != np.uint8:
        a = (a / 255.0).astype(dtype)
    out = upscale(a, model=model)
    assert isinstance(out, np.ndarray) and out.dtype == dtype
    assert out.shape == (24, 34) + a.shape[2:]
    if np.issubdtype(dtype, np.floating):
        assert out.min() >= 0 and out.max() <= 1


def test_sixteen_bit_keeps_sixteen_bits(model: DLSR) -> None:
    a16 = rgb(16, 16).astype(np.uint16) * 257 + np.random.default_rng(1).integers(0, 257, (16, 16, 3)).astype(np.uint16)
    out16 = upscale(a16, model=model)
    outf = upscale(a16.astype(np.float64) / 65535, model=model)
    assert out16.dtype == np.uint16
    assert np.abs(out16.astype(np.float64) - outf * 65535).max() <= 1.0  # full 16-bit precision
    assert np.count_nonzero(out16 % 257) > out16.size // 2  # not 8-bit values scaled up


def test_numpy_errors_name_the_problem(model: DLSR) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\].*divide by 255"):
        upscale(np.full((8, 8, 3), 200.0), model=model)
    with pytest.raises(ValueError, match="NaN"):
        upscale(np.full((8, 8, 3), np.nan), model=model)
    with pytest.raises(TypeError, match="dtype bool"):
        upscale(np.zeros((8, 8), bool), model=model)
    with pytest.raises(TypeError, match="int32"):
        upscale(np.zeros((8, 8), np.int32), model=model)
    with pytest.raises(ValueError, match="channels-first"):
        upscale(np.zeros((3, 20, 20), np.uint8), model=model)
    with pytest.raises(ValueError, match="empty"):
        upscale(np.zeros((0, 5, 3), np.uint8), model=model)
    with pytest.raises(TypeError, match="cannot upscale a list"):
        upscale([[0, 1]], model=model)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (14, 3)])
def test_tiny_images_work(model: DLSR, shape) -> None:
    out = upscale(rgb(*shape), model=model)
    assert out.shape == (2 * shape[0], 2 * shape[1], 3)


# --- torch ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_tensor_round_trips_dtype_device_and_layout(model: DLSR, dtype) -> None:
    x = torch.from_numpy(rgb(10, 14)).permute(2, 0, 1)
    x = x.to(dtype) if dtype == torch.uint8 else (x.double() / 255).to(dtype)
    out = upscale(x, model=model)
    assert out.dtype == dtype and out.device == x.device and out.shape == (3, 20, 28)
    batch = torch.stack([x, x.flip(-1)])
    outb = upscale(batch, model=model)
    assert outb.shape == (2, 3, 20, 28) and outb.dtype == dtype
    assert torch.equal(outb[0], out)


def test_tensor_batch_equals_images_one_by_one(model: DLSR) -> None:
    batch = torch.rand(3, 3, 18, 22, generator=torch.Generator().manual_seed(0))
    out = upscale(batch, model=model, tile=16, tile_overlap=0)
    for i in range(3):
        torch.testing.assert_close(out[i], upscale(batch[i], model=model, tile=16, tile_overlap=0), rtol=0, atol=1e-6)


def test_tensor_channels_and_errors(model: DLSR) -> None:
    assert upscale(torch.rand(1, 9, 9), model=model).shape == (1, 18, 18)
    assert upscale(torch.rand(2, 4, 9, 9), model=model).shape == (2, 4, 18, 18)
    with pytest.raises(ValueError, match="channels-last"):
        upscale(torch.rand(9, 9, 3), model=model)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        upscale(torch.rand(3, 9, 9) * 255, model=model)
    with pytest.raises(TypeError, match="floating point"):
        upscale(torch.zeros(3, 9, 9, dtype=torch.int64), model=model)
    with pytest.raises(ValueError, match="C x H x W or N x C x H x W"):
        upscale(torch.rand(9, 9), model=model)


# --- PIL modes -----------------------------------------------------------------------------------
def _pil(mode: str) -> Image.Image:
    a = rgb()
    if mode == "I;16":
        return Image.fromarray(a[:, :, 0].astype(np.uint16) * 257 + 3)
    if mode == "I":
        return Image.fromarray(a[:, :, 0].astype(np.int32) * 200)
    if mode == "P+t":
        im = Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        im.info["transparency"] = 0
        return im
    if mode == "PA":
        return Image.fromarray(a).convert("P").convert("PA")
    return Image.fromarray(a).convert(mode) if mode != "RGBA" else Image.fromarray(np.dstack([a, a[:, :, 1]]))


@pytest.mark.parametrize("mode,expected", [
    ("RGB", "RGB"), ("RGBA", "RGBA"), ("L", "L"), ("LA", "LA"), ("P", "RGB"), ("P+t", "RGBA"), ("PA", "RGBA"),
    ("1", "L"), ("I;16", "I;16"), ("I", "I;16"), ("RGBX", "RGB"), ("YCbCr", "RGB"), ("CMYK", "RGB"),
])
def test_pil_modes(model: DLSR, mode: str, expected: str) -> None:
    im = _pil(mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = upscale(im, model=model)
    assert isinstance(out, Image.Image) and out.mode == expected and out.size == (52, 40)
    converted = [w for w in caught if issubclass(w.category, ColorConversionWarning)]
    assert bool(converted) == (mode == "CMYK"), [str(w.message) for w in caught]


def test_pil_float_mode_is_refused(model: DLSR) -> None:
    with pytest.raises(ValueError, match="mode F"):
        upscale(Image.new("F", (20, 20)), model=model)


def test_gray_runs_as_replicated_rgb_and_comes_back_as_luma(model: DLSR) -> None:
    g = rgb()[:, :, 1]
    out_l = np.asarray(upscale(Image.fromarray(g), model=model)).astype(np.float64)
    out_rgb = upscale(np.repeat(g[:, :, None], 3, axis=2).astype(np.float32) / 255, model=model)
    luma = (out_rgb @ np.array(LUMA)) * 255
    assert np.abs(out_l - luma).max() <= 0.51


def test_alpha_is_upscaled_separately_by_model_or_bicubic(model: DLSR) -> None:
    a = rgb()
    rgba = np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])
    rgba[5:9, 5:15, 3] = 0
    by_model = upscale(rgba, model=model, alpha="model")
    by_bicubic = upscale(rgba, model=model, alpha="bicubic")
    plain = upscale(a, model=model)
    assert np.array_equal(by_model[:, :, :3], plain) and np.array_equal(by_bicubic[:, :, :3], plain)
    alpha = torch.from_numpy(rgba[:, :, 3].astype(np.float32) / 255)[None, None]
    expected = torch.nn.functional.interpolate(alpha, scale_factor=2, mode="bicubic", align_corners=False)
    expected = (expected.clamp(0, 1) * 255).round().to(torch.uint8)[0, 0].numpy()
    assert np.array_equal(by_bicubic[:, :, 3], expected)
    assert by_bicubic[0, 0, 3] == 255 and by_bicubic[14, 20, 3] == 0
    with pytest.raises(ValueError, match="alpha must be"):
        upscale(rgba, model=model, alpha="nearest")


@pytest.mark.parametrize("alpha", ["model", "bicubic"])
def test_output_alpha_stays_within_the_input_alpha_range(model: DLSR, alpha: str) -> None:
    # The network is not exactly flat next to the zero-padded border: before, an opaque image came back
    # with alpha down to ~245 along its edges, and a transparent one with alpha up to ~8.
    a = rgb()
    for value in (255, 0, 128):
        out = upscale(np.dstack([a, np.full(a.shape[:2], value, np.uint8)]), model=model, alpha=alpha)
        assert np.all(out[:, :, 3] == value), (value, np.unique(out[:, :, 3]))
        assert np.array_equal(out[:, :, :3], upscale(a, model=model))
    ramp = np.dstack([a, np.linspace(60, 200, a.shape[1]).round().astype(np.uint8)[None].repeat(a.shape[0], 0)])
    out = upscale(ramp, model=model, alpha=alpha)[:, :, 3]
    assert 60 <= out.min() and out.max() <= 200 and len(np.unique(out)) > 20  # still a ramp, in range
    batch = torch.from_numpy(np.stack([np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]), ramp]))
    out = upscale(batch.permute(0, 3, 1, 2).float() / 255, model=model, alpha=alpha)
    assert torch.all(out[0, 3] == 1.0) and 60 / 255 - 1e-6 <= out[1, 3].min() <= out[1, 3].max() <= 200 / 255 + 1e-6


def test_a_constant_alpha_costs_no_network_pass(model: DLSR) -> None:
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0]))
    try:
        a = rgb()
        upscale(np.dstack([a, np.full(a.shape[:2], 255, np.uint8)]), model=model, alpha="model", tile=0)
        assert seen == [1]
        seen.clear()
        upscale(np.dstack([a, a[:, :, :1]]), model=model, alpha="model", tile=0)
        assert sum(seen) == 2  # colour and alpha
    finally:
        handle.remove()


# --- paths ---------------------------------------------------------------------------------------
def test_path_in_pil_out_with_icc_and_exif_orientation(model: DLSR, tmp_path: Path) -> None:
    a = rgb(20, 30)
    icc = srgb_icc()
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to view
    exif[0x010F] = "dlsr test camera"
    im.save(tmp_path / "in.png", exif=exif.tobytes(), icc_profile=icc)
    out = upscale(tmp_path / "in.png", model=model)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.size == (40, 60)  # upright: 20 wide, 30 tall, x2
    assert np.array_equal(np.asarray(out), upscale(np.rot90(a, k=-1).copy(), model=model))
    assert out.info["icc_profile"] == icc
    assert 0x0112 not in out.getexif() and out.getexif()[0x010F] == "dlsr test camera"


def test_sixteen_bit_colour_path_comes_back_as_uint16(model: DLSR, tmp_path: Path) -> None:
    a16 = np.random.default_rng(2).integers(0, 65536, (12, 15, 3), dtype=np.uint16)
    (tmp_path / "c16.png").write_bytes(encode_png16(a16))
    out = upscale(str(tmp_path / "c16.png"), model=model)
    assert isinstance(out, np.ndarray) and out.dtype == np.uint16
    assert np.array_equal(out, upscale(a16, model=model))
    Image.fromarray(a16[:, :, 0]).save(tmp_path / "g16.png")  # gray 16-bit: PIL I;16 out
    out = upscale(tmp_path / "g16.png", model=model)
    assert out.mode == "I;16" and out.size == (30, 24)
    # the same colour file opened by Pillow: a PIL image in, a PIL image out (rounded to 8 bits), not
    # "PIL has no 16-bit RGB mode" after the whole network had run
    from dlsr_infer.imageio import to_8bit

    with Image.open(tmp_path / "c16.png") as im:
        out = upscale(im, model=model)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (30, 24)
    assert np.array_equal(np.asarray(out), to_8bit(upscale(a16, model=model)))


def test_upscale_file_keeps_depth_alpha_and_icc(model: DLSR, tmp_path: Path) -> None:
    a16 = np.random.default_rng(3).integers(0, 65536, (10, 11, 4), dtype=np.uint16)
    icc = srgb_icc()
    (tmp_path / "in.png").write_bytes(encode_png16(a16, icc_profile=icc))
    notes = upscale_file(tmp_path / "in.png", tmp_path / "out.png", model=model)
    assert notes == []
    back = load_image(tmp_path / "out.png")
    assert back.pixels.dtype == np.uint16 and back.pixels.shape == (20, 22, 4) and back.icc_profile == icc
    assert np.array_equal(back.pixels, upscale(a16, model=model))
    with pytest.raises(FileExistsError, match="already exists"):
        upscale_file(tmp_path / "in.png", tmp_path / "out.png", model=model)


def test_upscale_file_checks_the_destination_before_running_the_network(model: DLSR, tmp_path: Path) -> None:
    Image.fromarray(rgb()).save(tmp_path / "in.png")
    seen: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, args: seen.append(1))
    try:
        with pytest.raises(ValueError, match="cannot tell the output format from 'out.xyz'"):
            upscale_file(tmp_path / "in.png", tmp_path / "out.xyz", model=model)
        with pytest.raises(FileNotFoundError, match="the folder .*no/such does not exist"):
            upscale_file(tmp_path / "in.png", tmp_path / "no" / "such" / "out.png", model=model)
        before = (tmp_path / "in.png").read_bytes()
        for path in (tmp_path / "in.png", tmp_path / "." / "in.png"):
            with pytest.raises(ValueError, match="is the source image"):
                upscale_file(tmp_path / "in.png", path, model=model, overwrite=True)
        assert (tmp_path / "in.png").read_bytes() == before
        for quality in (1000, 0, "95", 95.0, True):  # Pillow wrote JPEG q=1000 silently, failed late for WebP
            for ext in ("jpg", "webp"):
                with pytest.raises(ValueError, match="quality must be an integer from 1 to 100"):
                    upscale_file(tmp_path / "in.png", tmp_path / f"out.{ext}", model=model, quality=quality)
        assert seen == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]
    finally:
        handle.remove()


def test_a_model_in_reduced_precision_is_refused_by_name(model: DLSR) -> None:
    """upscale() reduces precision through dtype=; half/bf16/double weights gave a raw torch error."""
    import copy

    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        with pytest.raises(TypeError, match=f"the model's weights are {dtype}; upscale.. needs float32 weights"):
            upscale(rgb(), model=copy.deepcopy(model).to(dtype), dtype="fp32")


def test_path_errors_are_specific(model: DLSR, tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        upscale(tmp_path / "empty.png", model=model)
    Image.fromarray(rgb(40, 40)).save(tmp_path / "big.png")
    with pytest.raises(ValueError, match="over the limit of 1,000"):
        upscale(tmp_path / "big.png", model=model, max_pixels=1000)


# --- models --------------------------------------------------------------------------------------
def test_model_scale_is_checked(model: DLSR) -> None:
    with pytest.raises(ValueError, match="upscales x2 but scale=4"):
        upscale(rgb(), scale=4, model=model)
    assert upscale(rgb(), scale=2, model=model).shape == (40, 52, 3)
    with pytest.raises(TypeError, match="model must be"):
        upscale(rgb(), model=42)  # type: ignore[arg-type]
    for scale in (1, 5):  # no bundled model: said as such, not "no model directory at 'x5'"
        with pytest.raises(ValueError, match=f"no bundled model upscales by {scale}: they are x2, x3 and x4"):
            upscale(rgb(), scale=scale)


def test_auto_dtype_on_cpu_is_bf16_only_where_native_and_parity_holds(monkeypatch) -> None:
    """dtype='auto' on CPU: bf16 where the CPU has native bf16 and the model passes the parity probe
    (about 2x faster), fp32 otherwise; 'fp32' always gives the exact float32 result."""
    from dlsr_infer import fast

    net = lively()
    x = rgb(40, 44).astype(np.float32) / 255.0
    exact = upscale(x, model=net, device="cpu", dtype="fp32", tile=0)
    with torch.inference_mode():
        ref = net(torch.from_numpy(x).permute(2, 0, 1)[None]).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    assert np.abs(exact - ref).max() <= 1e-6
    native = fast.bf16_native()
    auto = Upscaler(net, device="cpu")
    assert auto.compute_dtype == (torch.bfloat16 if native else torch.float32)
    out = upscale(x, model=net, device="cpu", tile=0)
    if native:  # bf16 really ran (not bit-equal to fp32), and stays close: > 40 dB on [0, 1]
        err = float(np.mean((out - exact) ** 2))
        assert 0.0 < err < 1e-4, err
    else:
        assert np.array_equal(out, exact)
    assert Upscaler(net, device="cpu", compile=True).compute_dtype == torch.float32  # only eager bf16 is tested
    assert Upscaler(net, device="cpu", dtype="fp32").compute_dtype == torch.float32

    fast.bf16_native.cache_clear()
    monkeypatch.setenv("DLSR_BF16", "0")  # a CPU without native bf16
    assert Upscaler(net, device="cpu").compute_dtype == torch.float32
    monkeypatch.undo()
    fast.bf16_native.cache_clear()
    monkeypatch.setattr(fast, "BF16_MIN_PSNR", 500.0)  # bf16 fails the parity probe for this model
    fast.invalidate(net)
    with pytest.warns(RuntimeWarning, match="using fp32"):
        assert Upscaler(net, device="cpu").compute_dtype == torch.float32
    fast.invalidate(net)
    monkeypatch.undo()
    # a model that will run its layers, not the probed fused form: fp32, wherever bf16 is native
    monkeypatch.setattr(fast, "bf16_native", lambda: True)
    plain = lively()
    plain.fast_inference = False
    hooked = lively()
    hooked.cells[0].register_forward_hook(lambda *a: None)
    for other in (plain, hooked):
        assert Upscaler(other, device="cpu").compute_dtype == torch.float32


def test_device_and_dtype_choices() -> None:
    from dlsr_infer.upscaling import resolve_device, resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 inference needs CUDA"):
        resolve_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int8", cpu)
    with pytest.raises(ValueError, match="holds no data"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        assert resolve_dtype("auto", resolve_device("auto")) == torch.float32
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_on_cpu_when_asked(model: DLSR) -> None:
    a = rgb()
    out = upscale(a, model=model, dtype="bf16")
    ref = upscale(a, model=model, dtype="fp32")  # (the default is bf16 itself on a CPU with native bf16)
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert out.shape == ref.shape and diff.any() and diff.mean() < 0.5 and diff.max() <= 3


def test_models_loaded_by_name_are_cached(model: DLSR, tmp_path: Path, monkeypatch) -> None:
    clear_model_cache()
    model.save_pretrained(tmp_path / "m")
    loads = []
    original = DLSR.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(DLSR, "from_pretrained", classmethod(counting))
    a = rgb()
    first = upscale(a, model=tmp_path / "m")
    second = upscale(a, model=str(tmp_path / "m"))
    assert len(loads) == 1 and np.array_equal(first, second) and np.array_equal(first, upscale(a, model=model))
    assert get_model(tmp_path / "m", device="cpu")[0] is get_model(str(tmp_path / "m"), device="cpu")[0]
    # The dtype is only the autocast around the model: one cached copy serves every dtype.
    assert get_model(tmp_path / "m", device="cpu", dtype="bf16")[0] is get_model(tmp_path / "m", device="cpu")[0]
    upscale(a, model=tmp_path / "m", dtype="bf16")
    assert len(loads) == 1
    get_model(tmp_path / "m", device="cpu", channels_last=True)  # another memory format is another copy
    assert len(loads) == 2
    # New weights under the same name are picked up, even copied in with the old file's size and mtime
    # (cp -p, rsync -t, tar), and replace the old entry rather than adding one per rewrite
    import dlsr_infer.upscaling as up

    st = (tmp_path / "m" / "model.safetensors").stat()
    lively(seed=1).save_pretrained(tmp_path / "m")
    os.utime(tmp_path / "m" / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (tmp_path / "m" / "model.safetensors").stat().st_size == st.st_size
    second = upscale(a, model=tmp_path / "m")
    assert not np.array_equal(second, first) and len(loads) == 3
    lively(seed=2).save_pretrained(tmp_path / "m")
    assert not np.array_equal(upscale(a, model=tmp_path / "m"), second) and len(loads) == 4
    assert len(up._CACHE) == 2  # this directory in two memory formats, each once
    clear_model_cache()


def test_fp32_is_exact_float32_for_a_model_set_to_run_in_bf16(model: DLSR) -> None:
    """dtype='fp32' promises the exact float32 result: a model whose inference_precision is 'bf16' ran
    its bf16 form there (TileStats still said fp32)."""
    a = rgb()
    ref = upscale(a, model=model, dtype="fp32")
    model.inference_precision = "bf16"
    try:
        up = Upscaler(model, device="cpu", dtype="fp32")
        assert np.array_equal(up(a), ref) and up.last_stats.compute_dtype == torch.float32
        assert not np.array_equal(upscale(a, model=model, dtype="bf16"), ref)  # (so the check above can fail)
    finally:
        model.inference_precision = "fp32"


def test_a_passed_model_is_left_alone(model: DLSR) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    upscale(rgb(), model=model, channels_last=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)
    assert next(model.parameters()).device.type == "cpu"


def test_a_model_passed_with_compile_is_freed_with_it() -> None:
    import copy
    import gc
    import pickle
    import weakref

    net = lively()
    run, eager, _ = get_model(net, device="cpu", compile=True)
    assert eager is net and run is not net and get_model(net, device="cpu", compile=True)[0] is run  # made once
    assert "_dlsr_compiled" not in "".join(net.state_dict())
    twin = copy.deepcopy(net)  # a copy (or a pickle) starts without the compiled forms
    assert get_model(twin, device="cpu", compile=True)[0] is not run
    assert isinstance(pickle.loads(pickle.dumps(net)), DLSR)
    alive = weakref.ref(net)
    del net, run, eager, twin
    gc.collect()
    assert alive() is None  # before, a process-wide table of compiled forms kept every such model


def test_progress_callback_and_upscaler_reuse(model: DLSR) -> None:
    calls = []
    up = Upscaler(model, tile=40, tile_overlap=8, progress=lambda done, total: calls.append((done, total)))
    out = up(rgb(60, 70))
    assert out.shape == (120, 140, 3)
    assert calls and calls[-1][0] == calls[-1][1] == up.last_stats.num_tiles > 1
    assert up(torch.rand(3, 20, 20)).shape == (3, 40, 40)


def test_upscale_name_is_the_function_in_any_import_order() -> None:
    code = ("import dlsr_infer.upscaling as m, dlsr_infer; from dlsr_infer import upscale as f; "
            "import types; assert f is m.upscale and dlsr_infer.upscale is m.upscale; "
            "assert not isinstance(f, types.ModuleType); print('ok')")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    assert callable(dlsr_infer.upscale)


def test_cuda_auto_dtype_is_fp16_only_for_big_passes(model: DLSR, monkeypatch) -> None:
    """dtype='auto' on CUDA: fp32 below CUDA_FP16_MIN_PIXELS LR pixels per pass (fp16 measured slower
    there), fp16 from it; `pass_pixels` is the biggest pass run_tiled really makes."""
    from dlsr_infer import tiling
    from dlsr_infer.upscaling import CUDA_FP16_MIN_PIXELS, cuda_auto_dtype

    f16, f32 = torch.float16, torch.float32
    assert cuda_auto_dtype(CUDA_FP16_MIN_PIXELS) == f16 and cuda_auto_dtype(CUDA_FP16_MIN_PIXELS - 1) == f32
    whole = dict(tile=0, overlap=8, align=4)
    assert cuda_auto_dtype(tiling.pass_pixels(180, 320, **whole)) == f32  # x4 720p: measured slower in fp16
    assert cuda_auto_dtype(tiling.pass_pixels(240, 427, **whole)) == f32  # x3 720p: likewise
    assert cuda_auto_dtype(tiling.pass_pixels(360, 640, **whole)) == f16  # x2 720p: measured faster
    assert cuda_auto_dtype(tiling.pass_pixels(200, 200, **whole, count=4, batch_size=4)) == f16  # 4 images a pass
    assert cuda_auto_dtype(tiling.pass_pixels(200, 200, **whole, count=4, batch_size=1)) == f32

    # the rule's pass size is the biggest batch of tiles run_tiled hands the network, whatever the layout
    seen: list[int] = []
    real = tiling.Runner.__call__
    monkeypatch.setattr(tiling.Runner, "__call__", lambda self, x, stats: seen.append(x.shape[0] * x.shape[2] * x.shape[3])
                        or real(self, x, stats))
    align = tiling.context_alignment(model)
    for h, w, n, tile, batch in ((60, 90, 1, 32, 8), (70, 50, 2, 24, 3), (10, 13, 3, 0, 2), (90, 40, 1, 40, 1),
                                 (33, 120, 2, 48, 4)):
        seen.clear()
        tiling.run_tiled(model, torch.rand(n, 3, h, w), scale=2, tile=tile, overlap=6, batch_size=batch)
        assert max(seen) == tiling.pass_pixels(h, w, tile=tile, overlap=6, align=align, count=n, batch_size=batch)


def test_auto_by_size_runs_the_tiles_in_the_dtype_the_size_picks(model: DLSR, monkeypatch) -> None:
    """The plumbing of CUDA's 'auto', run on the CPU: the dtype picked for the pass is the one the tiles
    run in, and TileStats says which."""
    import dlsr_infer.upscaling as up

    x = torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(3))
    rows: dict = {}

    def run(auto_by_size: bool, dtype: torch.dtype):
        out = torch.zeros(1, 3, 40, 48)
        def write(r0: int, r1: int, band: torch.Tensor) -> None:
            out[:, :, r0:r1] = band
        stats = up._super_resolve(x, write, model=model, eager=model, scale=2, tile=0, tile_overlap=None,
                                  batch_size=1, device=torch.device("cpu"), compute_dtype=dtype,
                                  channels_last=False, alpha="model", progress=None, auto_by_size=auto_by_size)
        return out, stats

    exact, stats = run(False, torch.float32)
    assert stats.compute_dtype == torch.float32
    small, stats = run(True, torch.bfloat16)  # 480 LR pixels: far below the threshold, so exact fp32
    assert stats.compute_dtype == torch.float32 and torch.equal(small, exact)
    monkeypatch.setattr(up, "cuda_auto_dtype", lambda *a, **k: torch.bfloat16)  # as a big pass would get fp16
    low, stats = run(True, torch.bfloat16)
    assert stats.compute_dtype == torch.bfloat16 and not torch.equal(low, exact)
    assert Upscaler(model, device="cpu").auto_by_size is False  # only CUDA decides by size


# --- CUDA (run where there is a GPU; skipped elsewhere) ---------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
def test_cuda_tensor_batch_fp16_round_trip(model: DLSR) -> None:
    x = torch.rand(3, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    ref = upscale(x, model=model, device="cpu", dtype="fp32")
    out = upscale(x.cuda().half(), model=model, tile=24, tile_overlap=8, dtype="fp16")  # channels_last by default
    assert out.device.type == "cuda" and out.dtype == torch.float16 and out.shape == (3, 3, 80, 100)
    assert 10 * math.log10(1 / float(((out.float().cpu() - ref) ** 2).mean())) > 40  # fp16, tiles of 24 + 8
    assert next(model.parameters()).device.type == "cpu"  # the CPU model was copied, not moved


@pytest.mark.cuda
@cuda
def test_cuda_auto_runs_small_images_in_fp32_and_big_ones_in_fp16(model: DLSR) -> None:
    a = rgb(30, 40)
    up = Upscaler(model, device="cuda")
    assert up.auto_by_size and np.array_equal(up(a), upscale(a, model=model, device="cuda", dtype="fp32"))
    assert up.last_stats.compute_dtype == torch.float32
    up(rgb(400, 400))
    assert up.last_stats.compute_dtype == torch.float16


@pytest.mark.cuda
@cuda
def test_cuda_fp32_matches_cpu(model: DLSR) -> None:
    a = rgb(30, 40)
    gpu = upscale(a, model=model, device="cuda", dtype="fp32")
    cpu = upscale(a, model=model, device="cpu", dtype="fp32")
    assert np.abs(gpu.astype(int) - cpu.astype(int)).max() <= 1
    # in float: IEEE fp32 on both (TF32 convolutions, torch's default on Ampere and later, err ~1e-3)
    f = a.astype(np.float32) / 255
    gpu_f = upscale(f, model=model, device="cuda", dtype="fp32", tile=0)
    cpu_f = upscale(f, model=model, device="cpu", dtype="fp32", tile=0)
    assert np.abs(gpu_f - cpu_f).max() < 1e-4
