"""Images as rows for the digit classifiers (the ``submit --input`` image formats).

A grayscale image becomes one 64-feature row the way the digit classifiers were trained: light
background inverted to dark, shrunk to 8x8 by area averaging, contrast-stretched to the 0..16
pixel counts of the digits data set, divided by 16 (the models' ``input_scaling``). PGM (P2, with
``#`` comments between its pixel values too, and P5) is read here; PNG and JPEG (those two
formats only, whatever the name) need Pillow. An image over :data:`MAX_IMAGE_SIDE` pixels a side
or :data:`MAX_IMAGE_PIXELS` in all is refused from its header, before any pixel is decoded (and
before Pillow's ``Image.open`` sees it: its own decompression-bomb check would warn on stderr
from 89M pixels; it stays as the backstop, its error read as ours). A PNG or JPEG is read as a
viewer shows it: turned upright by its EXIF orientation, a 16-bit gray PNG at its full depth,
and transparent pixels on a plain background of the shade farthest from the visible pixels'
(a digit drawn on a transparent canvas, its invisible pixels black, is no blank image).
"""

from __future__ import annotations

import io
import re
import struct
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from meshinfer.errors import ConfigError

if TYPE_CHECKING:
    import PIL.Image
    import PIL.ImageFile

__all__ = [
    "DIGIT_LEVELS",
    "DIGIT_SIDE",
    "MAX_IMAGE_PIXELS",
    "MAX_IMAGE_SIDE",
    "image_row",
    "read_image",
    "read_pgm",
]

DIGIT_SIDE = 8
DIGIT_LEVELS = 16
MAX_IMAGE_SIDE = 16384
#: The most pixels an image may have (8192 x 4096): decoded as float64 that is 256 MiB a copy.
#: A PNG of a few KiB can declare far more (Pillow only warns up to 179M pixels).
MAX_IMAGE_PIXELS = 1 << 25

#: The most digits a PGM header field or ASCII pixel value may have (maxval is at most 65535;
#: a pixel over maxval is refused): Python's int() refuses a string of 4300 or more.
_MAX_DIGITS = 9

_PGM_TOKEN = re.compile(rb"(?:\s|#[^\r\n]*)*([^\s#]+)")
_PGM_COMMENT = re.compile(rb"#[^\r\n]*")


def read_pgm(name: str, data: bytes, key: str | None) -> np.ndarray:
    """A binary (P5) or ASCII (P2) PGM image as one digit row."""
    fields, pos = [], 0
    for _ in range(4):
        match = _PGM_TOKEN.match(data, pos)
        if match is None:
            raise ConfigError(f"{name}: truncated PGM header")
        fields.append(match.group(1))
        pos = match.end()
    magic, *numbers = fields
    not_pgm = "not a PGM image (P2 or P5 header expected)"
    if magic not in (b"P2", b"P5"):
        raise ConfigError(f"{name}: {not_pgm}")
    width, height, maxval = _pgm_numbers(name, numbers, not_pgm, "size or maxval")
    if not (0 < width and 0 < height and 0 < maxval < 65536):
        raise ConfigError(f"{name}: PGM size {width}x{height} or maxval {maxval} out of range")
    _check_size(name, width, height)
    body = _pgm_binary if magic == b"P5" else _pgm_ascii
    pixels = body(name, data[_raster_start(data, pos) :], width * height, maxval)
    if pixels.max() > maxval:
        raise ConfigError(f"{name}: PGM pixel value {pixels.max()} is over the maxval {maxval}")
    return image_row(pixels.reshape(height, width).astype(np.float64) / maxval)


def _raster_start(data: bytes, pos: int) -> int:
    """Where the pixels begin after the maxval ending at ``pos``: past exactly one whitespace
    character, or past a comment and the newline ending it, which stands for that character
    (Netpbm: a comment may come before the whitespace that delimits the raster)."""
    if data[pos : pos + 1] != b"#":
        return pos + 1  # the token ended at a whitespace character (or at the end of data)
    ends = [i for i in (data.find(b"\n", pos), data.find(b"\r", pos)) if i >= 0]
    return min(ends) + 1 if ends else len(data)


