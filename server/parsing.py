"""Bounded JSON: refuse what would make ``json.loads`` recurse, convert huge integers or build huge lists.

``json.loads`` on ``[[[...]]]`` 100,000 deep raises RecursionError, and on a 100,000-digit integer
ValueError (the int conversion limit): both used to escape as 500s. Here the body is checked first,
in C-speed passes (one regex that blanks string contents, then NumPy over what is left), so the
parser only ever sees documents of a bounded depth, number length and value count.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

# a JSON string: quotes around runs of plain characters and backslash escapes (the unrolled form is linear)
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class JSONRejected(ValueError):
    """A body that is not JSON or breaks a bound; ``status`` is the HTTP answer (422 or 413)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class JSONLimits:
    max_depth: int = 8  # {"images": [...]} needs 2
    max_digits: int = 32  # longest run of digits in a number
    max_values: int = 1024  # commas + 1: values in all arrays and objects together


def _skeleton(body: bytes) -> bytes:
    """The body with every string's contents removed: what is left is structure, numbers and literals."""
    return _STRING.sub(b'""', body)


def check_json(body: bytes, limits: JSONLimits = JSONLimits()) -> None:
    """Raise ``JSONRejected`` if ``body`` nests deeper, holds longer numbers or more values than ``limits``."""
    skeleton = np.frombuffer(_skeleton(body), np.uint8)
    steps = ((skeleton == ord("[")) | (skeleton == ord("{"))).astype(np.int32)
    steps -= (skeleton == ord("]")) | (skeleton == ord("}"))
    depth = int(np.cumsum(steps).max()) if steps.size else 0
    if depth > limits.max_depth:
        raise JSONRejected(f"JSON nested {depth} deep; the limit is {limits.max_depth}")
    digits = (skeleton >= ord("0")) & (skeleton <= ord("9"))
    if digits.any():  # longest run of consecutive digits
        edges = np.flatnonzero(np.diff(np.concatenate(([0], digits.view(np.int8), [0]))))
        longest = int((edges[1::2] - edges[::2]).max())
        if longest > limits.max_digits:
            raise JSONRejected(f"a JSON number has {longest} digits; the limit is {limits.max_digits}")
    values = int(np.count_nonzero(skeleton == ord(","))) + 1
    if values > limits.max_values:
        raise JSONRejected(f"JSON holds {values:,} values; the limit is {limits.max_values:,}", status=413)


def parse_json(body: bytes, limits: JSONLimits = JSONLimits()) -> Any:
    """``json.loads`` after ``check_json``; every failure is a ``JSONRejected``, never anything else."""
    check_json(body, limits)
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise JSONRejected(f"malformed JSON ({e})") from e


def classify_request_body(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of POST /classify: the body kinds the server parses (plus ``extra`` ones).

    A schema-valid body can still be refused (base64 of bytes that are no image: 415; more images
    or pixels than allowed: 413): the schema cannot say "a decodable image", and the limits are settings.
    """
    b64 = {"type": "string", "minLength": 4, "description": "base64 of an image file"}
    return {"required": True, "content": {
        "image/png": {"schema": {"type": "string", "format": "binary",
                                 "description": "raw image bytes (any supported format, whatever the content type)"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": {"type": "object", "anyOf": [{"required": ["image"]}, {"required": ["images"]}],
                                        "properties": {"image": b64, "images": {"type": "array", "minItems": 1,
                                                                                "items": b64}}}},
        **(extra or {}),
    }}
