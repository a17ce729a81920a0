"""Image files in and out, with the semantics `upscale()` and `dlsr-upscale` promise.

Every image is normalised on load to one of four layouts, as an H x W x C numpy array of uint8 or uint16:

====================  =========================================================================
source                loaded as
====================  =========================================================================
RGB, RGBX, YCbCr, HSV RGB (8-bit)
RGBA, RGBa            RGBA (8-bit)
L, 1                  L (8-bit; bilevel images come back as 8-bit gray)
LA, La                LA (8-bit)
P                     RGB, or RGBA when the palette has transparency (PA too)
I;16, I;16B, I, ...   L (16-bit); mode I is clipped to 0..65535
16-bit RGB(A)/LA PNG  RGB / RGBA / LA (16-bit) - Pillow alone would truncate these to 8 bits
gray/RGB + colour key LA / RGBA (a PNG tRNS value: its pixels get alpha 0, the rest full alpha;
                      1/2/4-bit gray included)
CMYK (and LAB)        RGB, converted through the embedded ICC profile when there is one, with a
                      `ColorConversionWarning` (the CMYK profile is not carried to the output)
F (32-bit float)      refused: the value range is unknown
====================  =========================================================================

EXIF orientation is applied on load (the pixels come out upright and the orientation tag is dropped),
the ICC profile and the remaining EXIF (less the tags describing the source's pixel layout, which a
TIFF's EXIF holds) are carried to the output, only the first frame of an animated
or multi-page file is read, and images over `max_pixels` are refused before being decoded
(decompression-bomb guard). Files are written atomically: a temporary file in the destination
folder, fsync, then a rename (or a hard link, which also refuses to clobber an existing file), so an
interrupted write never leaves a truncated image under the final name.
"""
from __future__ import annotations

import contextlib
import io
import numbers
import os
import re
import stat
import struct
import tempfile
import threading
import time
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

#: PIL's own hard limit (twice its warning threshold); `max_pixels` defaults to it.
DEFAULT_MAX_PIXELS = 178_956_970
#: Extensions picked up when a folder is given to the CLI.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga", ".ppm", ".pgm")
#: Output formats we write, by extension.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
           ".tiff": "TIFF", ".tga": "TGA", ".ppm": "PPM", ".pgm": "PPM", ".gif": "GIF"}

_ORIENTATION = 0x0112
# The first-IFD tags an output carries over: what describes the picture, not how the source stored it.
# A TIFF's getexif() is its whole first IFD: size, strips, compression and palette (which would describe
# the source's pixels and make Pillow's TIFF writer fail), but also XMP (which may hold an orientation of
# its own: the upright output would be rotated again), an ICC profile (the source's, wrong after a colour
# conversion) and Photoshop resources (too long for a JPEG's EXIF). So only these stay, with the Exif and
# GPS sub-IFDs they point to.
_KEPT_TAGS = frozenset({
    0x010E, 0x010F, 0x0110,  # ImageDescription, Make, Model
    0x011A, 0x011B, 0x0128,  # XResolution, YResolution, ResolutionUnit
    0x0131, 0x0132, 0x013B, 0x013C,  # Software, DateTime, Artist, HostComputer
    0x8298, 0x8769, 0x8825,  # Copyright, Exif IFD, GPS IFD
    0x010D, 0x011D, 0x013E, 0x013F,  # DocumentName, PageName, WhitePoint, PrimaryChromaticities
    0x83BB, 0x4746, 0x4749,  # IPTC (captions, keywords), Rating, RatingPercent
    0x9C9B, 0x9C9C, 0x9C9D, 0x9C9E, 0x9C9F,  # Windows XPTitle, XPComment, XPAuthor, XPKeywords, XPSubject
})
_EXIF_IFD = 0x8769
_PIXEL_DIMENSIONS = (0xA002, 0xA003)  # in the Exif IFD: the source's width and height, wrong for the output
_PIL_LIMIT_LOCK = threading.RLock()


class ImageLoadError(ValueError):
    """An input file is not a readable image (empty, truncated, corrupt, not an image, too large)."""


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than the decompression-bomb limit allows."""


class OutputExistsError(FileExistsError):
    """The output file exists and overwriting was not allowed."""


class ColorConversionWarning(UserWarning):
    """An image's colour data was converted (e.g. CMYK to RGB) or reduced (e.g. 16 to 8 bits) on the way."""


