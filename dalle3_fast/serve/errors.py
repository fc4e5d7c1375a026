"""OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

User input never reaches a 500: validation errors (ours and FastAPI's) are 400s naming the parameter, and text
echoed from a request (which may hold unpaired surrogates that UTF-8 cannot encode) is escaped first.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("dalle3_fast.serve")


class APIError(Exception):
    """An error answered to the client as-is."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def invalid(param: str, message: str, code: str | None = None) -> APIError:
    """A 400 naming ``param``."""
    return APIError(400, message, param=param, code=code)


class PayloadTooLarge(StarletteHTTPException):
    """The request body is over the server's cap (413). An HTTPException, so that FastAPI re-raises it when it is
    raised while the body is read instead of turning it into a 400."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is larger than this server accepts ({limit} bytes).",
                         headers={"Connection": "close"})


def printable(text: str) -> str:
    """``text`` with whatever UTF-8 cannot encode (unpaired surrogates) escaped as ``\\udXXX``."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    fields = {"message": message, "type": type, "param": param, "code": code}
    body = {"error": {k: printable(v) if isinstance(v, str) else v for k, v in fields.items()}}
    return JSONResponse(body, status_code=status, headers=headers)


_JSON_TYPES = {"int": "an integer", "string": "a string", "bool": "a boolean", "float": "a number",
               "list": "an array", "dict": "an object", "model": "an object"}


def _json_type(value) -> str:
    for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"),
                       (list, "an array"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _param_of(loc) -> str | None:
    """FastAPI's error location ("body", "n") / ("body", "image") -> "n" / "image"."""
    names = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form") and not isinstance(p, int)]
    return names[0] if names else None


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    param = _param_of(first.get("loc", ()))
    if first.get("type") == "json_invalid" or param is None:
        return error_response(400, f"The request body is not valid: {first.get('msg')}", param=param)
    expected = _JSON_TYPES.get(str(first.get("type", "")).removesuffix("_type"))
    if expected is not None:  # OpenAI's wording for a wrongly typed field
        return error_response(400, f"Invalid type for '{param}': expected {expected}, but got "
                                   f"{_json_type(first.get('input'))} instead.", param=param, code="invalid_type")
    return error_response(400, f"Invalid value for '{param}': {first.get('msg')}", param=param,
                          code="missing_required_parameter" if first.get("type") == "missing" else None)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if isinstance(exc, PayloadTooLarge):
        return error_response(413, exc.detail, code="request_too_large", headers=exc.headers)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "The server had an error while processing your request.", type="server_error")


def install_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
