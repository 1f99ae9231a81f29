"""Who may call the API: the Host a request names, the page it comes from, and an optional bearer token.

The threat model is in docs/design.md. In short: a page on another site must not be able to make a visitor's
browser run generations here. A cross-origin page can send a GET, or a POST of a "simple" type (text/plain,
a form), without asking first, and for an iframe, an image or a no-cors fetch a browser sends no Origin; but
it does send Sec-Fetch-Site, so the API refuses "cross-site" (and "same-site", unless allowed). Every
generation, a stream too, is a POST, and a POST must be application/json: for that a browser asks the server
first, and the server never says yes, so even a browser that sends no Sec-Fetch-Site cannot be made to run
one. It checks that Origin, when sent, is this server, and takes only the Host names it serves (a
DNS-rebinding page names its own). Beyond loopback, --token requires
"Authorization: Bearer <token>" on every API request.
"""
import hmac
from urllib.parse import urlsplit

from .api_input import BadInput

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _name(host_header: str) -> str:
    """The host name of a Host header or an Origin's netloc, without its port or brackets."""
    try:
        return urlsplit(f"//{host_header}").hostname or ""
    except ValueError:
        return ""


class Access:
    """hosts: the names the server answers to (None: any); token: the bearer token required, if any."""

    def __init__(self, hosts=LOOPBACK_HOSTS, token=None, allow_same_site=False):
        self.hosts = None if hosts is None else {h.lower().strip("[]") for h in hosts}
        self.token = token
        self.refused_sites = ("cross-site",) if allow_same_site else ("cross-site", "same-site")

    def check(self, http, json_body=False):
        """BadInput (400, 403, 401 or 415) unless this request may call the API."""
        host = http.headers.get("host", "")
        if self.hosts is not None and _name(host) not in self.hosts:
            raise BadInput(f"the Host header {host[:80]!r} is not one this server answers to (see --allow_host)")
        fetched_from = http.headers.get("sec-fetch-site", "").lower()  # what a browser says of the page asking
        if fetched_from in self.refused_sites:
            raise BadInput(f"requests from other sites ({fetched_from}) are refused", 403)
        origin = http.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != host.lower():
            raise BadInput(f"requests from other sites ({origin[:80]}) are refused", 403)
        if self.token is not None:
            scheme, _, given = http.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise BadInput("this server needs its token: send Authorization: Bearer <token>", 401)
        if json_body and http.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise BadInput("send the body as JSON, with Content-Type: application/json", 415)
