"""The hot path: ``POST /classify`` goes from the app's own middleware straight to its endpoint.

Per request, FastAPI and Starlette match the path against every router (one ``_IncludedRouter`` each), solve the
endpoint's dependencies (signature inspection, a pydantic validation per query parameter), and wrap the call in
two exit stacks and two exception wrappers; for ``POST /classify`` of a 28×28 PNG that cost more than decoding the
image and running the model (issue 12's profile). ``HotRoute``, the innermost middleware, hands that one request
to its endpoint ``(request) -> Response`` directly and answers its ``HTTPException`` / ``RequestValidationError``
with the app's own exception handlers, so the answer is the same as through the router. The route stays declared
in its router, where OpenAPI documents it and where everything else (other methods, a route with dependencies
such as ``--api-key``, which is then not short-cut) goes the usual way. Query parameters are declared once here:
``openapi()`` documents them, ``parse()`` reads and checks them and answers a bad value with FastAPI's 422 shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


def hot_route(router: APIRouter, method: str, path: str) -> APIRoute | None:
    """``router``'s route for ``method path`` if it can be short-cut: an endpoint without dependencies (include
    the router without dependencies too)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return None if route.dependant.dependencies else route
    return None


class HotRoute:
    """Pure ASGI, the innermost middleware: ``route``'s requests straight to its endpoint (module doc)."""

    def __init__(self, app, fastapi_app: FastAPI, route: APIRoute, method: str = "POST"):
        self.app, self.fastapi_app, self.route, self.method = app, fastapi_app, route, method
        self.path, self.endpoint = route.path, route.endpoint

    def _handler(self, exc: Exception):
        for cls in type(exc).__mro__:
            handler = self.fastapi_app.exception_handlers.get(cls)
            if handler is not None:
                return handler
        raise exc

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != self.method:
            return await self.app(scope, receive, send)
        scope["route"] = self.route  # as the router sets it (the request counter labels by it)
        request = Request(scope, receive, send)
        try:
            response = await self.endpoint(request)
        except (HTTPException, RequestValidationError) as exc:
            response = await self._handler(exc)(request, exc)
        await response(scope, receive, send)


@dataclass(frozen=True)
class IntQuery:
    name: str
    default: int
    ge: int
    le: int
    description: str

    def openapi(self) -> dict[str, Any]:
        return {"name": self.name, "in": "query", "required": False, "description": self.description,
                "schema": {"type": "integer", "minimum": self.ge, "maximum": self.le, "default": self.default}}

    def parse(self, params: Mapping[str, str]) -> int:
        text = params.get(self.name)
        if text is None:
            return self.default
        try:
            value = int(text)
        except ValueError:
            raise _invalid(self.name, "Input should be a valid integer, unable to parse string as an integer",
                           "int_parsing")
        if not self.ge <= value <= self.le:
            raise _invalid(self.name, f"Input should be between {self.ge} and {self.le}", "out_of_range")
        return value


@dataclass(frozen=True)
class StrQuery:
    name: str
    description: str

    def openapi(self) -> dict[str, Any]:
        return {"name": self.name, "in": "query", "required": False, "description": self.description,
                "schema": {"type": "string"}}

    def parse(self, params: Mapping[str, str]) -> str | None:
        return params.get(self.name)


def _invalid(name: str, msg: str, kind: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", name), "msg": msg, "type": kind}])


def openapi_parameters(*params: IntQuery | StrQuery) -> dict[str, Any]:
    """``openapi_extra`` of a route whose parameters are read by hand."""
    return {"parameters": [p.openapi() for p in params]}