@dataclass(frozen=True)
class ImageData:
    """Decoded pixels plus what must travel with them.

    `pixels` is H x W x C (C = 1 L, 2 LA, 3 RGB, 4 RGBA), uint8 or uint16.
    """

    pixels: np.ndarray
    icc_profile: bytes | None = None
    exif: bytes | None = None
    source_format: str | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        p = self.pixels
        if p.ndim != 3 or p.shape[2] not in (1, 2, 3, 4) or p.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"ImageData needs H x W x C (C 1..4) uint8/uint16 pixels, got {p.shape} {p.dtype}")

    @property
    def mode(self) -> str:
        """'L', 'LA', 'RGB' or 'RGBA'."""
        return ("L", "LA", "RGB", "RGBA")[self.pixels.shape[2] - 1]

    @property
    def bits(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    def with_pixels(self, pixels: np.ndarray) -> "ImageData":
        return replace(self, pixels=pixels)


# --- loading --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _pil_limit_off() -> Iterator[None]:
    """PIL's own decompression-bomb check off for this block (we apply `max_pixels` ourselves, with our
    message). The limit is process-wide, so the block holds a lock: keep it short."""
    with _PIL_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


#: Formats Pillow knows but we never open, whatever a file is named: PostScript/EPS is read by running
#: Ghostscript on the file (untrusted code).
NEVER_OPENED = ("EPS",)


def readable_formats() -> list[str]:
    """The formats `Image.open` may identify an input as: all of Pillow's readers but `NEVER_OPENED`."""
    Image.init()  # every plugin registered (once)
    return [f for f in Image.OPEN if f not in NEVER_OPENED]


def _open_unchecked(source: str | os.PathLike | BinaryIO) -> Image.Image:
    """Image.open of `readable_formats()` only, with PIL's own bomb check off (we apply `max_pixels`
    ourselves, with our message)."""
    formats = readable_formats()
    with _pil_limit_off():
        return Image.open(source, formats=formats)


def _orient(a: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to H x W [x C] pixels, as `ImageOps.exif_transpose` does."""
    if orientation == 2:
        a = a[:, ::-1]
    elif orientation == 3:
        a = a[::-1, ::-1]
    elif orientation == 4:
        a = a[::-1]
    elif orientation == 5:
        a = a.swapaxes(0, 1)
    elif orientation == 6:
        a = np.rot90(a, k=-1)
    elif orientation == 7:
        a = a.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        a = np.rot90(a, k=1)
    return np.ascontiguousarray(a)


def _exif_without_orientation(im: Image.Image) -> tuple[int, bytes | None]:
    """(orientation 1..8, the EXIF bytes an output carries: `_KEPT_TAGS` only, so without the orientation
    and the source's layout, or None). `im` is not modified."""
    try:
        source = im.getexif()
        orientation = source.get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF must not stop an upscale
        return 1, None
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    try:
        if not len(source):
            return orientation, None
        exif = Image.Exif()  # a copy: deleting the tag from im's own Exif would change the caller's image
        exif.load(source.tobytes())
    except Exception:  # noqa: BLE001 - the copy failed: the orientation read above still holds
        return orientation, None
    try:
        sub = exif.get_ifd(_EXIF_IFD) if _EXIF_IFD in exif else {}
        for tag in _PIXEL_DIMENSIONS:
            sub.pop(tag, None)
        for tag in [t for t in exif if t not in _KEPT_TAGS]:
            del exif[tag]
        data = exif.tobytes() if len(exif) else None
    except Exception:  # noqa: BLE001
        data = None
    return orientation, data


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> tuple[Image.Image, bytes | None]:
    """CMYK (or LAB) to RGB, through the embedded ICC profile to sRGB when littlecms can."""
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(im, src, srgb, outputMode="RGB")
            srgb_bytes = ImageCms.ImageCmsProfile(srgb).tobytes()
            msg = f"{im.mode} image converted to RGB through its embedded ICC profile (output tagged sRGB)"
            notes.append(msg)
            warnings.warn(msg, ColorConversionWarning, stacklevel=5)
            return out, srgb_bytes
        except Exception:  # noqa: BLE001 - fall back to the plain conversion below
            pass
    try:
        out = im.convert("RGB")
    except ValueError as e:
        raise ImageLoadError(f"cannot convert a {im.mode} image to RGB: {e}") from None
    why = "its embedded ICC profile could not be used" if icc else "no ICC profile to convert through"
    msg = f"{im.mode} image converted to RGB with Pillow's plain formula ({why}); colours may shift"
    notes.append(msg)
    warnings.warn(msg, ColorConversionWarning, stacklevel=5)
    return out, None


def _pending_rawmode(im: Image.Image, *, only_tile: bool = False) -> str:
    """The raw mode of `im`'s first pending (not yet decoded) tile, e.g. 'RGB;16B' ('' once loaded, or
    with `only_tile` when the image is not one tile): the only trace of the bits the file stores."""
    tiles = getattr(im, "tile", None) or ()
    if not tiles or (only_tile and len(tiles) != 1):
        return ""
    rawmode = tiles[0][3]
    if isinstance(rawmode, tuple):
        rawmode = rawmode[0]
    return rawmode if isinstance(rawmode, str) else ""


def decodes_to_8_bits(im: Image.Image) -> bool:
    """True when the file behind `im` holds 16-bit colour that Pillow will decode to 8 bits (it has no
    16-bit RGB/RGBA/LA mode and keeps the high byte)."""
    return ";16" in _pending_rawmode(im) and im.mode in ("RGB", "RGBA", "LA")


def _png16_rawmode(im: Image.Image) -> str | None:
    rawmode = _pending_rawmode(im, only_tile=True) if im.format == "PNG" else ""
    return rawmode if rawmode in ("RGB;16B", "RGBA;16B", "LA;16B") else None


def _gray_key_scale(im: Image.Image) -> int:
    """The factor Pillow multiplies a 2- or 4-bit gray PNG's samples by to make them 8-bit (85, 17), else 1.

    The PNG colour key (tRNS) of such a file stays in raw sample units (0..3, 0..15), so it must be scaled
    the same way to match the pixels. Only the pending tile tells the bit depth: call before `im.load()`.
    """
    if im.format != "PNG" or im.mode != "L":
        return 1
    return {"L;2": 85, "L;4": 17}.get(_pending_rawmode(im, only_tile=True), 1)


def _decode_png16(reopen: Callable[[], Image.Image], rawmode: str) -> np.ndarray:
    """Decode a 16-bit RGB/RGBA/LA PNG exactly with Pillow's own (C) inflate and unfilter.

    Pillow has no 16-bit colour mode and keeps only the high byte. The unfiltered bytes do not depend
    on the unpacker, so decoding once with the big-endian unpacker (high bytes) and once with the
    little-endian one (which then picks the low bytes) recovers every sample. LA;16 is read as 8-bit
    RGBA, whose pixels are the same 4 bytes.
    """
    def decode(raw: str) -> np.ndarray:
        im = reopen()
        im.tile = [im.tile[0]._replace(args=raw) if hasattr(im.tile[0], "_replace")
                   else (im.tile[0][0], im.tile[0][1], im.tile[0][2], raw)]
        im.load()
        return np.asarray(im)

    if rawmode == "LA;16B":
        b = decode("RGBA").astype(np.uint16)  # RGBA mode, bytes L_hi L_lo A_hi A_lo
        return np.stack([b[..., 0] << 8 | b[..., 1], b[..., 2] << 8 | b[..., 3]], axis=-1)
    hi = decode(rawmode).astype(np.uint16)
    lo = decode(rawmode[:-1] + "L").astype(np.uint16)
    return hi << 8 | lo


def _pixels_from_pil(im: Image.Image, notes: list[str],
                     key_scale: int = 1) -> tuple[np.ndarray, bytes | None, bool]:
    """(H x W x C pixels, replacement ICC profile or None, whether the ICC profile still applies).
    `key_scale`: `_gray_key_scale(im)`, taken before `im` was loaded."""
    mode = im.mode
    icc_ok = True
    replacement_icc = None
    if mode in ("CMYK", "LAB"):
        im, replacement_icc = _cmyk_to_rgb(im, notes)
        icc_ok = False
        mode = im.mode
    if mode == "F":
        raise ImageLoadError("32-bit float images (mode F) are not supported: their value range is unknown")
    if mode.startswith("I;16"):
        a = np.asarray(im).astype(np.uint16)
    elif mode == "I":
        a = np.asarray(im)
        if a.size and (a.min() < 0 or a.max() > 65535):
            notes.append("32-bit integer image clipped to the 16-bit range 0..65535")
        a = np.clip(a, 0, 65535).astype(np.uint16)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        a = np.asarray(im)
    elif mode == "1":
        a = np.asarray(im.convert("L"))
    elif mode == "La":
        a = np.asarray(im.convert("LA"))
    elif mode in ("RGBa", "PA"):
        a = np.asarray(im.convert("RGBA"))
    elif mode == "P":
        a = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    elif mode in ("RGBX", "YCbCr", "HSV"):
        a = np.asarray(im.convert("RGB"))
    else:
        try:
            a = np.asarray(im.convert("RGBA" if "A" in mode else "RGB"))
        except ValueError as e:
            raise ImageLoadError(f"unsupported image mode {mode!r}: {e}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    if mode in ("1", "L", "RGB") or mode.startswith("I;16"):
        key = im.info.get("transparency")
        if isinstance(key, int) and mode == "1":  # pixels are 0/255 here; older Pillows gave a 1-bit key raw (1)
            key = 255 if key else 0
        elif isinstance(key, int) and mode == "L":
            key *= key_scale
        a = _colour_key_alpha(a, key)
    return np.ascontiguousarray(a), replacement_icc, icc_ok


def _colour_key_alpha(a: np.ndarray, key: Any) -> np.ndarray:
    """Gray or RGB pixels with a PNG colour key (tRNS: one value whose pixels are transparent) as
    LA / RGBA, so the transparency survives like a palette's does. Anything else comes back as is."""
    c = a.shape[2]
    if isinstance(key, int) and c == 1:
        key = (key,)
    if not (isinstance(key, tuple) and len(key) == c and c in (1, 3) and all(isinstance(k, int) for k in key)):
        return a
    maxval = np.iinfo(a.dtype).max
    opaque = ~np.all(a == np.asarray(key, dtype=np.int64), axis=2, keepdims=True)
    return np.concatenate([a, (opaque * maxval).astype(a.dtype)], axis=2)


def from_pil(im: Image.Image, *, apply_exif_orientation: bool = True) -> ImageData:
    """Normalise a PIL image (see the module table); EXIF orientation applied unless told otherwise.

    A 16-bit RGB/RGBA/LA PNG still lazy (opened, not yet loaded, first frame) from a file name is decoded
    from that file with all its 16 bits, as `load_image` does: Pillow alone keeps only the high byte. Any
    other 16-bit colour image that Pillow decodes to 8 bits gets a note and a `ColorConversionWarning`.
    """
    if not isinstance(im, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(im).__name__}")
    notes: list[str] = []
    filename = getattr(im, "filename", "") or ""
    lazy_file = bool(filename) and os.path.isfile(filename) and im.tell() == 0
    try:
        pixels, orientation, exif, icc = _decode_opened(im, notes, (lambda: _open_unchecked(filename)) if lazy_file
                                                        else None, filename)
    except ImageLoadError as e:
        raise ImageLoadError(f"{filename}: {e}" if filename else str(e)) from None
    if apply_exif_orientation and orientation != 1:
        pixels = _orient(pixels, orientation)
    elif orientation != 1:  # the pixels stay as stored: so does the tag that says how to show them
        exif = _with_orientation(exif, orientation)
    return ImageData(pixels, icc_profile=icc or None, exif=exif, source_format=im.format, notes=tuple(notes))


def _with_orientation(exif_bytes: bytes | None, orientation: int) -> bytes | None:
    exif = Image.Exif()
    try:
        if exif_bytes:
            exif.load(exif_bytes)
        exif[_ORIENTATION] = orientation
        return exif.tobytes()
    except Exception:  # noqa: BLE001 - as in _exif_without_orientation: never stops an upscale
        return exif_bytes


def _decode_opened(im: Image.Image, notes: list[str], reopen: Callable[[], Image.Image] | None,
                   where: str) -> tuple[np.ndarray, int, bytes | None, bytes | None]:
    """Decode an opened, not yet loaded image: (pixels, EXIF orientation, EXIF without it, ICC profile).

    Loading drops the pending tile, which alone tells a 16-bit colour PNG (decoded again from `reopen`,
    the same file, with all 16 bits) and a low-bit gray PNG's colour-key scale: both are read first.
    Without `reopen`, a 16-bit colour image that Pillow decodes to 8 bits gets a note and a warning.
    Every decoding failure is an `ImageLoadError` (without the file name: the caller knows it).

    Some formats (TIFF) run PIL's bomb check again when decoding: for an image its opener let through
    (our `max_pixels`, or the caller's own PIL limit), it is decoded again with that check off."""
    tried: list[str] = []
    try:
        result = _decode_opened_once(im, tried, reopen, where)
    except Image.DecompressionBombError:  # raised before any pixel was decoded: nothing to undo
        tried = []
        with _pil_limit_off():
            result = _decode_opened_once(im, tried, reopen, where)
    notes.extend(tried)
    return result


def _decode_opened_once(im: Image.Image, notes: list[str], reopen: Callable[[], Image.Image] | None,
                        where: str) -> tuple[np.ndarray, int, bytes | None, bytes | None]:
    try:
        rawmode16 = _png16_rawmode(im) if reopen is not None else None
        key_scale = _gray_key_scale(im)
        if rawmode16 is None:
            if decodes_to_8_bits(im):
                msg = f"Pillow decodes this 16-bit {im.format} {im.mode} image to 8 bits per channel"
                notes.append(msg)
                warnings.warn(f"{where}: {msg}" if where else msg, ColorConversionWarning, stacklevel=3)
            # Decode before getexif(): on a PNG getexif() decodes the pixels itself, and as its errors are
            # swallowed (malformed EXIF must not stop an upscale) a corrupt IDAT would then load silently.
            im.load()
        orientation, exif = _exif_without_orientation(im)
        if rawmode16 is not None and reopen is not None:
            pixels = _colour_key_alpha(_decode_png16(reopen, rawmode16), im.info.get("transparency"))
            if pixels.shape[:2] != (im.height, im.width):  # the file was replaced since `im` was opened
                raise ImageLoadError(f"the file changed since it was opened ({pixels.shape[1]}x{pixels.shape[0]}, not "
                                     f"{im.width}x{im.height})")
            replacement_icc, icc_ok = None, True
        else:
            pixels, replacement_icc, icc_ok = _pixels_from_pil(im, notes, key_scale)
        return pixels, orientation, exif, im.info.get("icc_profile") if icc_ok else replacement_icc
    except ImageLoadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, IndexError) as e:
        raise ImageLoadError(f"truncated or corrupt image data ({type(e).__name__}: {e})") from None


def load_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageData:
    """Read an image file (see the module table). Raises `ImageLoadError` saying what is wrong."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageLoadError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(f"{path}: is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):  # never opened: reading a FIFO would block forever
        raise ImageLoadError(f"{path}: not a regular file (a FIFO, socket or device), not an image")
    if st.st_size == 0:
        raise ImageLoadError(f"{path}: empty file (0 bytes)")
    try:
        im = _open_unchecked(path)
    except UnidentifiedImageError:
        raise ImageLoadError(f"{path}: not an image Pillow can read (unrecognised or corrupt header; the "
                             f"{path.suffix or 'missing'} extension notwithstanding)") from None
    except PermissionError as e:
        raise ImageLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    except OSError as e:  # the header itself is cut short or damaged
        raise ImageLoadError(f"{path}: truncated or corrupt image data ({e})") from None
    with im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(
                f"{path}: {w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} (decompression-bomb "
                "guard; raise max_pixels / --max-pixels if you trust this file)"
            )
        notes: list[str] = []
        try:
            frames = int(getattr(im, "n_frames", 1))
        except Exception:  # noqa: BLE001 - counting frames of a damaged file; decoding reports it
            frames = 1
        if frames > 1:
            notes.append(f"only the first of {frames} frames was read")
        try:
            pixels, orientation, exif, icc = _decode_opened(im, notes, lambda: _open_unchecked(path), str(path))
        except ImageLoadError as e:
            raise ImageLoadError(f"{path}: {e}") from None
        if orientation != 1:
            pixels = _orient(pixels, orientation)
        return ImageData(pixels, icc_profile=icc or None, exif=exif, source_format=im.format, notes=tuple(notes))


# --- converting back -------------------------------------------------------------------------------
def can_be_pil(data: ImageData) -> bool:
    """PIL holds 8-bit L/LA/RGB/RGBA and 16-bit L (I;16), but no 16-bit colour image."""
    return data.bits == 8 or data.pixels.shape[2] == 1


def to_pil(data: ImageData) -> Image.Image:
    """The PIL image for `data` (16-bit gray as 'I;16'), with `icc_profile`/`exif` in `.info`."""
    p = data.pixels
    if data.bits == 16:
        if p.shape[2] != 1:
            raise ValueError(f"PIL has no 16-bit {data.mode} mode; keep the numpy array or save it with save_image")
        im = Image.fromarray(np.ascontiguousarray(p[:, :, 0]), mode=None)
        if im.mode != "I;16":  # pragma: no cover - big-endian hosts
            im = Image.frombytes("I;16", (data.width, data.height), p[:, :, 0].astype("<u2").tobytes())
    else:
        im = Image.fromarray(np.ascontiguousarray(p[:, :, 0] if p.shape[2] == 1 else p))
    if data.icc_profile:
        im.info["icc_profile"] = data.icc_profile
    if data.exif:
        im.info["exif"] = data.exif
    return im


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """uint16 -> uint8 with rounding (65535 -> 255)."""
    if pixels.dtype == np.uint8:
        return pixels
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


# --- saving ----------------------------------------------------------------------------------------
def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def encode_png16(pixels: np.ndarray, *, icc_profile: bytes | None = None, exif: bytes | None = None,
                 compress_level: int = 6) -> bytes:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA) from H x W x C uint16 pixels (Pillow cannot write
    16-bit colour). Rows use the Up filter, which costs one vectorised subtraction."""
    if pixels.dtype != np.uint16 or pixels.ndim != 3 or pixels.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"encode_png16 needs H x W x C uint16 pixels, got {pixels.shape} {pixels.dtype}")
    h, w, c = pixels.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(pixels.astype(">u2")).view(np.uint8).reshape(h, w * c * 2)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as the filter wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc_profile:
        out.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(icc_profile)))
    if exif:
        out.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    out.append(_png_chunk(b"IDAT", zlib.compress(raw.tobytes(), compress_level)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The Pillow format name for an explicit `fmt` ('png', 'jpg', ...) or the path's extension. Both,
    disagreeing (a JPEG asked for under a .png name), is an error: no file whose name lies about it."""
    if fmt:
        key = "." + fmt.lower().lstrip(".")
        if key not in FORMATS:
            raise ValueError(f"unsupported output format {fmt!r}; choose from "
                             f"{', '.join(sorted({k[1:] for k in FORMATS}))}")
        named = FORMATS.get(Path(path).suffix.lower())
        if named is not None and named != FORMATS[key]:
            raise ValueError(f"{Path(path).name!r} names a {named} file but format {fmt!r} was asked; drop one "
                             "or make them agree")
        return FORMATS[key]
    ext = Path(path).suffix.lower()
    if ext not in FORMATS:
        raise ValueError(f"cannot tell the output format from {Path(path).name!r}; use an extension such as "
                         ".png or .jpg (or pass a format)")
    return FORMATS[ext]


#: The output formats that can carry an ICC profile and EXIF through Pillow's save().
METADATA_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "TIFF"})


def encode_image(data: ImageData, fmt: str, *, quality: int = 95) -> tuple[bytes, list[str]]:
    """Encode `data` as `fmt` (a Pillow format name). Returns (bytes, notes about what was lost)."""
    notes: list[str] = []
    pixels = data.pixels
    if fmt == "PNG" and data.bits == 16 and pixels.shape[2] != 1:
        return encode_png16(pixels, icc_profile=data.icc_profile, exif=data.exif), notes
    if data.bits == 16 and not (pixels.shape[2] == 1 and fmt in ("PNG", "TIFF")):
        notes.append(f"{fmt} cannot hold 16-bit {data.mode}; written with 8 bits per channel")
        pixels = to_8bit(pixels)
    if fmt in ("JPEG", "BMP", "PPM") and pixels.shape[2] in (2, 4):
        notes.append(f"{fmt} has no alpha channel; alpha dropped")
        pixels = pixels[:, :, :-1]
    if fmt == "GIF":
        notes.append("GIF holds 256 colours; the output was quantised")
    im = to_pil(replace(data, pixels=np.ascontiguousarray(pixels)))
    params: dict[str, object] = {}
    if data.icc_profile and fmt in METADATA_FORMATS:
        params["icc_profile"] = data.icc_profile
    elif data.icc_profile:
        notes.append(f"{fmt} cannot hold the ICC colour profile; dropped (colours may look different)")
    if data.exif and fmt in METADATA_FORMATS:
        params["exif"] = data.exif
    elif data.exif:
        notes.append(f"{fmt} cannot hold EXIF metadata; dropped")
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = quality
    if fmt == "JPEG":
        params["subsampling"] = 0 if quality >= 90 else 2
    buf = io.BytesIO()
    im.save(buf, format=fmt, **params)
    return buf.getvalue(), notes


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


#: `atomic_write`'s temporary files: `.<name>.<8 random characters from mkstemp>.partial`.
TEMP_SUFFIX = ".partial"
#: Temporary files younger than this (seconds) are never taken for stale (see `remove_stale_temps`).
STALE_TEMP_MIN_AGE = 10.0


def _lock_temp(fd: int) -> int | None:
    """Hold an exclusive flock on a temporary file while it is written (released when its writer closes
    the returned fd or dies), so that `remove_stale_temps` never removes a live writer's file."""
    if fcntl is None:  # pragma: no cover - not POSIX
        return None
    lock_fd = os.dup(fd)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # pragma: no cover - a filesystem without flock: the age check alone protects the file
        pass
    return lock_fd


def _temp_stem(name: str, suffix: str) -> str:
    """The part of `name` a temporary file's name holds: all of it, or as many bytes as keep
    `.<stem>.<8 random characters><suffix>` within the 255 bytes a file name may have (a valid output
    name of 238+ bytes could not be written). A character cut in two stays bytes (surrogate escapes)."""
    room = 255 - len(os.fsencode(suffix)) - 10
    raw = os.fsencode(name)
    return name if len(raw) <= room else os.fsdecode(raw[:room])


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str] | None = None, *,
                       suffix: str = TEMP_SUFFIX, min_age: float = STALE_TEMP_MIN_AGE) -> list[Path]:
    """Remove the temporary files that a killed writer (SIGKILL, power loss) left in `folder`.

    Only files named like our own temporary files (`.<name>.<8 chars><suffix>`, for an output named
    in `names` when given) are considered, and only those older than `min_age` seconds that no live
    process holds locked (`atomic_write` locks its temporary file while writing it). Returns the files
    removed; errors (permissions, races with another cleaner) are ignored.
    """
    pattern = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(suffix) + "$")
    wanted = None if names is None else {_temp_stem(n, suffix) for n in names}
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or (wanted is not None and m["name"] not in wanted):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or now - st.st_mtime < min_age:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a live writer holds it
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _stage_temp(path: Path, write: Callable[[BinaryIO], None], suffix: str) -> tuple[Path, int | None]:
    """Fill and fsync `path`'s hidden temporary file (`.<name>.<random><suffix>`, locked: see
    `remove_stale_temps`); returns it and the lock, which the caller releases once it is renamed."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{_temp_stem(path.name, suffix)}.", suffix=suffix)
    tmp = Path(tmp_name)
    lock_fd = None
    try:
        with os.fdopen(fd, "wb") as f:
            lock_fd = _lock_temp(f.fileno())  # held until renamed
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return tmp, lock_fd


def _commit_temp(tmp: Path, path: Path, overwrite: bool) -> None:
    """Give a staged temporary file its name: renamed over `path`, or hard-linked so that a `path` that
    appeared meanwhile is never clobbered; then the folder is fsynced."""
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # atomic and never clobbers
        except FileExistsError:
            raise OutputExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace "
                                    "it)") from None
        except OSError:  # filesystems without hard links
            if path.exists():
                raise OutputExistsError(f"{path}: already exists") from None
            os.replace(tmp, path)
        tmp.unlink(missing_ok=True)
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - some filesystems refuse to fsync a directory
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, overwrite: bool = False,
                 suffix: str = TEMP_SUFFIX) -> Path:
    """Write a file so that it appears whole or not at all.

    `write(f)` fills a temporary file in the same folder (hidden: `.<name>.<random>.partial`), which is
    fsynced and then renamed over `path` (`overwrite=True`) or hard-linked to it, which fails if `path`
    appeared meanwhile (`OutputExistsError`). On any error or interrupt the temporary file is removed;
    one left by a killed process is removed by `remove_stale_temps` (which `dlsr-upscale` runs). `suffix`
    names a kind of temporary file (checkpoints use their own), so that each cleaner removes only its own.
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise OutputExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    atomic_write_all([(path, write)], overwrite=overwrite, suffix=suffix)
    return path


