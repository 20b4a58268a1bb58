"""Open Inference Protocol (KServe v2) infer requests and responses, without any web framework.

A g2gserve model speaks v2 with one of two inputs and one output:

* ``images``: ``UINT8`` ``[-1, C, H, W]`` pixels, already the training size (no decoding, no resizing);
* ``image_bytes``: ``BYTES`` ``[-1]`` (or ``[-1, 1]``) encoded images (PNG, JPEG, WebP, BMP), converted as
  ``/classify`` converts them. As raw binary data they are Triton's length-prefixed elements; inside JSON,
  where arbitrary bytes cannot travel, each element is the image in base64;
* output ``probabilities``: ``FP32`` ``[-1, classes]``. Triton's classification extension is honoured:
  ``{"name": "probabilities", "parameters": {"classification": k}}`` returns ``BYTES`` ``[-1, k]`` elements
  ``"<probability>:<class index>:<label>"`` instead, best first.

The binary-tensor extension works both ways: a request body may be the JSON header
(``Inference-Header-Content-Length`` bytes) followed by the raw tensors in input order, and outputs asked
for with ``binary_data`` (per output) or ``binary_data_output`` (per request) come back the same way.
Every problem raises :class:`OIPError` with the 4xx status to answer and a message for ``{"error": ...}``.
"""
from __future__ import annotations

import base64
import binascii
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

PIXELS = "images"
ENCODED = "image_bytes"
OUTPUT = "probabilities"
EXTENSIONS = ("classification", "binary_tensor_data", "model_repository")