def _check_size(name: str, width: int, height: int) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise ConfigError(
            f"{name}: image of {width}x{height} pixels is too large (at most {MAX_IMAGE_SIDE} "
            f"a side and {MAX_IMAGE_PIXELS} in all; shrink it first)"
        )


def _pgm_binary(name: str, body: bytes, count: int, maxval: int) -> np.ndarray:
    dtype = np.dtype(">u2") if maxval > 255 else np.dtype("u1")
    if len(body) < count * dtype.itemsize:
        raise ConfigError(f"{name}: PGM pixel data is truncated")
    return np.frombuffer(body, dtype=dtype, count=count)


def _pgm_ascii(name: str, body: bytes, count: int, maxval: int) -> np.ndarray:
    """The pixels of a P2 raster: decimal numbers between whitespace and comments (pbmplus'
    pgm(5): "characters from a '#' to the next end-of-line are ignored"; libnetpbm's plain
    reader skips them in the raster too)."""
    if b"#" in body:
        body = _PGM_COMMENT.sub(b" ", body)  # (a comment ends a number: "12#c\n3" is 12, 3)
    values = body.split()[:count]
    malformed = "PGM pixel data is truncated or not numbers"
    if len(values) < count:
        raise ConfigError(f"{name}: {malformed}")
    return np.array(_pgm_numbers(name, values, malformed, "pixel value"), dtype=np.int64)


def _pgm_numbers(name: str, tokens: list[bytes], malformed: str, what: str) -> list[int]:
    """``tokens`` as numbers: ConfigError ``malformed`` unless each is ASCII digits, and one
    naming ``what`` for a number of over :data:`_MAX_DIGITS` digits (leading zeros dropped)."""
    if not all(t.isdigit() for t in tokens):  # (bytes.isdigit: ASCII digits only)
        raise ConfigError(f"{name}: {malformed}")
    digits = [t.lstrip(b"0") or b"0" for t in tokens]
    if any(len(d) > _MAX_DIGITS for d in digits):
        raise ConfigError(
            f"{name}: PGM {what} out of range (a number of over {_MAX_DIGITS} digits)"
        )
    return [int(d) for d in digits]


def read_image(name: str, data: bytes, key: str | None) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{name}: reading PNG or JPEG needs Pillow (pip install pillow); "
            "or convert the image to .pgm or .npy"
        ) from None
    try:
        with _opened(Image, name, data) as image:
            _check_size(name, *image.size)
            gray = _gray_levels(image)
    except ConfigError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ConfigError(f"{name}: image is too large ({exc}); shrink it first") from None
    except Exception as exc:  # Pillow's decoders raise many types for a malformed file
        raise ConfigError(f"{name}: not a readable image ({exc or type(exc).__name__})") from None
    return image_row(gray)


#: Pillow's modes of a 16-bit gray PNG: its ``convert("L")`` clips them at 255 (all white).
_WIDE_GRAY_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
#: Pillow's modes that carry an alpha channel (a palette or gray image may have a tRNS too).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _gray_levels(image: PIL.Image.Image) -> np.ndarray:
    """The gray levels (0..1) of ``image`` as a viewer shows it (module doc)."""
    from PIL import ImageOps  # (the caller imported Pillow)

    image = ImageOps.exif_transpose(image)
    if image.mode in _WIDE_GRAY_MODES:
        return np.asarray(image, dtype=np.float64) / 65535.0
    if image.mode not in _ALPHA_MODES and "transparency" not in image.info:
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    levels = np.asarray(image.convert("RGBA").convert("LA"), dtype=np.float64) / 255.0
    gray, alpha = levels[..., 0], levels[..., 1]
    shown = alpha.sum()
    background = 1.0 if shown == 0 or (gray * alpha).sum() / shown < 0.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def _opened(image_module: ModuleType, name: str, data: bytes) -> PIL.ImageFile.ImageFile:
    """The PNG or JPEG image in ``data`` (told by its signature) with only its header read, by
    ``Image.open`` restricted to that format, once every size its header declares passed
    :func:`_check_size` (which refuses any image Pillow's bomb check would warn about)."""
    kind = next((k for k, signature in _SIGNATURES.items() if data.startswith(signature)), None)
    if kind is None:
        raise ConfigError(f"{name}: not a readable image (neither PNG nor JPEG)")
    for width, height in _DECLARED_SIZES[kind](data):
        _check_size(name, width, height)
    from PIL import UnidentifiedImageError  # (the caller imported Pillow)

    try:
        return image_module.open(io.BytesIO(data), formats=[kind])
    except UnidentifiedImageError:  # (Pillow's reader refused the header)
        raise ConfigError(f"{name}: not a readable image (a malformed {kind} header)") from None


