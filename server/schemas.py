"""Response models (what /classify answers, as documented in the OpenAPI schema) and the orjson response class."""
from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ClassScore(BaseModel):
    class_id: int
    label: str
    probability: float


class Prediction(BaseModel):
    class_id: int
    label: str
    probability: float
    top_k: list[ClassScore]


class ClassifyResponse(BaseModel):
    model: dict[str, Any]
    predictions: list[Prediction]
    latency_ms: float
    decode_ms: float
    queue_ms: float
    inference_ms: float


class FastJSONResponse(JSONResponse):
    """JSON rendered by orjson (several times faster than the json module; FastAPI's ORJSONResponse is deprecated).

    A ``JSONResponse`` subclass so that FastAPI documents the response models in OpenAPI (for a plain
    ``Response`` subclass it declares every 200 body a string).
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
