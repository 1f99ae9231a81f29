"""The HTTP server's limits: uvicorn's own settings, and those it lacks.

uvicorn bounds header size (h11_max_incomplete_event_size) and idle keep-alive (timeout_keep_alive). Its
limit_concurrency counts open connections with requests, so that silent connections alone could lock every
user out, and it answers in plain text; it is not used. Here, instead:
- requests in flight are counted apart from connections (in_flight_capped): past the cap, a JSON 503 with
  Retry-After;
- connections are capped at twice that, and when a new one would pass the cap, a connection with no
  request in flight (that has sent nothing yet, or waits between keep-alive requests) is closed: one of the
  address holding the most connections, the one idle longest, so that one address's silent connections make
  room for another's. Only when every connection has a request in flight is the new one refused, with the
  same JSON 503;
- a request's headers have a deadline, counted from the connection's start or the end of its previous
  response (uvicorn's keep-alive timer restarts on every byte, so a client that trickles a header byte now
  and then would hold a connection for ever). The body has its own deadline where it is read
  (api_input.read_body).
strict_http refuses what h11 lets through: a request framed two ways, and a head over the cap that arrived in
one piece.
"""
import json
import time
from collections import Counter

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_BYTES = 8_192  # the largest request head (request line and headers)
KEEP_ALIVE = 5  # seconds an idle connection stays open between requests
RETRY_AFTER = 2  # seconds a client told the server is busy should wait


class GuardedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers, and a connection cap that
    closes idle connections before it refuses a new one."""

    def connection_made(self, transport):
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        if len(self.connections) > self.config.max_open and not self._close_the_idlest():
            headers, body = json_error("the server is busy: every connection has a request in flight; try again "
                                       f"in {RETRY_AFTER} s", retry_after=True)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\n" + b"".join(
                k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n" + body)
            transport.close()
            return
        self._expect_request(after=None)

    def on_response_complete(self):
        finished = self.cycle
        self.idle_since = time.monotonic()
        super().on_response_complete()
        self._expect_request(after=finished)

    @property
    def idle(self):
        """No request in flight: none begun (or only its head, arriving), or the last one answered."""
        return self.cycle is None or self.cycle.response_complete

    def _close_the_idlest(self):
        """Close an idle connection of the address that holds the most connections (the one idle longest), so
        that one address's silent connections make room for another's; False if none is idle."""
        idle = [c for c in self.connections if c is not self and c.idle and not c.transport.is_closing()]
        if not idle:
            return False
        held = Counter(_address(c) for c in self.connections)
        min(idle, key=lambda c: (-held[_address(c)], c.idle_since)).transport.close()
        return True

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


def _address(connection):
    return connection.client[0] if connection.client else None


def strict_http(app):
    """app behind the head cap however its bytes arrived: uvicorn caps only a head that arrives in pieces, so a
    larger one in one write is answered here, 431 in the API's JSON error shape, and the connection closed."""
    async def checked(scope, receive, send):
        if scope["type"] == "http" and sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > HEADER_BYTES:
            return await refuse(send, 431, f"the request's headers are over {HEADER_BYTES} bytes")
        await app(scope, receive, send)

    return checked


def in_flight_capped(app, max_requests):
    """app with at most max_requests requests in flight; past that a JSON 503 with Retry-After. Open
    connections are not counted here: an idle one holds no request."""
    in_flight = 0

    async def capped(scope, receive, send):
        nonlocal in_flight
        if scope["type"] != "http":
            return await app(scope, receive, send)
        if in_flight >= max_requests:
            return await refuse(send, 503, f"the server is busy: {in_flight} requests are in flight; try again in "
                                           f"{RETRY_AFTER} s", retry_after=True)
        in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            in_flight -= 1

    return capped


def json_error(message, retry_after=False):
    """(headers, body) of an error in the API's JSON shape, on a connection that closes after it."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return headers + ([(b"retry-after", str(RETRY_AFTER).encode())] if retry_after else []), body


async def refuse(send, status, message, retry_after=False):
    headers, body = json_error(message, retry_after)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def server_config(app, host, port, max_connections, header_timeout) -> uvicorn.Config:
    """uvicorn's settings for serving app: at most max_connections requests in flight and twice that many
    connections open, and header_timeout seconds for a request's headers to arrive."""
    config = uvicorn.Config(in_flight_capped(app, max_connections), host=host, port=port, http=GuardedH11Protocol,
                            log_level="warning", timeout_keep_alive=KEEP_ALIVE,
                            h11_max_incomplete_event_size=HEADER_BYTES)
    config.header_timeout, config.max_open = header_timeout, 2 * max_connections
    return config
