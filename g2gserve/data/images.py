"""Bytes of an uploaded image -> the uint8 (C, H, W) tensor the model was trained on.

Conversion, exactly as documented for the server: decode (PNG, JPEG, WebP, BMP, TIFF only), refuse
more than ``max_pixels`` *before* decoding (decompression bombs), bring every mode Pillow opens to
8 bits per channel without losing its range (Pillow's own ``convert`` clips 16-bit grey to 255):

- 16-bit and 32-bit integer grey (``I;16*``, ``I``: 16-bit PNG/TIFF samples) -> value / 257, rounded;
- float grey (``F``, on Pillow's 0..255 scale, as ``convert("F")`` writes it) -> rounded, clipped;
- anything with transparency (``LA``, ``RGBA``, ``PA``, ``P``/``L``/``RGB`` with a transparent colour)
  -> composited over black, the background of the training images, so a transparent background
  does not turn into whatever colour hides under it;
- ``CMYK``, ``YCbCr``, ``1``, ``P`` -> Pillow's conversion;

then convert to ``L`` (ITU-R 601-2 luma) for 1-channel models or ``RGB`` for 3-channel models, and
resize to the training size with bilinear filtering when the size differs. No other change:
Fashion-MNIST models expect light garments on a dark background, as in the data set.

The common case of a server, an 8-bit PNG already in the model's mode and size (grey for a grey model, RGB for
a colour one, no transparency), needs none of these steps, and Pillow's per-image cost (chunk parsing in Python,
~25 µs for a 28×28 image) was the largest part of answering it. It is decoded by libspng (``pyspng``, ~7 µs)
when that is installed; the result is the same array (tests/test_images.py), and anything else, including
whatever libspng refuses, goes the Pillow way above.
"""
from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")
FORMATS_HINT = "send PNG, JPEG, WebP, BMP or TIFF"
DEFAULT_MAX_PIXELS = 16_000_000


class ImageError(ValueError):
    """Base of the decoding errors; ``status`` is the HTTP status a server should answer with."""
    status = 422


class UnsupportedImage(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")

try:
    import pyspng
except ImportError:  # optional: Pillow decodes everything without it
    pyspng = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_COLOUR = {1: 0, 3: 2}  # model channels -> the PNG colour type that needs no conversion (grey, RGB)


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, or None if ``data`` does not start like a PNG."""
    if len(data) < 24 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack_from(">II", data, 16)


def _plain_png(data: bytes, shape: tuple[int, int, int], max_pixels: int) -> np.ndarray | None:
    """The (C, H, W) array of a PNG that needs no conversion (module doc), decoded by libspng; else None."""
    c, h, w = shape
    if pyspng is None or png_size(data) != (w, h) or w * h > max_pixels:
        return None
    depth, colour, interlace = data[24], data[25], data[28]
    if depth != 8 or colour != _PNG_COLOUR.get(c) or interlace:
        return None
    pos = 33  # after the signature and IHDR: no tRNS chunk (a transparent colour) before the image data
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            break
        if kind == b"tRNS":
            return None
        pos += 12 + length
    try:
        array = pyspng.load(data)
    except RuntimeError:  # corrupt, truncated, or beyond libspng's limits: Pillow says what is wrong
        return None
    if array.dtype != np.uint8 or array.shape[:2] != (h, w):
        return None
    return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))


def _grey_from_array(array: np.ndarray, scale: float) -> Image.Image:
    """High-range grey samples -> 8-bit ``L`` by ``round(value / scale)``, clipped to 0..255."""
    return Image.fromarray(np.clip(np.rint(array.astype(np.float64) / scale), 0, 255).astype(np.uint8), "L")


def _over_black(im: Image.Image) -> Image.Image:
    """RGBA -> RGB composited over black: the colour under a transparent pixel does not count."""
    rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
    rgb = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def to_model_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> ``L`` (1 channel) or ``RGB`` (3 channels), keeping the full range (module doc)."""
    target = "L" if channels == 1 else "RGB"
    if im.mode in _SIXTEEN_BIT:
        im = _grey_from_array(np.asarray(im), 257.0)
    elif im.mode == "F":
        im = _grey_from_array(np.asarray(im), 1.0)
    elif im.has_transparency_data:
        im = _over_black(im)
    try:
        return im.convert(target)
    except ValueError as e:  # e.g. LAB, which Pillow cannot convert without a colour profile
        raise UnsupportedImage(f"cannot convert image mode {im.mode} to {target} ({e})") from e


def decode_image(data: bytes, shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode one image to a uint8 (C, H, W) torch tensor matching ``shape``; see ``decode_array``."""
    import torch  # the server decodes with decode_array and needs no torch
    # a fast-path PNG comes back as a read-only view of its inflated bytes: torch wants memory it may write
    return torch.from_numpy(np.require(decode_array(data, shape, max_pixels), requirements="W"))


def decode_array(data: bytes, shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image to uint8 (C, H, W) numpy matching ``shape``; raises an ``ImageError`` subclass.

    A JPEG larger than the target is decoded at a reduced scale (``draft``): the DCT does the first
    downscaling, so a 4000x4000 photo costs a fraction of a full decode.
    """
    if not data:
        raise ImageError("empty image")
    plain = _plain_png(data, shape, max_pixels)
    if plain is not None:
        return plain
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ALLOWED_FORMATS:
                raise UnsupportedImage(f"unsupported image format {im.format}; {FORMATS_HINT}")
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image has {width}x{height} pixels, more than the limit of {max_pixels:,}")
            c, h, w = shape
            if im.format == "JPEG" and (width > 2 * w or height > 2 * h):
                im.draft("L" if c == 1 else "RGB", (w, h))
            im.load()
            im = to_model_mode(im, c)
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise UnsupportedImage(f"not an image Pillow can identify; {FORMATS_HINT}") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(str(e)) from e
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"cannot decode image ({e})") from e
    if array.ndim == 2:
        array = array[:, :, None]
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def encode_png(image) -> bytes:
    """uint8 (C, H, W) tensor or array -> PNG bytes (for samples, tests and the load test)."""
    array = np.asarray(image).transpose(1, 2, 0)
    im = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
