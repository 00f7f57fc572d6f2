"""The benchmarks' own client: a load must not be lost to a kept-alive connection that the
server closed as a request went out (seen on the H200: one such disconnect ended a run)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from bench.bench import again


async def serve_closing_first(seen: list[bytes]) -> asyncio.Server:
    """An HTTP server that drops its first connection without answering, as a server closing
    an idle kept-alive connection does, and answers every later request."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        seen.append(request)
        if len(seen) > 1:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_request_dropped_unanswered_is_sent_again() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        server = await serve_closing_first(seen)
        port = server.sockets[0].getsockname()[1]
        async with server, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get("/jobs/x")  # what ended the run
            seen.clear()
            answer = await again(lambda: http.get("/jobs/x"))
        assert answer.status_code == 200 and answer.text == "ok"
        assert len(seen) == 2 and all(r.startswith(b"GET /jobs/x ") for r in seen)

    asyncio.run(main())