class OIPError(Exception):
    """A request the protocol refuses; ``status`` is the HTTP status, ``str(self)`` the error message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers


@dataclass
class RequestedOutput:
    binary: bool
    classification: int = 0  # top-k as "p:index:label" strings instead of probabilities when > 0


@dataclass
class InferRequest:
    """A validated request: exactly one of ``pixels`` (uint8 N,C,H,W) and ``encoded`` (one bytes per image)."""

    id: str | None
    pixels: np.ndarray | None
    encoded: list[bytes] | None
    output: RequestedOutput

    @property
    def count(self) -> int:
        return len(self.pixels) if self.pixels is not None else len(self.encoded or [])


def model_metadata(name: str, versions: list[str], platform: str, input_shape: tuple[int, int, int],
                   classes: list[str]) -> dict:
    """The v2 model metadata: both inputs (a request sends one of them) and the output."""
    return {"name": name, "versions": versions, "platform": platform,
            "inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [-1, *input_shape]},
                       {"name": ENCODED, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(classes)]}],
            "parameters": {"classes": list(classes)}}


def model_config(name: str, platform: str, input_shape: tuple[int, int, int], classes: list[str],
                 max_batch: int) -> dict:
    """Triton's model configuration (``/v2/models/{name}/config``), which perf_analyzer reads: dims without the
    batch axis, ``max_batch_size`` as the server batches."""
    return {"name": name, "platform": platform, "max_batch_size": max_batch,
            "input": [{"name": PIXELS, "data_type": "TYPE_UINT8", "dims": list(input_shape), "optional": True},
                      {"name": ENCODED, "data_type": "TYPE_STRING", "dims": [1], "optional": True}],
            "output": [{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [len(classes)]}],
            "dynamic_batching": {}}


# ------------------------------------------------------------------ requests
def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """A request body sent with ``Content-Encoding: gzip|deflate`` (tritonclient's request compression), never
    inflated past ``limit`` bytes (the body limit applies to what the request carries, not to its wire size)."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise OIPError(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise OIPError(400, f"the {encoding} request body does not decompress ({e})")
    if len(data) > limit:
        raise OIPError(413, f"the request body inflates past the limit of {limit:,} bytes")
    if not inflater.eof:
        raise OIPError(400, f"the {encoding} request body is truncated")
    return data


def _json_header(body: bytes, header_length: str | None) -> tuple[dict, memoryview]:
    """Split the body into its JSON header and the binary tail (empty without the extension)."""
    if header_length is None:
        head, tail = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise OIPError(400, f"Inference-Header-Content-Length must be an integer, got {header_length!r}")
        if not 0 < n <= len(body):
            raise OIPError(400, f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        head, tail = body[:n], body[n:]
    if not head:
        raise OIPError(400, "empty request body: send a v2 inference request (JSON)")
    try:
        request = orjson.loads(head)
    except orjson.JSONDecodeError as e:
        raise OIPError(400, f"malformed JSON in the inference request ({e})")
    if not isinstance(request, dict):
        raise OIPError(400, "the inference request must be a JSON object")
    return request, memoryview(tail)


def _shape(tensor: dict) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise OIPError(400, f"input {tensor.get('name')!r}: shape must be a list of non-negative integers")
    return shape


def _split_bytes(raw: bytes | memoryview, count: int, name: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a little-endian uint32 length, then that many bytes."""
    items, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise OIPError(400, f"input {name!r}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise OIPError(400, f"input {name!r}: a BYTES element of {n} bytes runs past the binary data")
        items.append(bytes(raw[offset:offset + n]))
        offset += n
    if len(items) != count:
        raise OIPError(400, f"input {name!r}: {len(items)} BYTES elements for a shape of {count}")
    return items


def _flatten(data: Any) -> list:
    """The data of a JSON tensor, flat in row-major order (the spec allows flat and nested lists)."""
    if not isinstance(data, list):
        raise OIPError(400, "tensor data must be a JSON array")
    out: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def _pixels(tensor: dict, binary: memoryview | None, input_shape: tuple[int, int, int]) -> np.ndarray:
    if tensor.get("datatype") != "UINT8":
        raise OIPError(400, f"input {PIXELS!r} must have datatype UINT8, got {tensor.get('datatype')!r}")
    shape = _shape(tensor)
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise OIPError(400, f"input {PIXELS!r} must have shape [-1, {', '.join(map(str, input_shape))}], got {shape}")
    size = int(np.prod(shape))
    if binary is not None:
        if len(binary) != size:
            raise OIPError(400, f"input {PIXELS!r}: {len(binary)} bytes of binary data for shape {shape} ({size})")
        return np.frombuffer(binary, dtype=np.uint8).reshape(shape).copy()
    values = _flatten(tensor.get("data"))
    if len(values) != size:
        raise OIPError(400, f"input {PIXELS!r}: {len(values)} values for shape {shape} ({size})")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in values):
        raise OIPError(400, f"input {PIXELS!r}: UINT8 values must be integers in [0, 255]")
    return np.asarray(values, dtype=np.uint8).reshape(shape)


def _encoded(tensor: dict, binary: memoryview | None) -> list[bytes]:
    if tensor.get("datatype") != "BYTES":
        raise OIPError(400, f"input {ENCODED!r} must have datatype BYTES, got {tensor.get('datatype')!r}")
    shape = _shape(tensor)
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise OIPError(400, f"input {ENCODED!r} must have shape [-1] or [-1, 1], got {shape}")
    if binary is not None:
        return _split_bytes(binary, shape[0], ENCODED)
    values = _flatten(tensor.get("data"))
    if len(values) != shape[0] or not all(isinstance(v, str) for v in values):
        raise OIPError(400, f"input {ENCODED!r}: {shape[0]} base64 strings expected in data")
    try:
        return [base64.b64decode(v, validate=True) for v in values]
    except (binascii.Error, ValueError) as e:
        raise OIPError(400, f"input {ENCODED!r}: in JSON each image is base64 ({e}); raw bytes need binary data")


def _requested_output(request: dict) -> RequestedOutput:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise OIPError(400, "parameters must be a JSON object")
    binary_default = params.get("binary_data_output", False)
    outputs = request.get("outputs")
    if outputs is None:
        return RequestedOutput(binary=bool(binary_default))
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise OIPError(400, "outputs must be a list of objects")
    unknown = [o.get("name") for o in outputs if o.get("name") != OUTPUT]
    if unknown or len(outputs) != 1:
        raise OIPError(400, f"the model has one output, {OUTPUT!r}; asked for {[o.get('name') for o in outputs]}")
    p = outputs[0].get("parameters") or {}
    if not isinstance(p, dict):
        raise OIPError(400, "output parameters must be a JSON object")
    if "shared_memory_region" in p:
        raise OIPError(400, "shared memory is not supported by this server")
    k = p.get("classification", 0)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise OIPError(400, f"classification must be a non-negative integer, got {k!r}")
    return RequestedOutput(binary=bool(p.get("binary_data", binary_default)), classification=k)


def parse_infer_request(body: bytes, header_length: str | None, input_shape: tuple[int, int, int],
                        max_images: int) -> InferRequest:
    """Validate a v2 infer request (JSON, or JSON plus binary tensors) for a model with ``input_shape``."""
    request, tail = _json_header(body, header_length)
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(t, dict) for t in inputs):
        raise OIPError(400, f"inputs must be a list with one tensor, {PIXELS!r} (UINT8) or {ENCODED!r} (BYTES)")
    if len(inputs) != 1 or inputs[0].get("name") not in (PIXELS, ENCODED):
        raise OIPError(400, f"send exactly one input, {PIXELS!r} (UINT8 [-1, C, H, W]) or {ENCODED!r} (BYTES [-1]); "
                            f"got {[t.get('name') for t in inputs]}")
    tensor = inputs[0]
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise OIPError(400, "input parameters must be a JSON object")
    if "shared_memory_region" in params:
        raise OIPError(400, "shared memory is not supported by this server")
    binary = None
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size != len(tail):
            raise OIPError(400, f"binary_data_size {size!r} does not match the {len(tail)} bytes after the JSON header")
        binary = tail
    elif len(tail):
        raise OIPError(400, "binary data after the JSON header but no input declares binary_data_size")
    rid = request.get("id")
    if rid is not None and not isinstance(rid, str):
        raise OIPError(400, "id must be a string")
    if tensor["name"] == PIXELS:
        pixels, encoded = _pixels(tensor, binary, input_shape), None
    else:
        pixels, encoded = None, _encoded(tensor, binary)
    req = InferRequest(rid, pixels, encoded, _requested_output(request))
    if req.count == 0:
        raise OIPError(400, "the request holds no images")
    if req.count > max_images:
        raise OIPError(413, f"{req.count} images in one request; the limit is {max_images}")
    return req


# ------------------------------------------------------------------ responses
def _bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


def encode_infer_response(request: InferRequest, model_name: str, model_version: str, probs: np.ndarray,
                          classes: list[str], parameters: dict | None = None) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or JSON header + binary output with Inference-Header-Content-Length."""
    probs = np.ascontiguousarray(probs, dtype=np.float32)
    out: dict[str, Any] = {"name": OUTPUT}
    k = request.output.classification
    if k:
        k = min(k, probs.shape[1])
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        labels = [[f"{float(probs[i, j])!r}:{j}:{classes[j]}" for j in row] for i, row in enumerate(order)]
        out |= {"datatype": "BYTES", "shape": [len(probs), k]}
        raw = _bytes_tensor([s.encode() for row in labels for s in row]) if request.output.binary else None
        data: Any = [s for row in labels for s in row]
    else:
        out |= {"datatype": "FP32", "shape": list(probs.shape)}
        raw = probs.tobytes() if request.output.binary else None
        data = probs.ravel()
    if raw is None:
        out["data"] = data
    else:
        out["parameters"] = {"binary_data_size": len(raw)}
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": [out]}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    head = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if raw is None:
        return head, {"content-type": "application/json"}
    return head + raw, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(head))}
