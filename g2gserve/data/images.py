"""Bytes of an uploaded image -> the uint8 (C, H, W) tensor the model was trained on.

Conversion, exactly as documented for the server: decode (PNG, JPEG, WebP, BMP only), refuse more
than ``max_pixels`` *before* decoding (decompression bombs), convert the mode with Pillow to ``L``
(ITU-R 601-2 luma) for 1-channel models or ``RGB`` for 3-channel models (alpha is dropped, palette
images are expanded), and resize to the training size with bilinear filtering when the size differs.
No other change: Fashion-MNIST models expect light garments on a dark background, as in the data set.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
DEFAULT_MAX_PIXELS = 16_000_000


class ImageError(ValueError):
    """Base of the decoding errors; ``status`` is the HTTP status a server should answer with."""
    status = 422


class UnsupportedImage(ImageError):
    status = 415


class ImageTooLarge(ImageError):
    status = 413


def decode_image(data: bytes, shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS):
    """Decode one image to a uint8 (C, H, W) torch tensor matching ``shape``; see ``decode_array``."""
    import torch  # the server decodes with decode_array and needs no torch
    return torch.from_numpy(decode_array(data, shape, max_pixels))


def decode_array(data: bytes, shape: tuple[int, int, int], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode one image to uint8 (C, H, W) numpy matching ``shape``; raises an ``ImageError`` subclass.

    A JPEG larger than the target is decoded at a reduced scale (``draft``): the DCT does the first
    downscaling, so a 4000x4000 photo costs a fraction of a full decode.
    """
    if not data:
        raise ImageError("empty image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in ALLOWED_FORMATS:
                raise UnsupportedImage(f"unsupported image format {im.format}; send PNG, JPEG, WebP or BMP")
            width, height = im.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image has {width}x{height} pixels, more than the limit of {max_pixels:,}")
            c, h, w = shape
            if im.format == "JPEG" and (width > 2 * w or height > 2 * h):
                im.draft("L" if c == 1 else "RGB", (w, h))
            im.load()
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError as e:
        raise UnsupportedImage("not an image Pillow can identify; send PNG, JPEG, WebP or BMP") from e
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
