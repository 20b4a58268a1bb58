"""Request bodies → images: which payloads a request carries (on the event loop: HTTP parsing only), and turning
them into one uint8 (N, C, H, W) array (in the decode thread pool: Pillow releases the GIL while it decodes).

Four ways in: raw image bytes (any content type), multipart ``file`` fields, JSON base64 (``image``/``images``),
and raw pixels — uint8 ``N×C×H×W`` or ``N×H×W`` with the shape in the ``X-Shape`` header or the ``shape`` query
parameter (``"4,1,28,28"``), no codec on the way.
"""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from urllib.parse import parse_qs

import numpy as np
from fastapi import HTTPException, Request
from PIL import Image

from g2gserve.data.images import ImageError, decode_array, png_size

from .multipart import MultipartError, file_fields
from .parsing import JSONRejected, parse_json

SHAPE_HEADER = "x-shape"
_SHAPE_RAW = SHAPE_HEADER.encode()
ADMISSION_HEADERS = (b"content-type", b"content-length", _SHAPE_RAW)  # all that announced_images_from_headers reads


@dataclass
class Body:
    """What a request carries, before any decoding: encoded images, a JSON text to unpack, or raw pixels."""
    payloads: list[bytes] | None = None
    json_text: bytes | None = None
    pixels: np.ndarray | None = None

    @property
    def encoded_bytes(self) -> int:
        """Bytes of encoded images (0 for raw pixels and JSON, whose size says little before unpacking)."""
        return sum(map(len, self.payloads)) if self.payloads is not None else 0

    @property
    def images_hint(self) -> int:
        """Images known before decoding (for admission); a JSON body counts as one until it is unpacked."""
        if self.pixels is not None:
            return len(self.pixels)
        return len(self.payloads) if self.payloads is not None else 1


INLINE_PIXELS = 128 * 128  # one image at most this large is decoded on the event loop (cheaper than a thread hop)


def announced_images_from_headers(headers: dict[str, str], query: str, bytes_per_image: float = 0.0) -> int:
    """Images a request carries, guessed before its body is read, for admission: N of a raw-pixel shape (header or
    query); for several-image bodies (multipart, JSON) Content-Length over the bytes per image seen so far; else 1.
    ``headers`` with lower-case names; ``query`` the raw query string."""
    text = headers.get(SHAPE_HEADER)
    if text is None and "shape=" in query:
        text = parse_qs(query).get("shape", [""])[0]
    if text:
        try:
            return max(1, int(text.replace("x", ",").split(",")[0]))
        except ValueError:
            return 1  # parse_shape answers 422 later
    ctype = headers.get("content-type", "")
    length = headers.get("content-length", "")
    if bytes_per_image > 0 and length.isdigit() and ctype.startswith(("multipart/", "application/json")):
        return max(1, int(int(length) / bytes_per_image))
    return 1


def cheap_to_decode(body: Body) -> bool:
    """Raw pixels, or a single small image (its header read, nothing decoded): not worth the decode pool."""
    if body.pixels is not None:
        return True
    if body.payloads is None or len(body.payloads) != 1 or len(body.payloads[0]) > 64 * 1024:
        return False
    size = png_size(body.payloads[0])  # a PNG's size without Pillow (most requests)
    if size is not None:
        return size[0] * size[1] <= INLINE_PIXELS
    try:
        with Image.open(io.BytesIO(body.payloads[0])) as im:
            return im.size[0] * im.size[1] <= INLINE_PIXELS
    except Exception:  # noqa: BLE001 - not an image: decode_body answers with the right 4xx, cheaply
        return True


def parse_shape(text: str, input_shape: tuple[int, int, int]) -> tuple[int, ...]:
    """``"N,C,H,W"`` or ``"N,H,W"`` (1-channel models) → a 4-d shape that must match the model's input."""
    try:
        dims = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise HTTPException(422, f"shape must be comma-separated integers like N,C,H,W; got {text!r}")
    c, h, w = input_shape
    if len(dims) == 3 and c == 1:
        dims = (dims[0], 1, dims[1], dims[2])
    if len(dims) != 4 or dims[1:] != input_shape or dims[0] < 1:
        raise HTTPException(422, f"raw pixels must have shape N,{c},{h},{w}" + (f" or N,{h},{w}" if c == 1 else "")
                                 + f" with N >= 1; got {text!r}")
    return dims


