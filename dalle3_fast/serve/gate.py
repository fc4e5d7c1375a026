"""What a request must pass before its body is read: the API key, and a cap on the body's size.

A plain ASGI middleware (not ``@app.middleware``, whose wrapper hides a client's disconnect from the endpoint).
A ``Content-Length`` over the cap is answered 413 at once, without reading a byte of the body; a body without
one (chunked) is counted as it arrives and refused as soon as it passes the cap. FastAPI's own
``max_body_size`` answers in plain text; here every answer is OpenAI's error envelope.
"""
from __future__ import annotations

from typing import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dalle3_fast.serve.errors import APIError, PayloadTooLarge, error_response
from dalle3_fast.serve.policy import check_api_key


class RequestGate:
    """``api_key``: required as Bearer token on /v1/ (except /v1/files/); ``body_limit(path)``: bytes allowed."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, body_limit: Callable[[str], int]):
        self.app, self.api_key, self.body_limit = app, api_key, body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, headers = scope["path"], Headers(scope=scope)
        if path.startswith("/v1/") and not path.startswith("/v1/files/"):
            try:
                check_api_key(self.api_key, headers.get("authorization"))
            except APIError as exc:
                await exc.response()(scope, receive, send)
                return
        limit = self.body_limit(path)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            too_large = PayloadTooLarge(limit)
            await error_response(413, too_large.detail, code="request_too_large",
                                 headers=too_large.headers)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(limit)
            return message

        await self.app(scope, counted, send)
