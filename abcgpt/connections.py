"""The HTTP server's limits: uvicorn's own settings, and those it lacks.

uvicorn bounds header size (h11_max_incomplete_event_size), idle keep-alive (timeout_keep_alive) and
requests in flight (limit_concurrency, answered 503). It has no deadline for a request's headers: its
keep-alive timer restarts on every byte, so a client that trickles a header byte now and then holds a
connection (and a file descriptor) for ever. GuardedH11Protocol adds that deadline, counted from the
connection's start or the end of its previous response, and closes connections beyond twice the request
limit at once, so that half-open ones cannot use up the process's files. The body has its own deadline
where it is read (api_input.read_body). strict_http refuses what h11 lets through: a request framed two ways,
and a head over the cap that arrived in one piece.
"""
import json

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_BYTES = 8_192  # the largest request head (request line and headers)
KEEP_ALIVE = 5  # seconds an idle connection stays open between requests


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers and a hard connection cap."""

    def connection_made(self, transport):
        super().connection_made(transport)
        if len(self.connections) > 2 * self.limit_concurrency:
            transport.close()
            return
        self._expect_request(after=None)

    def on_response_complete(self):
        finished = self.cycle
        super().on_response_complete()
        self._expect_request(after=finished)

    def send_400_response(self, msg):
        """A request h11 cannot read (one framed both by Content-Length and Transfer-Encoding among them): 400 in
        the API's JSON error shape, and the connection closed, so nothing after it on the connection is read."""
        headers, body = json_error(f"malformed HTTP request: {msg}")
        for event in (h11.Response(status_code=400, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _expect_request(self, after):
        """Close the connection unless a request newer than `after` has its headers within the deadline."""
        def expire():
            if self.cycle is after and not self.transport.is_closing():
                self.transport.close()

        self.loop.call_later(self.config.header_timeout, expire)


def strict_http(app):
    """app behind the head cap however its bytes arrived: uvicorn caps only a head that arrives in pieces, so a
    larger one in one write is answered here, 431 in the API's JSON error shape, and the connection closed."""
    async def checked(scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > HEADER_BYTES:
            return await refuse(send, 431, f"the request's headers are over {HEADER_BYTES} bytes")
        await app(scope, receive, send)

    return checked


def json_error(message):
    """(headers, body) of an error in the API's JSON shape, on a connection that closes after it."""
    body = json.dumps({"error": message}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")], body


async def refuse(send, status, message):
    headers, body = json_error(message)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def server_config(app, host, port, max_connections, header_timeout) -> uvicorn.Config:
    """uvicorn's settings for serving app: at most max_connections requests at once, and header_timeout
    seconds for a request's headers to arrive."""
    config = uvicorn.Config(app, host=host, port=port, http=GuardedH11Protocol, log_level="warning",
                            limit_concurrency=max_connections, timeout_keep_alive=KEEP_ALIVE,
                            h11_max_incomplete_event_size=HEADER_BYTES)
    config.header_timeout = header_timeout
    return config