def _shape_and_type(request: Request) -> tuple[str | None, str]:
    """The raw-pixel shape (header, else query) and the bare content type, in one pass over the raw headers
    (Starlette's ``Headers`` and ``QueryParams`` objects cost more than the rest of a small request's parsing)."""
    shape_text, ctype = None, ""
    for name, value in request.scope["headers"]:
        if name == b"content-type":
            ctype = value.decode("latin-1").split(";")[0].strip().lower()
        elif name == _SHAPE_RAW:
            shape_text = value.decode("latin-1")
    if not shape_text:  # no header (or an empty one): the query parameter, as ``header or query``
        shape_text = request.query_params.get("shape") if b"shape=" in request.scope.get("query_string", b"") else None
    return shape_text, ctype


async def read_body(request: Request, input_shape: tuple[int, int, int], max_images: int) -> Body:
    """Read the request and split it into payloads without decoding anything (cheap; runs on the event loop)."""
    shape_text, ctype = _shape_and_type(request)
    if shape_text is not None:
        shape = parse_shape(shape_text, input_shape)
        if shape[0] > max_images:
            raise HTTPException(413, f"{shape[0]} images in one request; the limit is {max_images}")
        data = await request.body()
        if len(data) != math.prod(shape):
            raise HTTPException(422, f"raw pixels of shape {','.join(map(str, shape))} need {math.prod(shape):,} "
                                     f"bytes; the body has {len(data):,}")
        return Body(pixels=np.frombuffer(data, dtype=np.uint8).reshape(shape).copy())  # writable, as runtimes expect
    if ctype == "multipart/form-data":
        try:
            payloads = file_fields(await request.body(), request.headers.get("content-type", ""))
        except MultipartError as e:
            raise HTTPException(e.status, str(e))
        if not payloads:
            raise HTTPException(422, "multipart upload needs one or more 'file' fields")
    elif ctype == "application/json":
        return Body(json_text=await request.body())
    else:
        payloads = [await request.body()]
    return Body(payloads=_checked(payloads, max_images))


def _checked(payloads: list[bytes], max_images: int) -> list[bytes]:
    if not payloads or not any(payloads):
        raise HTTPException(422, "empty body: send an image (raw bytes, multipart 'file', JSON base64 or raw pixels)")
    if len(payloads) > max_images:
        raise HTTPException(413, f"{len(payloads)} images in one request; the limit is {max_images}")
    return payloads


def _json_payloads(text: bytes, max_images: int) -> list[bytes]:
    try:  # bounded depth, number length and value count before the parser runs (server/parsing.py)
        body = parse_json(text)
    except JSONRejected as e:
        raise HTTPException(e.status, str(e))
    if not isinstance(body, dict) or not ({"image", "images"} & set(body)):
        raise HTTPException(422, 'JSON body must be {"image": "<base64>"} or {"images": ["<base64>", ...]}')
    items = body.get("images", [body.get("image")])
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise HTTPException(422, "images must be base64 strings")
    try:
        payloads = [base64.b64decode(i, validate=True) for i in items]
    except (binascii.Error, ValueError) as e:
        raise HTTPException(422, f"invalid base64 ({e})")
    return _checked(payloads, max_images)


def decode_body(body: Body, input_shape: tuple[int, int, int], max_pixels: int, max_images: int) -> np.ndarray:
    """Body → uint8 (N, C, H, W) in the model's shape (runs in the decode pool); raises HTTPException on bad input."""
    if body.pixels is not None:
        return body.pixels
    payloads = body.payloads if body.payloads is not None else _json_payloads(body.json_text or b"", max_images)
    try:
        if len(payloads) == 1:
            return decode_array(payloads[0], input_shape, max_pixels)[None]
        return np.stack([decode_array(p, input_shape, max_pixels) for p in payloads])
    except ImageError as e:
        raise HTTPException(e.status, str(e))
