"""Bytes that are not an HTTP request get the service's JSON error (400), from either of uvicorn's parsers, and the
connection is closed; a well-formed request on the same protocol class still reaches the app."""

from __future__ import annotations

import asyncio
import json

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from generator.serving.framing import BODY, JsonH11Protocol, json_protocol


class Transport(asyncio.Transport):
    """What a protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.out, self.closed = b"", False

    def write(self, data: bytes) -> None:
        if not self.closed:  # (a closed transport drops what is written after: asyncio's does)
            self.out += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _app(scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"reached"})


def _answer(cls: type, data: bytes) -> tuple[bytes, bool]:
    async def go() -> tuple[bytes, bool]:
        config = Config(_app, http=cls, log_level="critical")
        config.load()
        proto = cls(config=config, server_state=ServerState(), app_state={})
        t = Transport()
        proto.connection_made(t)
        proto.data_received(data)
        for _ in range(20):  # loop: let the app's task run
            await asyncio.sleep(0.01)
        return t.out, t.closed

    return asyncio.run(go())


PROTOCOLS = {"h11": JsonH11Protocol, "auto": json_protocol()}


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
@pytest.mark.parametrize("data", [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
                                  b"POST /recommend HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"])
def test_bad_framing_gets_the_json_error_and_a_closed_connection(name: str, data: bytes) -> None:
    out, closed = _answer(PROTOCOLS[name], data)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and closed
    assert b"content-type: application/json" in head.lower() and f"content-length: {len(BODY)}".encode() in head.lower()
    error = json.loads(body)["error"]
    assert error["field"] == "request" and error["value"] is None and "HTTP/1.1" in error["message"]


@pytest.mark.parametrize("name", sorted(PROTOCOLS))
def test_a_well_formed_request_still_reaches_the_app(name: str) -> None:
    out, _ = _answer(PROTOCOLS[name], b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b"\r\nreached\r\n" in out


def test_the_service_picks_httptools_where_uvicorn_would() -> None:
    import importlib.util

    want = "HttpTools" if importlib.util.find_spec("httptools") else "H11"
    assert json_protocol().__name__ == f"Json{want}Protocol"


def test_an_httptools_that_fails_to_import_means_h11(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "httptools", None)  # installed but broken: its import raises ImportError
    assert json_protocol() is JsonH11Protocol
