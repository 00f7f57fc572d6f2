"""ASGI middleware of the API: hardening headers and the request body cap."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import openai_images


class NoSniff:
    """`X-Content-Type-Options: nosniff` on every answer: a browser never guesses a type."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_header)


class BodyLimit:
    """Refuse request bodies over a size before anything parses them (413): `max_bytes`, or
    `upload_bytes` on the routes that take images."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        upload_bytes: int = 0,
        upload_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_bytes if scope["path"] in self.upload_paths else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            message = _message(declared, limit)
            body: dict[str, Any] = {"detail": message}
            if scope["path"].startswith(openai_images.PREFIX):  # OpenAI's clients read theirs
                body = openai_images.error_body(status, message, None, None)
            response = JSONResponse(body, status_code=status)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            # A chunked body has no length up front: count it as it arrives.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, _message(None, limit))
            return message

        await self.app(scope, counted, send)


def _message(declared: bytes | None, limit: int) -> str:
    if declared is not None and not declared.isdigit():
        return "Content-Length is not a number"
    return f"request body is larger than {limit} bytes"
