"""The answer to bytes that are not an HTTP request, in the service's own error form.

uvicorn parses a request's framing (the request line, the headers, the chunk sizes) before the app sees it, and
answers what it cannot parse with its own plain-text 400 ("Invalid HTTP request received."). ``semid serve`` runs
uvicorn's protocol classes with that one answer replaced by the JSON every other refusal has (``app._error``'s
``{"error": {"field", "value", "allowed", "message"}}``), so a client reads one error form whatever it sent; the
connection is closed after it, as uvicorn closes it (the stream cannot be read on from a broken frame).
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

BODY = json.dumps({"error": {"field": "request", "value": None, "allowed": "an HTTP/1.1 request",
                             "message": "the request's framing could not be parsed (request line, headers or chunk "
                                        "sizes): send well-formed HTTP/1.1"}}, separators=(",", ":")).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()),
           (b"connection", b"close")]


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol; a request it cannot parse gets :data:`BODY` (400)."""

    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 (uvicorn's text: logged by the caller already)
        import h11

        for event in (h11.Response(status_code=400, headers=HEADERS, reason=b"Bad Request"), h11.Data(data=BODY),
                      h11.EndOfMessage()):  # loop over the answer's three events
            self.transport.write(self.conn.send(event))
        self.transport.close()


def json_protocol() -> type:
    """The protocol class ``semid serve`` passes to uvicorn (``http=``): over httptools where it is installed (what
    uvicorn's "auto" picks), else h11, each with the JSON 400."""
    try:  # (as uvicorn's "auto" decides: an installed httptools that fails to import means h11)
        import httptools  # noqa: F401
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return JsonH11Protocol

    class JsonHttpToolsProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol; a request it cannot parse gets :data:`BODY` (400)."""

        def send_400_response(self, msg: str) -> None:  # noqa: ARG002
            head = [b"HTTP/1.1 400 Bad Request\r\n"]
            for name, value in [*self.server_state.default_headers, *HEADERS]:  # loop over a few headers
                head += [name, b": ", value, b"\r\n"]
            self.transport.write(b"".join([*head, b"\r\n", BODY]))
            self.transport.close()

    return JsonHttpToolsProtocol