def _png_sizes(data: bytes) -> list[tuple[int, int]]:
    """The (width, height) of every IHDR chunk before the pixel data (Pillow keeps the last)."""
    sizes, pos = [], len(_SIGNATURES["PNG"])
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind in (b"IDAT", b"fdAT"):
            break
        if kind == b"IHDR" and length >= 8 and pos + 16 <= len(data):
            sizes.append(struct.unpack_from(">II", data, pos + 8))
        pos += 12 + length  # length, type, data, CRC
    return sizes


#: JPEG start-of-frame markers (the second byte after 0xFF): each declares the image's size.
_JPEG_FRAMES = frozenset([*range(0xC0, 0xD0), 0xDE]) - {0xC4, 0xC8, 0xCC}
#: JPEG markers without a length (TEM, RSTn, SOI, EOI), and the fill bytes after a 0xFF.
_JPEG_BARE = frozenset([0x01, *range(0xD0, 0xDA)])
_JPEG_FILL = frozenset([0x00, 0xFF])
_JPEG_SCAN = 0xDA


def _jpeg_sizes(data: bytes) -> list[tuple[int, int]]:
    """The (width, height) of every frame header before the first scan (Pillow keeps the
    last), walking the marker segments as Pillow does (bytes between them skipped)."""
    sizes, pos = [], 2
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if data[pos] != 0xFF or marker in _JPEG_FILL:
            pos += 1
        elif marker == _JPEG_SCAN:
            break
        elif marker in _JPEG_BARE:
            pos += 2
        else:
            if marker in _JPEG_FRAMES and pos + 9 <= len(data):
                height, width = struct.unpack_from(">HH", data, pos + 5)
                sizes.append((width, height))
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return sizes


_SIGNATURES = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}
_DECLARED_SIZES = {"PNG": _png_sizes, "JPEG": _jpeg_sizes}


def image_row(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (2-D, values 0..1) as one digit-classifier row of 64 (module doc)."""
    if gray.ndim != 2 or 0 in gray.shape:
        raise ConfigError("an image must be a non-empty 2-D grayscale array")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if border.mean() > 0.5 else gray
    small = _area_weights(ink.shape[0]) @ ink @ _area_weights(ink.shape[1]).T
    low, high = small.min(), small.max()
    stretched = (small - low) / (high - low) if high > low else np.zeros_like(small)
    counts = np.rint(stretched * DIGIT_LEVELS)
    return (counts / DIGIT_LEVELS).reshape(1, DIGIT_SIDE * DIGIT_SIDE)


def _area_weights(n: int) -> np.ndarray:
    """(8, n) matrix averaging n input pixels onto 8 by the overlap of their intervals."""
    into, out = np.arange(n + 1) / n, np.arange(DIGIT_SIDE + 1) / DIGIT_SIDE
    low = np.maximum(out[:-1, None], into[None, :-1])
    high = np.minimum(out[1:, None], into[None, 1:])
    overlap = np.clip(high - low, 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)
