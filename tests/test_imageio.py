"""Image files in and out (`dlsr_infer.imageio`): modes, 16 bits, EXIF, ICC, bad files, atomic writes."""
from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from dlsr_infer import imageio
from dlsr_infer.imageio import (ColorConversionWarning, ImageData, ImageLoadError, ImageTooLargeError,
                                OutputExistsError, atomic_write, encode_png16, format_for, from_pil, load_image,
                                save_image)


def rgb(h: int = 18, w: int = 23, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


# --- 16 bits ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_sixteen_bit_png_round_trips_exactly(tmp_path: Path, channels: int) -> None:
    a = np.random.default_rng(channels).integers(0, 65536, (31, 45, channels), dtype=np.uint16)
    icc = srgb_icc()
    (tmp_path / "a.png").write_bytes(encode_png16(a, icc_profile=icc))
    back = load_image(tmp_path / "a.png")
    assert back.pixels.dtype == np.uint16 and np.array_equal(back.pixels, a) and back.icc_profile == icc
    # An independent decoder agrees: Pillow reads our file (8-bit high bytes for colour, I;16 for gray).
    with Image.open(tmp_path / "a.png") as im:
        im.load()
        px = np.asarray(im)
        if channels == 1:
            assert np.array_equal(px, a[:, :, 0])
        elif channels in (3, 4):
            assert np.array_equal(px, (a >> 8).astype(np.uint8))
        assert im.info.get("icc_profile") == icc


def test_pillow_written_sixteen_bit_gray_and_save_back(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 65536, (20, 21), dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    data = load_image(tmp_path / "g.png")
    assert data.mode == "L" and data.bits == 16 and np.array_equal(data.pixels[:, :, 0], a)
    save_image(data, tmp_path / "g2.png")
    assert np.array_equal(load_image(tmp_path / "g2.png").pixels, data.pixels)
    save_image(data, tmp_path / "g2.tif")
    assert np.array_equal(load_image(tmp_path / "g2.tif").pixels, data.pixels)


def test_formats_that_cannot_hold_it_say_so(tmp_path: Path) -> None:
    rgba16 = ImageData(np.full((8, 8, 4), 40000, np.uint16))
    with pytest.warns(ColorConversionWarning) as caught:
        notes = save_image(rgba16, tmp_path / "x.jpg")
    assert any("8 bits" in n for n in notes) and any("alpha dropped" in n for n in notes)
    assert len(caught) == 2
    back = load_image(tmp_path / "x.jpg")
    assert back.mode == "RGB" and back.bits == 8 and abs(int(back.pixels[0, 0, 0]) - 155) <= 2


# --- modes, EXIF, ICC -------------------------------------------------------------------------------
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillows_exif_transpose(tmp_path: Path, orientation: int) -> None:
    im = Image.fromarray(rgb(10, 17))
    exif = im.getexif()
    exif[0x0112] = orientation
    exif[0x013B] = "dlsr test artist"  # so that some EXIF stays to be checked
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    data = load_image(tmp_path / "o.png")
    with Image.open(tmp_path / "o.png") as ref:
        expected = np.asarray(ImageOps.exif_transpose(ref))
    assert np.array_equal(data.pixels, expected)
    remaining = Image.Exif()  # the orientation tag is gone (the pixels are upright now), the rest kept
    remaining.load(data.exif)
    assert 0x0112 not in remaining and remaining[0x013B] == "dlsr test artist"


def test_exif_orientation_also_applies_to_pil_inputs_and_jpeg(tmp_path: Path) -> None:
    im = Image.fromarray(rgb(10, 17))
    exif = im.getexif()
    exif[0x0112] = 8
    im.save(tmp_path / "o.jpg", exif=exif.tobytes(), quality=95)
    with Image.open(tmp_path / "o.jpg") as opened:
        data = from_pil(opened)
        expected = np.asarray(ImageOps.exif_transpose(opened))
    assert data.pixels.shape == (17, 10, 3) and np.array_equal(data.pixels, expected)


def test_icc_profile_survives_png_jpeg_webp_tiff(tmp_path: Path) -> None:
    icc = srgb_icc()
    Image.fromarray(rgb()).save(tmp_path / "in.png", icc_profile=icc)
    data = load_image(tmp_path / "in.png")
    assert data.icc_profile == icc
    for ext in ("png", "jpg", "webp", "tiff"):
        save_image(data, tmp_path / f"out.{ext}")
        assert load_image(tmp_path / f"out.{ext}").icc_profile == icc, ext


@pytest.mark.parametrize("mode,expected", [("P", "RGB"), ("1", "L"), ("LA", "LA"), ("RGBA", "RGBA"), ("L", "L")])
def test_modes_normalise(mode: str, expected: str) -> None:
    im = Image.fromarray(rgb()).convert(mode)
    assert from_pil(im).mode == expected


def test_palette_with_transparency_becomes_rgba(tmp_path: Path) -> None:
    im = Image.fromarray(rgb()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    im.save(tmp_path / "t.png", transparency=0)
    data = load_image(tmp_path / "t.png")
    assert data.mode == "RGBA" and 0 in data.pixels[:, :, 3] and 255 in data.pixels[:, :, 3]


def _with_trns(png: bytes, body: bytes) -> bytes:
    """`png` with a tRNS chunk put before its first IDAT."""
    at = png.index(b"IDAT") - 4
    return png[:at] + struct.pack(">I", len(body)) + b"tRNS" + body \
        + struct.pack(">I", zlib.crc32(b"tRNS" + body)) + png[at:]


def test_a_png_colour_key_becomes_alpha(tmp_path: Path) -> None:
    # Gray and RGB PNGs can mark one value transparent (tRNS); that used to be dropped without a note.
    a = rgb()
    a[2:4, 5:9] = (10, 20, 30)
    Image.fromarray(a).save(tmp_path / "rgb.png", transparency=(10, 20, 30))
    data = load_image(tmp_path / "rgb.png")
    assert data.mode == "RGBA" and np.array_equal(data.pixels[:, :, :3], a)
    assert np.array_equal(data.pixels[:, :, 3] == 0, np.all(a == (10, 20, 30), axis=2))
    assert set(np.unique(data.pixels[:, :, 3])) == {0, 255}
    g = a[:, :, 0]
    Image.fromarray(g).save(tmp_path / "l.png", transparency=10)
    data = load_image(tmp_path / "l.png")
    assert data.mode == "LA" and np.array_equal(data.pixels[:, :, 1] == 0, g == 10)
    assert from_pil(Image.open(tmp_path / "rgb.png")).mode == "RGBA"
    a16 = np.random.default_rng(1).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    a16[1, 2] = a16[4, 5] = (1000, 2000, 3000)
    (tmp_path / "c16.png").write_bytes(_with_trns(encode_png16(a16), struct.pack(">HHH", 1000, 2000, 3000)))
    data = load_image(tmp_path / "c16.png")
    assert data.mode == "RGBA" and data.pixels.dtype == np.uint16 and np.array_equal(data.pixels[:, :, :3], a16)
    assert np.array_equal(np.argwhere(data.pixels[:, :, 3] == 0), [[1, 2], [4, 5]])
    assert np.all(data.pixels[:, :, 3][data.pixels[:, :, 3] != 0] == 65535)
    g16 = a16[:, :, :1].copy()
    (tmp_path / "g16.png").write_bytes(_with_trns(encode_png16(g16), struct.pack(">H", 1000)))
    data = load_image(tmp_path / "g16.png")
    assert data.mode == "LA" and data.pixels.dtype == np.uint16
    assert np.array_equal(data.pixels[:, :, 1] == 0, g16[:, :, 0] == 1000)


def _gray_png(samples: np.ndarray, bits: int, key: int) -> bytes:
    """A gray PNG (colour type 0) of `bits` per sample, from H x W raw samples, with tRNS colour key `key`."""
    h, w = samples.shape
    per_byte = 8 // bits
    padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
    padded[:, :w] = samples
    packed = np.zeros((h, padded.shape[1] // per_byte), np.uint8)
    for j in range(per_byte):  # the first pixel in the high bits
        packed |= padded[:, j::per_byte] << (8 - bits * (j + 1))
    raw = np.concatenate([np.zeros((h, 1), np.uint8), packed], axis=1).tobytes()  # filter 0 on every row

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, 0, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">H", key)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("bits,key", [(1, 0), (1, 1), (2, 2), (4, 11), (8, 184)])
def test_a_low_bit_gray_pngs_colour_key_becomes_alpha(tmp_path: Path, bits: int, key: int) -> None:
    # A 1-bit gray PNG (Pillow mode 1) skipped the colour-key step, and a 2/4-bit one's key (raw samples:
    # 0..3, 0..15) was compared with the pixels scaled to 8 bits (x85, x17), so it never matched.
    samples = np.random.default_rng(bits).integers(0, 2 ** bits, (9, 13)).astype(np.uint8)
    samples[0, :2] = key, (key + 1) % 2 ** bits  # both kinds present
    (tmp_path / "g.png").write_bytes(_gray_png(samples, bits, key))
    gray = samples * (255 // (2 ** bits - 1))
    expected_alpha = np.where(samples == key, 0, 255).astype(np.uint8)
    with Image.open(tmp_path / "g.png") as im:
        pillow = np.asarray(im.convert("LA"))
    assert np.array_equal(pillow[:, :, 0], gray)  # the file is what we meant
    if bits in (1, 8):  # Pillow gets the alpha right here (and wrong for 2 and 4 bits)
        assert np.array_equal(pillow[:, :, 1], expected_alpha)
    for data in (load_image(tmp_path / "g.png"), from_pil(Image.open(tmp_path / "g.png"))):
        assert data.mode == "LA" and data.bits == 8
        assert np.array_equal(data.pixels[:, :, 0], gray) and np.array_equal(data.pixels[:, :, 1], expected_alpha)


@pytest.mark.parametrize("channels", [2, 3, 4])
def test_from_pil_reads_a_sixteen_bit_colour_png_as_load_image_does(tmp_path: Path, channels: int) -> None:
    # from_pil(Image.open("rgb16.png")) kept Pillow's high bytes without the note and warning load_image gives.
    a = np.random.default_rng(channels).integers(0, 65536, (7, 9, channels), dtype=np.uint16)
    (tmp_path / "c.png").write_bytes(encode_png16(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with Image.open(tmp_path / "c.png") as im:  # lazy, from a file name: decoded from the file
            data = from_pil(im)
    assert data.pixels.dtype == np.uint16 and np.array_equal(data.pixels, a) and not data.notes
    assert np.array_equal(data.pixels, load_image(tmp_path / "c.png").pixels)
    # No file name to decode from: Pillow's 8 bits, said as load_image says it.
    with pytest.warns(ColorConversionWarning, match="16-bit PNG .* to 8 bits"):
        data = from_pil(Image.open(io.BytesIO((tmp_path / "c.png").read_bytes())))
    high = (a >> 8).astype(np.uint8)  # Pillow 13 decodes 16-bit LA as RGBA: compare the first and last channels
    assert data.bits == 8 and np.array_equal(data.pixels[:, :, [0, -1]], high[:, :, [0, -1]])
    assert any("8 bits" in n for n in data.notes)
    Image.fromarray(rgb()).save(tmp_path / "rgb8.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = from_pil(Image.open(tmp_path / "rgb8.png"))
    assert data.bits == 8 and np.array_equal(data.pixels, rgb()) and not data.notes
    # the file replaced by another image since it was opened: refused, never another file's pixels
    with Image.open(tmp_path / "c.png") as im:
        (tmp_path / "c.png").write_bytes(encode_png16(np.zeros((5, 4, channels), np.uint16)))
        with pytest.raises(ImageLoadError, match=r"c.png: the file changed since it was opened \(4x5, not 9x7\)"):
            from_pil(im)


def test_a_tiffs_layout_tags_are_not_carried_as_exif(tmp_path: Path) -> None:
    # A TIFF's getexif() is its whole first IFD, size and strip offsets included: carried to a TIFF output
    # they made Pillow fail ("codec configuration error"), and in a PNG/JPEG they gave the source's size.
    im = Image.fromarray(rgb())
    exif = im.getexif()
    exif[0x013B] = "dlsr test artist"
    exif[0x0112] = 6
    im.save(tmp_path / "in.tif", exif=exif, compression="tiff_lzw")
    data = load_image(tmp_path / "in.tif")
    assert data.pixels.shape == (23, 18, 3)  # orientation applied
    big = ImageData(np.repeat(np.repeat(data.pixels, 2, 0), 2, 1), exif=data.exif, icc_profile=data.icc_profile)
    for ext in ("tif", "png", "jpg"):
        save_image(big, tmp_path / f"out.{ext}")
        with Image.open(tmp_path / f"out.{ext}") as back:
            tags = back.getexif()
            assert back.size == (36, 46) and tags[0x013B] == "dlsr test artist" and 0x0112 not in tags, ext
            if ext != "tif":  # a TIFF writes its own, right, layout tags
                assert 0x100 not in tags and 0x111 not in tags, ext


def test_only_descriptive_tags_travel_so_nothing_rotates_twice_or_keeps_a_wrong_profile(tmp_path: Path) -> None:
    """A TIFF's first IFD also holds XMP (with an orientation of its own: the upright output was rotated
    again by viewers), an ICC profile (the source's, kept after a CMYK conversion dropped it) and
    Photoshop resources (too long for a JPEG's EXIF: the upscaled image could not be saved); and the Exif
    IFD gave the source's pixel size. Only what describes the picture stays."""
    im = Image.fromarray(rgb())
    exif = im.getexif()
    exif[0x013B] = "dlsr test artist"
    exif[0x0112] = 6
    exif[0x02BC] = b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
    exif[0x8773] = b"FAKE-CMYK-PROFILE"
    exif[0x8649] = b"8BIM" * 20000  # 80 KB of Photoshop resources
    im.save(tmp_path / "in.tif", exif=exif)
    data = load_image(tmp_path / "in.tif")
    big = ImageData(np.repeat(np.repeat(data.pixels, 2, 0), 2, 1), exif=data.exif, icc_profile=data.icc_profile)
    for ext in ("tif", "png", "jpg"):
        save_image(big, tmp_path / f"out.{ext}")
        with Image.open(tmp_path / f"out.{ext}") as back:
            tags = back.getexif()
            # (a TIFF keeps its own ICC profile in tag 0x8773: the image's profile, carried as its profile)
            foreign = {0x0112, 0x02BC, 0x8649} | ({0x8773} if ext != "tif" else set())
            assert tags[0x013B] == "dlsr test artist" and not foreign & set(tags), ext
            assert ImageOps.exif_transpose(back).size == back.size == (36, 46), ext
        assert load_image(tmp_path / f"out.{ext}").pixels.shape[:2] == (46, 36), ext
    # the Exif IFD's pixel size is the source's (Pillow writes that IFD to JPEG/PNG/WebP, not to TIFF)
    exif = Image.Exif()
    exif.get_ifd(0x8769).update({0xA002: 18, 0xA003: 23, 0x9003: "2026:11:28 05:00:00"})  # + DateTimeOriginal
    im.save(tmp_path / "in.jpg", exif=exif)
    data = load_image(tmp_path / "in.jpg")
    save_image(ImageData(np.repeat(data.pixels, 2, 0), exif=data.exif), tmp_path / "out2.png")
    with Image.open(tmp_path / "out2.png") as back:
        assert back.getexif().get_ifd(0x8769) == {0x9003: "2026:11:28 05:00:00"}


def test_from_pil_without_applying_the_orientation_keeps_its_tag(tmp_path: Path) -> None:
    im = Image.fromarray(rgb())
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as opened:
        data = from_pil(opened, apply_exif_orientation=False)
    assert data.pixels.shape[:2] == (18, 23)  # as stored
    save_image(data, tmp_path / "back.png")
    with Image.open(tmp_path / "back.png") as back:
        assert back.getexif()[0x0112] == 6 and ImageOps.exif_transpose(back).size == (18, 23)


def test_an_orientation_read_is_applied_even_when_the_exif_cannot_be_copied(tmp_path: Path, monkeypatch) -> None:
    im = Image.fromarray(rgb())
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "o.png", exif=exif.tobytes())

    def broken(self, *args):
        raise SyntaxError("corrupt EXIF")

    monkeypatch.setattr(Image.Exif, "tobytes", broken)
    data = load_image(tmp_path / "o.png")
    assert data.pixels.shape[:2] == (23, 18) and data.exif is None


def test_cmyk_is_converted_with_a_warning(tmp_path: Path) -> None:
    Image.fromarray(rgb()).convert("CMYK").save(tmp_path / "c.jpg")
    with pytest.warns(ColorConversionWarning, match="CMYK image converted to RGB"):
        data = load_image(tmp_path / "c.jpg")
    assert data.mode == "RGB" and any("CMYK" in n for n in data.notes)


def test_animated_gif_reads_the_first_frame_with_a_note(tmp_path: Path) -> None:
    frames = [Image.fromarray(rgb(seed=i)).convert("P") for i in range(3)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    data = load_image(tmp_path / "a.gif")
    assert data.mode == "RGB" and any("first of 3 frames" in n for n in data.notes)


# --- bad files --------------------------------------------------------------------------------------
def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def test_bad_files_get_specific_errors(tmp_path: Path) -> None:
    good = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(good, format="PNG")
    jpeg = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(jpeg, format="JPEG")
    cases = {
        "empty.png": (b"", "empty file"),
        "text.png": (b"hello, I am not a picture\n" * 10, "not an image Pillow can read"),
        "trunc.png": (good.getvalue()[: len(good.getvalue()) // 2], "truncated or corrupt"),
        "trunc.jpg": (jpeg.getvalue()[:300], "truncated or corrupt"),
    }
    for name, (blob, message) in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ImageLoadError, match=message):
            load_image(tmp_path / name)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    (tmp_path / "bomb.png").write_bytes(_png_header_only(60000, 60000))  # 3.6 G pixels, a few bytes
    with pytest.raises(ImageTooLargeError, match="60000x60000 = 3,600,000,000 pixels is over the limit"):
        load_image(tmp_path / "bomb.png")
    Image.fromarray(rgb(50, 50)).save(tmp_path / "ok.png")
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        load_image(tmp_path / "ok.png", max_pixels=2499)
    assert load_image(tmp_path / "ok.png", max_pixels=2500).pixels.shape == (50, 50, 3)
    assert Image.MAX_IMAGE_PIXELS is not None  # PIL's own guard is restored after our open


def test_pils_own_bomb_check_at_decode_time_does_not_undo_max_pixels(tmp_path: Path, monkeypatch) -> None:
    """TIFF runs PIL's bomb check again when decoding: an image max_pixels lets through (raised, or None)
    crashed with PIL's DecompressionBombError, a traceback in dlsr-upscale, the other inputs never done."""
    a = rgb(40, 40)
    Image.fromarray(a).save(tmp_path / "big.tif")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,600 px: over twice PIL's limit, an error there
    with pytest.raises(Image.DecompressionBombError):
        with Image.open(tmp_path / "big.tif") as im:
            im.load()
    np.testing.assert_array_equal(load_image(tmp_path / "big.tif", max_pixels=None).pixels, a)
    np.testing.assert_array_equal(load_image(tmp_path / "big.tif", max_pixels=1600).pixels, a)
    with pytest.raises(ImageTooLargeError):
        load_image(tmp_path / "big.tif", max_pixels=1599)
    assert Image.MAX_IMAGE_PIXELS == 500  # restored


def test_postscript_is_never_opened(tmp_path: Path) -> None:
    """A PostScript file named .png was handed to Pillow's EPS reader (which runs Ghostscript when it is
    installed: untrusted PostScript) and failed with 'Unable to locate Ghostscript'; other formats Pillow
    reads (a misnamed JPEG, ICO, PCX, ...) still load."""
    from dlsr_infer.evaluate import load_rgb

    (tmp_path / "x.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageLoadError, match="not an image Pillow can read"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="cannot read the image .*UnidentifiedImageError"):
        load_rgb(tmp_path / "x.png")  # dlsr-eval's and the trainer's loader too
    Image.fromarray(rgb()).save(tmp_path / "really_a_jpeg.png", format="JPEG")
    Image.fromarray(rgb()).save(tmp_path / "a.ico", format="ICO")
    Image.fromarray(rgb()).save(tmp_path / "a.pcx", format="PCX")
    for name in ("really_a_jpeg.png", "a.ico", "a.pcx"):
        assert load_image(tmp_path / name).pixels.shape[2] in (3, 4), name


def test_formats_that_cannot_hold_the_profile_or_exif_say_so(tmp_path: Path) -> None:
    data = ImageData(rgb(), icc_profile=ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes(),
                     exif=_exif_with_artist())
    with pytest.warns(ColorConversionWarning):
        notes = save_image(data, tmp_path / "out.bmp")
    assert any("BMP cannot hold the ICC colour profile" in n for n in notes)
    assert any("BMP cannot hold EXIF metadata" in n for n in notes)
    assert save_image(data, tmp_path / "out.png") == []


def _exif_with_artist() -> bytes:
    exif = Image.Exif()
    exif[0x013B] = "dlsr test artist"
    return exif.tobytes()


# --- writing ------------------------------------------------------------------------------------------
def test_atomic_write_never_leaves_a_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.png"

    def write_then_fail(f) -> None:
        f.write(b"\x89PNG half of an image")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write_then_fail)
    assert list(tmp_path.iterdir()) == []

    def write_then_interrupt(f) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, write_then_interrupt, overwrite=True)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_atomic_write_all_changes_no_file_unless_every_one_is_whole(tmp_path: Path) -> None:
    """Files that belong together: a failure writing the second leaves the first's old content, no temps."""
    first, second = tmp_path / "a.json", tmp_path / "b.md"
    first.write_bytes(b"old a")

    def fail(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        imageio.atomic_write_all([(first, lambda f: f.write(b"new a")), (second, fail)], overwrite=True)
    assert first.read_bytes() == b"old a" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    done = imageio.atomic_write_all([(first, lambda f: f.write(b"new a")), (second, lambda f: f.write(b"b"))],
                                    overwrite=True)
    assert done == [first, second] and first.read_bytes() == b"new a" and second.read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md"]
    # a rename that fails after another's: the error names what was renamed before it
    (tmp_path / "c").mkdir()
    with pytest.raises(OSError) as err:  # a folder where the second file goes: its rename fails
        imageio.atomic_write_all([(first, lambda f: f.write(b"newer a")), (tmp_path / "c", lambda f: f.write(b"c"))],
                                 overwrite=True)
    assert err.value.committed == [first] and first.read_bytes() == b"newer a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.md", "c"]


@pytest.mark.parametrize("name", ["p" * 251 + ".png", "é" * 125 + ".png"])  # 255 bytes: the longest a name may be
def test_the_longest_valid_output_name_can_be_written_and_its_stale_temp_removed(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    save_image(ImageData(rgb()), target)
    assert load_image(target).pixels.shape == (18, 23, 3) and [p.name for p in tmp_path.iterdir()] == [name]

    def killed(f) -> None:  # a writer killed mid-write leaves its temp file: the cleaner finds it by name
        raise KeyboardInterrupt

    real_unlink = Path.unlink
    try:
        Path.unlink = lambda self, missing_ok=False: None  # (the interrupted writer's own clean-up never ran)
        with pytest.raises(KeyboardInterrupt):
            imageio.atomic_write(target, killed, overwrite=True)
    finally:
        Path.unlink = real_unlink
    (stale,) = [p for p in tmp_path.iterdir() if p.name != name]
    assert len(os.fsencode(stale.name)) <= 255
    os.utime(stale, (0, 0))
    assert imageio.remove_stale_temps(tmp_path, [name]) == [stale] and [p.name for p in tmp_path.iterdir()] == [name]


def test_atomic_write_refuses_to_clobber_and_sets_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    atomic_write(target, lambda f: f.write(b"one"))
    assert target.read_bytes() == b"one"
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(OutputExistsError):
        atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"one"
    atomic_write(target, lambda f: f.write(b"two"), overwrite=True)
    assert target.read_bytes() == b"two" and len(list(tmp_path.iterdir())) == 1


def test_the_no_clobber_check_is_atomic(tmp_path: Path, monkeypatch) -> None:
    """A file that appears between our check and our link is not overwritten either."""
    target = tmp_path / "race.png"
    real_link = os.link

    def link_after_someone_else_wrote(src, dst, *args, **kwargs):
        Path(dst).write_bytes(b"theirs")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(imageio.os, "link", link_after_someone_else_wrote)
    with pytest.raises(OutputExistsError):
        atomic_write(target, lambda f: f.write(b"ours"))
    assert target.read_bytes() == b"theirs" and len(list(tmp_path.iterdir())) == 1


def test_format_names() -> None:
    assert format_for("a.JPG") == "JPEG" and format_for("a.webp", "webp") == "WEBP"
    assert format_for("a.jpeg", "jpg") == "JPEG" and format_for("a.out", "png") == format_for("a", "png") == "PNG"
    with pytest.raises(ValueError, match="'a.png' names a PNG file but format 'webp' was asked"):
        format_for("a.png", "webp")
    with pytest.raises(ValueError, match="cannot tell the output format"):
        format_for("a.xyz")
    with pytest.raises(ValueError, match="unsupported output format"):
        format_for("a.png", "heic")


def test_captions_keywords_and_ratings_travel_with_the_picture(tmp_path: Path) -> None:
    """The EXIF whitelist keeps what describes the picture beyond camera and date: IPTC (captions,
    keywords), the rating, the document name."""
    im = Image.fromarray(rgb())
    exif = im.getexif()
    exif[0x4746], exif[0x010D], exif[0x83BB] = 4, "holiday", b"\x1c\x02\x05\x00\x04test"
    im.save(tmp_path / "in.tif", exif=exif)
    data = load_image(tmp_path / "in.tif")
    for ext in ("tif", "png", "jpg"):
        save_image(ImageData(data.pixels, exif=data.exif), tmp_path / f"out.{ext}")
        with Image.open(tmp_path / f"out.{ext}") as back:
            tags = back.getexif()
            assert (tags[0x4746], tags[0x010D], tags[0x83BB]) == (4, "holiday", b"\x1c\x02\x05\x00\x04test"), ext
