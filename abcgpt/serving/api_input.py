"""What the server reads from a request, strictly: a body capped while it arrives, JSON bounded before it is
parsed, and each field of one type.

A field is a string (prompt, voice), a number (alpha, mix, temperature) or an integer (max_new_tokens, top_k, seed).
A number must be a JSON number, never a string. Numbers JSON can write but a float or a 64-bit integer
cannot hold (1e400, NaN, Infinity, a 5000-digit integer) are refused by the field that holds them.
"""
import asyncio
import json
import math
import re

from starlette.requests import ClientDisconnect

from abcgpt.core.errors import UserError

from .settings import SAMPLING

# the sampling settings' names and kinds are settings.SAMPLING's: a new one is a field here at once
FIELDS = {"prompt": str, "alpha": float, "mix": float, "voice": str, "max_new_tokens": int, "seed": int, **SAMPLING}
MAX_DEPTH = 4  # a request is one flat object; deeper JSON is refused before the parser recurses into it
INTEGER_LIMIT = 2**63  # integers are 64-bit, as torch stores them
JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class BadInput(UserError):
    """A request the server refuses, with the HTTP status to answer it with."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


class ClientGone(Exception):
    """The client closed its connection before its request had arrived."""


class Unrepresentable:
    """A JSON number that no float or 64-bit integer holds; its field refuses it by name."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text if len(self.text) <= 24 else f"a number of {len(self.text)} characters"


async def read_body(http, cap, timeout):
    """The body, at most cap bytes (413: up front from Content-Length, else as soon as it passes the cap),
    arriving within timeout seconds (408)."""
    length = http.headers.get("content-length")
    if length is not None:
        if not re.fullmatch(r"[0-9]{1,18}", length, re.ASCII):
            raise BadInput(f"Content-Length must be a number of bytes, got {length[:40]!r}")
        if int(length) > cap:
            raise BadInput(f"the request body is over {cap} bytes (Content-Length {int(length):,})", 413)
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in http.stream():
                body += chunk
                if len(body) > cap:
                    raise BadInput(f"the request body is over {cap} bytes", 413)
    except TimeoutError:
        raise BadInput(f"the request body did not arrive within {timeout:g} s", 408) from None
    except ClientDisconnect:
        raise ClientGone() from None
    return bytes(body)


def parse_json(body: bytes) -> dict:
    """The object a JSON body holds, nested at most MAX_DEPTH deep."""
    depth = deepest = 0
    for bracket in JSON_STRING.sub(b"", body).translate(None, bytes(set(range(256)) - set(b"[]{}"))):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise BadInput(f"the JSON is nested {deepest} levels deep; a request is one flat object")
    try:
        fields = json.loads(body, parse_constant=Unrepresentable, parse_float=_json_float, parse_int=_json_int)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"malformed JSON: {e}") from None
    if not isinstance(fields, dict):
        raise BadInput("the body must be a JSON object")
    return fields


def _json_float(text):
    value = float(text)
    return value if math.isfinite(value) else Unrepresentable(text)


def _json_int(text):
    return int(text) if len(text) <= 20 and abs(int(text)) < INTEGER_LIMIT else Unrepresentable(text)


def check_fields(fields: dict) -> None:
    """Known field names only."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadInput(f"unknown field(s): {', '.join(unknown)}; known are {', '.join(sorted(FIELDS))}")


def number(fields: dict, name: str, default):
    """fields[name] as its kind (FIELDS), finite and in 64-bit range; default where it is absent."""
    if name not in fields:
        return default
    value, kind = fields[name], FIELDS[name]
    wanted = "an integer" if kind is int else "a number"
    if isinstance(value, Unrepresentable):
        raise BadInput(f"{name} must be {wanted} that fits in 64 bits, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise BadInput(f"{name} must be {wanted}, got {value!r}")
    return kind(value)