def blocking_file(folder: str | os.PathLike) -> Path | None:
    """The file standing where `folder` or one of its parents must be a folder (so it cannot be made), or
    None. May raise OSError (a name too long, a parent that may not be looked into)."""
    folder = Path(folder)
    return next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of UTF-8 text over whatever `path` held (configs, genotypes, logs' companions)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), overwrite=True)


def atomic_write_all(files: Iterable[tuple[str | os.PathLike, Callable[[BinaryIO], None]]], *,
                     overwrite: bool = False, suffix: str = TEMP_SUFFIX) -> list[Path]:
    """`atomic_write` for several files that belong together (a results JSON and its Markdown table):
    every file is written to its temporary file first, and only when all are whole are they renamed, so
    an error while writing any of them (a full disk, a folder we may not write) leaves none of them
    changed. The renames themselves are one after another, not one atomic step: an error raised by a
    rename carries the paths renamed before it as its `committed` attribute (empty: nothing changed)."""
    staged: list[tuple[Path, Path, int | None]] = []
    committed: list[Path] = []
    try:
        for path, write in files:
            path = Path(path)
            tmp, lock_fd = _stage_temp(path, write, suffix)
            staged.append((tmp, path, lock_fd))
        for tmp, path, _ in staged:
            try:
                _commit_temp(tmp, path, overwrite)
            except Exception as exc:
                exc.committed = list(committed)  # type: ignore[attr-defined]
                raise
            committed.append(path)
    finally:
        for tmp, _, lock_fd in staged:
            tmp.unlink(missing_ok=True)  # gone already once committed
            if lock_fd is not None:
                os.close(lock_fd)
    return [path for _, path, _ in staged]


def check_quality(quality: Any) -> int:
    """JPEG/WebP quality: an int in 1..100 (Pillow accepts more for JPEG and fails late, or oddly, for WebP)."""
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= quality <= 100:
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    return int(quality)


def save_image(data: ImageData, path: str | os.PathLike, *, format: str | None = None, quality: int = 95,
               overwrite: bool = False) -> list[str]:
    """Encode and atomically write `data` (format from `format` or the extension). Returns notes about
    anything the format could not hold (alpha in JPEG, 16 bits in WebP, ...), also issued as warnings."""
    fmt = format_for(path, format)
    check_quality(quality)
    if not overwrite and Path(path).exists():
        raise OutputExistsError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    blob, notes = encode_image(data, fmt, quality=quality)
    for note in notes:
        warnings.warn(f"{path}: {note}", ColorConversionWarning, stacklevel=2)
    atomic_write(path, lambda f: f.write(blob), overwrite=overwrite)
    return notes


__all__ = [
    "blocking_file",
    "ColorConversionWarning",
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "ImageData",
    "ImageLoadError",
    "ImageTooLargeError",
    "METADATA_FORMATS",
    "OutputExistsError",
    "STALE_TEMP_MIN_AGE",
    "TEMP_SUFFIX",
    "atomic_write",
    "atomic_write_all",
    "atomic_write_text",
    "check_quality",
    "can_be_pil",
    "encode_image",
    "encode_png16",
    "format_for",
    "from_pil",
    "load_image",
    "remove_stale_temps",
    "save_image",
    "to_8bit",
    "to_pil",
]
