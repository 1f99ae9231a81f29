"""The live dial: its API, batched decoding of many users at once, a real server, and the page in a browser."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("starlette")
import httpx2  # noqa: E402
import uvicorn  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from abcgpt.model.sampling import Generation  # noqa: E402
from abcgpt.serving.access import Access  # noqa: E402
from abcgpt.serving.batching import Request  # noqa: E402
from abcgpt.serving.connections import server_config  # noqa: E402
from abcgpt.serving.server import Service, create_app  # noqa: E402
from abcgpt.training.run import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(trained_checkpoint):
    return load_model(trained_checkpoint)


@pytest.fixture(scope="module")
def client(loaded):
    service = Service(*loaded, max_batch=8, max_new_tokens=60, max_body=2000)
    with TestClient(create_app(service), base_url="http://localhost") as client:
        client.service = service
        yield client


def test_info_names_the_sources_and_the_model(client, loaded):
    info = client.get("/api/info").json()
    assert [s["name"] for s in info["sources"]] == ["stories", "plays"]
    assert [s["alpha"] for s in info["sources"]] == [0.0, 1.0]
    assert info["model"]["n_embd"] == loaded[0].config.n_embd and info["step"] == 6
    assert info["calibrated"] is False and info["max_new_tokens"] == 60


def test_the_page_has_a_slider_named_by_the_sources_and_a_compare_view(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for part in ('type="range"', 'id="prompt"', 'id="temperature"', 'id="top_k"', 'id="length"', 'id="seed"',
                 "AbortController", 'class="compare"', "/api/info"):
        assert part in page.text


def test_the_same_seed_gives_the_same_text_and_what_sample_py_prints(client, trained_checkpoint):
    body = {"prompt": "one day", "alpha": 0.3, "max_new_tokens": 40, "temperature": 0.9, "top_k": 20, "seed": 11}
    first, second = client.post("/api/generate", json=body).json(), client.post("/api/generate", json=body).json()
    assert first["text"] == second["text"] and first["tokens"] == 40 and first["alpha"] == 0.3
    other = client.post("/api/generate", json={**body, "seed": 12}).json()
    assert other["text"] != first["text"]
    printed = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(trained_checkpoint), "--alpha", "0.3", "--start", "one day",
         "--max_new_tokens", "40", "--temperature", "0.9", "--top_k", "20", "--seed", "11"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert printed.stdout.split("\n", 1)[1] == "one day" + first["text"] + "\n"


def test_the_stream_sends_the_same_text_token_by_token(client):
    body = {"prompt": "one day", "alpha": 0.8, "max_new_tokens": 25, "seed": 3}
    pieces, done = [], None
    with client.stream("POST", "/api/stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        event = "message"
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if event == "done":
                    done = data
                else:
                    pieces.append(data["text"])
    assert len(pieces) == 25 and done["tokens"] == 25
    expected = client.post("/api/generate", json=body).json()
    assert "".join(pieces) == done["text"] == expected["text"]


class HalfCharacters:
    """A tokenizer whose tokens are bytes, not characters, as GPT-2's BPE can be: an even token is the lead byte
    of a two-byte character and an odd one a continuation byte, so a character can span two tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def decode(self, ids):
        return bytes(0xC3 if i % 2 == 0 else 0x80 + i % 64 for i in ids).decode("utf-8", errors="replace")


def test_a_stream_sends_whole_characters_when_tokens_split_them(own_client):
    client, service = own_client()
    service.tokenizer = HalfCharacters(service.tokenizer)
    params = {"prompt": "one day", "alpha": 0.5, "max_new_tokens": 60, "seed": 4, "temperature": 2}
    events = stream_events(client, params)
    deltas = [data["text"] for event, data in events if event == "message"]
    done = next(data for event, data in events if event == "done")
    assert "".join(deltas) == done["text"]
    assert any(0xC0 <= ord(c) < 0x100 for c in done["text"])  # some character did span two tokens
    assert not any(delta.endswith("\ufffd") and later.startswith(tuple(chr(0xC0 + k) for k in range(64)))
                   for delta, later in zip(deltas, deltas[1:]))  # never a half sent as a replacement, then mended


@pytest.mark.parametrize("body, message", [
    ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
    ({"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
    ({"alpha": "high"}, "alpha must be a number, got 'high'"),
    ({"alpha": True}, "alpha must be a number, got True"),
    ({"alpha": None}, "alpha must be a number, got None"),
    ({"mix": 0.3}, "this checkpoint has no calibrated dial"),
    ({"mix": 2}, "mix must be in [0, 1], got 2.0"),
    ({"alpha": 0.2, "mix": 0.3}, "give one of alpha, mix and voice, not alpha and mix"),
    ({"alpha": 0.2, "voice": "plays"}, "give one of alpha, mix and voice, not alpha and voice"),
    ({"voice": "psalms"}, "no source named 'psalms': this checkpoint's sources are stories, plays"),
    ({"voice": 3}, "voice must be a string"),
    ({"voice": "stories=-2"}, "voice 'stories=-2': weights must be finite and not negative, got -2"),
    ({"prompt": "one Q day €"}, "the prompt has 2 character(s) not in the vocabulary: 'Q', '€'"),
    ({"prompt": "one day " * 10}, "the prompt is 80 tokens long; the context holds 16"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": 7}, "prompt must be a non-empty string"),
    ({"max_new_tokens": 61}, "max_new_tokens must be an integer from 1 to 60, got 61"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer from 1 to 60, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
    ({"temperature": 0}, "temperature must be a number above 0 and at most 100, got 0.0"),
    ({"temperature": 1e300}, "temperature must be a number above 0 and at most 100, got 1e+300"),  # as sample.py
    ({"top_k": 0}, "top_k must be an integer from 1 to 1,048,576, got 0"),
    ({"top_k": 10**18}, "top_k must be an integer from 1 to 1,048,576, got 1000000000000000000"),
    ({"seed": -1}, "seed must be an integer from 0 to 2**63 - 1, got -1"),
    ({"alpha": 0.5, "color": "red"}, "unknown field(s): color"),
    ({"top_k": 1.0}, "top_k must be an integer, got 1.0"),
    ({"seed": 2**63}, "seed must be an integer that fits in 64 bits, got 9223372036854775808"),
    ({"temperature": 1e-400}, "temperature must be a number above 0 and at most 100, got 0.0"),  # JSON 1e-400 is 0.0
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(client, body, message):
    response = client.post("/api/generate", json={"prompt": "one day", **body})
    assert response.status_code == 400 and response.json()["error"].startswith(message)
    stream = client.post("/api/stream", json={"prompt": "one day", **body})
    assert stream.status_code == 400 and stream.json()["error"].startswith(message)
    assert client.post("/api/generate", json={"prompt": "one day", "max_new_tokens": 3}).status_code == 200


JSON = {"content-type": "application/json"}


def test_malformed_oversized_and_non_object_bodies(client):
    for raw, status, message in [(b"{bad json", 400, "malformed JSON"), (b"[1, 2]", 400, "must be a JSON object"),
                                 (b'{"prompt": "' + b"a" * 3000 + b'"}', 413, "over 2000 bytes")]:
        response = client.post("/api/generate", content=raw, headers=JSON)
        assert response.status_code == status and message in response.json()["error"]
    assert client.post("/api/generate", json={"prompt": "one day", "max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize("raw, message", [  # each once answered 500
    (b'{"alpha": "0.5"}', "alpha must be a number, got '0.5'"),  # in JSON, strings are not numbers
    (b'{"prompt": "one day", "seed": 1e400}', "seed must be an integer that fits in 64 bits, got 1e400"),
    (b'{"max_new_tokens": NaN}', "max_new_tokens must be an integer that fits in 64 bits, got NaN"),
    (b'{"top_k": Infinity}', "top_k must be an integer that fits in 64 bits, got Infinity"),
    (b'{"seed": -Infinity}', "seed must be an integer that fits in 64 bits, got -Infinity"),
    (b'{"alpha": NaN}', "alpha must be a number that fits in 64 bits, got NaN"),
    (b'{"seed": ' + b"7" * 5000 + b"}",
     "seed must be an integer that fits in 64 bits, got a number of 5000 characters"),
    (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", "the JSON is nested 1001 levels deep"),
    (b'{"prompt": "one day", "seed": 7, "seed": 8, "x": {"y": [1, {"z": 2}]}}', "unknown field(s): x"),
])
def test_json_that_no_field_can_hold_is_refused_by_name(own_client, raw, message):
    client, _ = own_client()  # the default body cap, 16 KB
    response = client.post("/api/generate", content=raw, headers=JSON)
    assert response.status_code == 400 and response.json()["error"].startswith(message)


def test_a_stream_is_a_json_post_never_a_get_that_any_page_could_make(client, monkeypatch):
    """A GET needs no preflight from another site's page (an iframe, an image, an EventSource), and a browser too
    old to send Sec-Fetch-Site would send it unmarked: so no GET runs a generation."""
    submitted, submit = [], client.service.decoder.submit
    monkeypatch.setattr(client.service.decoder, "submit", lambda request: (submitted.append(request), submit(request)))
    refused = client.get("/api/stream?prompt=one+day&max_new_tokens=3")
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"
    assert refused.json()["error"].startswith("POST the request to /api/stream as JSON") and not submitted
    assert client.post("/api/stream", json={"prompt": "one day", "max_new_tokens": 3}).status_code == 200
    assert len(submitted) == 1


def test_a_hostile_temperature_gets_its_full_text(client):
    """A temperature of 1e-40 once made a step fail for every request in it; now it samples greedily."""
    body = {"prompt": "one day", "max_new_tokens": 30, "seed": 1}
    hostile = client.post("/api/generate", json={**body, "temperature": 1e-40}).json()
    greedy = client.post("/api/generate", json={**body, "top_k": 1}).json()
    assert hostile["tokens"] == 30 and hostile["text"] == greedy["text"]


def fails_at_alpha(decoder, alpha):
    """decoder's forward, but one with a row at `alpha` fails (as a step that meets a fault would)."""
    forward = decoder._forward

    def failing(requests, idx, slots):
        if any(r.generation.dial == alpha for r in requests):
            raise RuntimeError("the device failed")
        return forward(requests, idx, slots)

    return failing


@pytest.fixture
def own_client(loaded):
    """A client of its own service, whose settings a test may change."""
    def make(**settings):
        service = Service(*loaded, **{"max_batch": 4, "max_new_tokens": 60, **settings})
        client = TestClient(create_app(service), base_url="http://localhost").__enter__()
        made.append(client)
        return client, service

    made = []
    yield make
    for client in made:
        client.__exit__(None, None, None)


def stream_events(client, body, headers=None):
    """The (event, data) pairs of one stream."""
    events, event = [], "message"
    with client.stream("POST", "/api/stream", json=body, headers=headers) as response:
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[len("data: "):])))
                event = "message"
    return events


def test_a_failed_step_is_a_5xx_or_an_error_event_never_a_short_200(own_client, monkeypatch):
    client, service = own_client()
    monkeypatch.setattr(service.decoder, "_forward", fails_at_alpha(service.decoder, 0.25))
    failed = client.post("/api/generate", json={"prompt": "one day", "alpha": 0.25, "max_new_tokens": 20})
    assert failed.status_code == 500 and failed.json()["error"] == "decoding failed: RuntimeError: the device failed"
    events = stream_events(client, {"prompt": "one day", "alpha": 0.25, "max_new_tokens": 20})
    assert events == [("error", {"error": "decoding failed: RuntimeError: the device failed"})]
    fine = client.post("/api/generate", json={"prompt": "one day", "alpha": 0.5, "max_new_tokens": 20})
    assert fine.status_code == 200 and fine.json()["tokens"] == 20


def test_a_request_past_its_deadline_gets_504_or_an_error_event(own_client):
    client, _ = own_client(timeout=0.2, max_new_tokens=10**6)
    late = client.post("/api/generate", json={"prompt": "one day", "max_new_tokens": 10**6})
    assert late.status_code == 504 and late.json()["error"].startswith("the deadline of 0.2 s passed after")
    assert 0 < late.json()["tokens"] < 10**6
    events = stream_events(client, {"prompt": "one day", "max_new_tokens": 10**6})
    assert events[-1][0] == "error" and "deadline of 0.2 s" in events[-1][1]["error"]


def test_a_full_queue_answers_503_with_retry_after(own_client):
    client, service = own_client(max_queue=1)
    service.decoder.pending.append(Request([4], Generation(0.5, max_new_tokens=10**6)))  # waits: the decoder sleeps
    response = client.post("/api/generate", json={"prompt": "one day"})
    assert response.status_code == 503 and response.headers["retry-after"] == "2"
    assert "the server is busy (1 requests are waiting)" in response.json()["error"]
    assert client.post("/api/stream", json={"prompt": "one day"}).status_code == 503


def test_only_json_from_this_origin_at_a_served_host_is_taken(client):
    body = {"prompt": "one day", "max_new_tokens": 2}
    as_text = client.post("/api/generate", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert as_text.status_code == 415 and "Content-Type: application/json" in as_text.json()["error"]
    elsewhere = client.post("/api/generate", json=body, headers={"origin": "https://evil.example"})
    assert elsewhere.status_code == 403 and "https://evil.example" in elsewhere.json()["error"]
    assert client.post("/api/stream", json=body, headers={"origin": "null"}).status_code == 403
    streamed_as_text = client.post("/api/stream", content=json.dumps(body), headers={"content-type": "text/plain"})
    assert streamed_as_text.status_code == 415
    rebound = client.get("/api/info", headers={"host": "evil.example:8000"})
    assert rebound.status_code == 400 and "'evil.example:8000'" in rebound.json()["error"]
    same = client.post("/api/generate", json=body, headers={"origin": "http://localhost"})
    assert same.status_code == 200


def test_a_page_on_another_site_cannot_run_a_stream_even_without_an_origin(own_client):
    """An iframe, an image or a no-cors fetch sends no Origin, but a browser says Sec-Fetch-Site."""
    client, _ = own_client()
    params = {"prompt": "one day", "max_new_tokens": 2}
    cross = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors"}
    for route in ("/api/stream", "/api/generate"):
        refused = client.post(route, json=params, headers=cross)
        assert refused.status_code == 403 and "requests from other sites (cross-site)" in refused.json()["error"]
    assert client.get("/api/info", headers=cross).status_code == 403
    assert client.post("/api/stream", json=params, headers={"sec-fetch-site": "same-site"}).status_code == 403
    assert client.post("/api/stream", json=params, headers={"sec-fetch-site": "same-origin"}).status_code == 200
    subdomains, _ = own_client(access=Access(allow_same_site=True))
    assert subdomains.get("/api/info", headers={"sec-fetch-site": "same-site"}).status_code == 200
    assert subdomains.get("/api/info", headers={"sec-fetch-site": "cross-site"}).status_code == 403


def test_every_error_is_json_and_no_location_is_built_from_the_host(client):
    missing = client.get("/api/nothing")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    wrong = client.get("/api/generate")
    assert wrong.status_code == 405 and wrong.json() == {"error": "Method Not Allowed"}
    slashed = client.get("/api/info/", headers={"host": "localhost"}, follow_redirects=False)
    assert slashed.status_code == 404 and "location" not in slashed.headers


def test_a_token_is_required_when_one_is_set(own_client):
    client, _ = own_client(access=Access(token="s3cret"))
    assert client.get("/").status_code == 200  # the page itself; it sends the token from its address
    refused = client.get("/api/info")
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert client.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/info", headers={"authorization": "Bearer s3cret"}).status_code == 200


# a real server on a free local port
@contextmanager
def serve_on_a_free_port(service, max_connections=32):
    """uvicorn with the server's own limits (a 1-second header deadline), on a thread; it records the
    requests its decoder was given and counts the hits on each path."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    submitted, hits, submit = [], Counter(), service.decoder.submit
    service.decoder.submit = lambda request: (submit(request), submitted.append(request))[0]
    app = create_app(service)

    async def counted(scope, receive, send):
        hits[scope.get("path")] += 1
        await app(scope, receive, send)

    running = uvicorn.Server(server_config(counted, "127.0.0.1", port, max_connections, header_timeout=1.0))
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not running.started and time.time() < deadline:
        time.sleep(0.05)
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, service=service, submitted=submitted, hits=hits)
    running.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(loaded):
    with serve_on_a_free_port(Service(*loaded, max_batch=4, max_new_tokens=400, body_timeout=1.0)) as running:
        yield running


def until(condition, seconds=20):
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_several_clients_at_once_are_decoded_together(server):
    bodies = [{"prompt": "one day", "alpha": a, "max_new_tokens": 60, "seed": i, "top_k": 1}
              for i, a in enumerate([0.0, 0.3, 0.6, 1.0])]
    results = [None] * len(bodies)

    def call(i):
        with from_address(f"127.0.0.{10 + i}") as client:  # users of their own: one may decode one at a time
            results[i] = client.post(f"{server.url}/api/generate", json=bodies[i]).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server.service.decoder.largest_batch >= 2
    for body, result in zip(bodies, results):  # greedy: the same text as alone
        assert result["text"] == httpx2.post(f"{server.url}/api/generate", json=body, timeout=60).json()["text"]


def test_a_client_that_disconnects_frees_its_slot(server, monkeypatch):
    decoder, step, looked = server.service.decoder, server.service.decoder._step, threading.Event()

    def held(*args):
        """Once the request has its first token it waits in its slot until the test has looked: the context (16)
        is full within a few steps, and a request then leaves its slot for windowed steps."""
        if any(r.tokens for r in decoder.active):
            looked.wait(20)
        return step(*args)

    monkeypatch.setattr(decoder, "_step", held)
    try:
        with httpx2.stream("POST", f"{server.url}/api/stream", json={"prompt": "one day", "max_new_tokens": 400},
                           timeout=60) as response:
            next(response.iter_lines())
            assert decoder.cache.used == 1
    finally:
        looked.set()  # never leave the shared server's decoder waiting
    assert until(lambda: not decoder.active) and decoder.cache.used == 0


def raw_request(port, head, body=b""):
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head.replace(b"\n", b"\r\n") + b"\r\n" + body)
    return connection


def test_a_post_whose_client_leaves_stops_within_a_step(server, monkeypatch):
    """The server notices the closed connection while the decoder steps on in its own thread; from then on the
    request gets at most the token of the step in progress, and its slot is freed."""
    import abcgpt.serving.server

    noticed, cancel, step = {}, abcgpt.serving.server.cancel_when_gone, server.service.decoder._step

    async def watched(http, request):
        await cancel(http, request)
        noticed["tokens"] = len(request.tokens)

    monkeypatch.setattr(abcgpt.serving.server, "cancel_when_gone", watched)
    monkeypatch.setattr(server.service.decoder, "_step", lambda *args: (time.sleep(0.005), step(*args))[1])
    body = json.dumps({"prompt": "one day", "max_new_tokens": 400, "seed": 5}).encode()
    head = b"POST /api/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    before = len(server.submitted)  # this test's request, not an earlier one
    connection = raw_request(server.port, head + b"Content-Length: %d\n" % len(body), body)
    assert until(lambda: len(server.submitted) > before and len(server.submitted[before].tokens) >= 5)
    request = server.submitted[before]
    connection.close()
    assert until(lambda: request not in server.service.decoder.active)
    assert request.cancelled and len(request.tokens) <= noticed["tokens"] + 1 < 400


def answer(connection):
    """The response on a raw connection: its head and as much body as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data and (chunk := connection.recv(4096)):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next((line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")), b"0"))
    while len(body) < length and (chunk := connection.recv(4096)):
        body += chunk
    return head + b"\r\n\r\n" + body


def test_a_body_over_the_cap_is_refused_before_it_is_read(server):
    head = b"POST /api/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    with raw_request(server.port, head + b"Content-Length: 536870912\n") as connection:  # and no body
        refused = answer(connection)
    assert refused.startswith(b"HTTP/1.1 413") and b"Content-Length 536,870,912" in refused
    with raw_request(server.port, head + b"Transfer-Encoding: chunked\n") as connection:
        sent, chunk = 0, b"1000\r\n" + b"a" * 4096 + b"\r\n"
        try:
            while sent < 2**20:  # the answer comes once the body passes 16 KB, long before 1 MB
                connection.sendall(chunk)
                sent += 4096
        except OSError:  # the server closed the connection after answering
            pass
        refused = answer(connection)
    assert refused.startswith(b"HTTP/1.1 413") and b"over 16384 bytes" in refused


def test_half_sent_headers_and_bodies_are_cut_off_at_the_deadline(server):
    slow_head = raw_request(server.port, b"GET /api/info HTTP/1.1\nHost: 127.0.0.1")
    slow_body = raw_request(server.port, b"POST /api/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: "
                            b"application/json\nContent-Length: 100\n", b'{"prompt"')
    started = time.time()
    try:
        for byte in b"X-Slow: 1\r\nX-Slower: 2":  # a header byte now and then restarts no deadline
            time.sleep(0.2)
            slow_head.sendall(bytes([byte]))
        assert slow_head.recv(4096) == b""  # closed, with no answer
    except ConnectionError:
        pass
    assert time.time() - started < 3
    assert answer(slow_body).startswith(b"HTTP/1.1 408")
    slow_head.close()
    slow_body.close()


NO_CHROMIUM = "needs Debian's chromium and chromium-driver"


def chromium():
    for browser, driver in (("/usr/bin/chromium", "/usr/bin/chromedriver"),):
        if Path(browser).exists() and Path(driver).exists():
            return browser, driver
    return None


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver

    if chromium() is None:  # every test that drives the page, marked or not
        pytest.skip(NO_CHROMIUM)
    binary, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Driver(driver_path), options=options)
    yield driver
    driver.quit()


def fill(driver, field, text):
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.ID, field)
    element.clear()
    element.send_keys(text)


needs_chromium = pytest.mark.skipif(chromium() is None, reason=NO_CHROMIUM)


@pytest.mark.browser
@needs_chromium
def test_the_page_in_a_browser(server, browser, tmp_path):
    """Headless Chromium opens the page, moves the slider, generates, and reads the streamed text."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.ID, "left").text == "stories")
    assert browser.find_element(By.ID, "right").text == "plays"
    browser.find_element(By.ID, "dial").send_keys(Keys.END)  # the slider to its right end: alpha 1
    assert browser.find_element(By.ID, "dial-value").text == "1.00"
    fill(browser, "prompt", "one day")
    fill(browser, "length", "60")
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(d.find_element(By.ID, "output").text) >= len("one day") + 40)
    assert browser.find_element(By.ID, "output").text.startswith("one day")
    browser.find_element(By.ID, "compare-button").click()
    wait.until(lambda d: all(len(o.text) > 20 for o in d.find_elements(By.CLASS_NAME, "compare-output")))
    shot = os.environ.get("ABCGPT_SCREENSHOT")  # set to refresh the README's picture
    if shot:
        browser.save_screenshot(str(tmp_path / "page.png"))
        shutil.copy(tmp_path / "page.png", shot)


@pytest.mark.browser
@needs_chromium
def test_a_new_generate_stops_the_last_stream_and_a_refusal_is_sent_once(server, browser, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    step = server.service.decoder._step

    def slow_step(*args):  # at least 4 s for 400 tokens: on a fast idle machine the first stream ended before
        time.sleep(0.01)   # the second click reached the server
        return step(*args)

    monkeypatch.setattr(server.service.decoder, "_step", slow_step)
    browser.get(server.url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda d: d.find_element(By.ID, "left").text == "stories")
    fill(browser, "prompt", "one day")
    fill(browser, "length", "400")
    fill(browser, "top_k", "1")
    before = len(server.submitted)
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: len(server.submitted) > before and len(server.submitted[-1].tokens) >= 3)
    browser.find_element(By.ID, "generate").click()
    output = browser.find_element(By.ID, "output")
    wait.until(lambda d: output.get_attribute("data-done"))
    assert len(server.submitted) == before + 2  # one request a click (a shared cache entry once made three)
    first, second = server.submitted[before:]
    assert first.cancelled and len(first.tokens) < 400 and len(second.tokens) == 400
    alone = httpx2.post(f"{server.url}/api/generate", json={"prompt": "one day", "max_new_tokens": 400, "top_k": 1,
                        "seed": 1337, "alpha": 0.5, "temperature": second.generation.sampling.temperature}, timeout=60).json()
    assert output.get_attribute("textContent") == "one day" + alone["text"]  # one stream's text, not two interleaved

    streams = server.hits["/api/stream"]
    fill(browser, "prompt", "one Q day")  # Q is not in the vocabulary: refused
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: d.find_element(By.ID, "error").text)
    assert "not in the vocabulary: 'Q'" in browser.find_element(By.ID, "error").text
    time.sleep(1)  # time for a retry, were there one
    assert server.hits["/api/stream"] == streams + 1


def test_on_the_line_a_voice_is_its_source_s_alpha_and_all_opens_every_gate(client):
    body = {"prompt": "one day", "max_new_tokens": 30, "seed": 21}
    by_voice = client.post("/api/generate", json={**body, "voice": "plays"}).json()
    by_alpha = client.post("/api/generate", json={**body, "alpha": 1.0}).json()
    assert by_voice["text"] == by_alpha["text"] and by_voice["voice"] == "plays"
    uniform = client.post("/api/generate", json={**body, "voice": "all"})
    assert uniform.status_code == 200 and uniform.json()["voice"] == "all" and uniform.json()["tokens"] == 30


ATTACK = """<!doctype html><title>another site</title>
<iframe src="{api}/api/stream?prompt=one%20day&max_new_tokens=3&seed=1"></iframe>
<img src="{api}/api/stream?prompt=one%20day&max_new_tokens=3&seed=2">
<iframe name="sink"></iframe>
<form method="POST" action="{api}/api/generate" enctype="text/plain" target="sink">
<input name='{{"prompt": "one day", "max_new_tokens": 3, "x": "' value='"}}'></form>
<script>
fetch("{api}/api/stream?prompt=one%20day&max_new_tokens=3&seed=3", {{mode: "no-cors"}}).catch(() => {{}});
const body = JSON.stringify({{prompt: "one day", max_new_tokens: 3, seed: 5}});
fetch("{api}/api/stream", {{method: "POST", mode: "no-cors", body}}).catch(() => {{}});  // as text/plain
fetch("{api}/api/stream", {{method: "POST", body, headers: {{"Content-Type": "application/json"}}}}).catch(() => {{}});
new EventSource("{api}/api/stream?prompt=one%20day&max_new_tokens=3&seed=4");
document.forms[0].submit();
</script>"""


@pytest.mark.browser
def test_a_page_on_another_site_gets_no_generation_from_a_visitors_browser(server, browser):
    """A page at http://localhost:OTHER (another site than 127.0.0.1) makes the browser ask the API through an
    iframe, an image, a form, no-cors fetches (a GET, a text/plain POST), an EventSource and a JSON POST (whose
    preflight is refused): each arrives, and none runs a generation."""
    import http.server

    page = ATTACK.format(api=server.url).encode()

    class Site(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args):
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    before, streams, posts = len(server.submitted), server.hits["/api/stream"], server.hits["/api/generate"]
    try:
        browser.get(f"http://localhost:{site.server_address[1]}/")
        until(lambda: server.hits["/api/stream"] - streams >= 6 and server.hits["/api/generate"] - posts >= 1)
        time.sleep(1)  # an EventSource retries; a generation, had one started, would be submitted by now
    finally:
        site.shutdown()
    assert len(server.submitted) == before


@pytest.mark.browser
def test_the_page_shows_running_and_done_sets_the_prompt_apart_and_fits_400_px(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(400, 900)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: d.find_element(By.ID, "length").get_attribute("value"))
        assert browser.find_element(By.CSS_SELECTOR, 'meta[name="viewport"]').get_attribute("content").startswith(
            "width=device-width")
        fill(browser, "length", "300")
        browser.find_element(By.ID, "generate").click()
        status = browser.find_element(By.ID, "output-status")
        wait.until(lambda d: "running" in status.get_attribute("class") and "characters so far" in status.text)
        wait.until(lambda d: "done" in status.get_attribute("class"))
        assert status.text.startswith("done: 300 tokens in ") and status.text.endswith("tokens/s)")
        prompt = browser.find_element(By.CSS_SELECTOR, "#output .prompt")
        generated = browser.find_element(By.CSS_SELECTOR, "#output .prompt + span")
        assert prompt.text == browser.find_element(By.ID, "prompt").get_attribute("value") and generated.text
        assert prompt.value_of_css_property("background-color") != generated.value_of_css_property("background-color")
        readout = browser.find_element(By.ID, "dial-line").rect
        label = browser.find_element(By.ID, "temperature").find_element(By.XPATH, "..").rect
        assert readout["y"] + readout["height"] <= label["y"]  # the alpha readout clears the controls below it
        columns = [c.rect for c in browser.find_elements(By.CSS_SELECTOR, ".compare > div")]
        assert all(c["width"] > 300 for c in columns)  # at 400 px the compare views stack, each full width
        assert browser.execute_script("return document.documentElement.scrollWidth") <= 400
    finally:
        browser.set_window_size(1200, 900)


def test_a_request_framed_two_ways_or_with_an_oversized_head_is_refused_and_closed(server):
    body = json.dumps({"prompt": "one day", "max_new_tokens": 2}).encode()
    smuggled = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    head = b"POST /api/generate HTTP/1.1\nHost: 127.0.0.1\nContent-Type: application/json\n"
    before = len(server.submitted)
    framed = head + b"Content-Length: %d\nTransfer-Encoding: chunked\n" % len(body)
    with raw_request(server.port, framed, body + smuggled) as connection:
        refused = answer(connection)
        assert refused.startswith(b"HTTP/1.1 400") and b'{"error": "malformed HTTP request' in refused
        assert connection.recv(4096) == b""  # closed: the request hidden in the body is never answered
    assert len(server.submitted) == before
    big = b"GET /api/info HTTP/1.1\nHost: 127.0.0.1\n" + b"".join(b"X-Pad-%d: %s\n" % (i, b"a" * 1000) for i in range(30))
    with raw_request(server.port, big) as connection:  # 30 KB of headers in one write
        refused = answer(connection)
        assert refused.startswith(b"HTTP/1.1 431") and b"headers are over 8192 bytes" in refused
        assert connection.recv(4096) == b""


def from_address(address):
    """An HTTP client whose connections come from address: another loopback address is another client."""
    return httpx2.Client(transport=httpx2.HTTPTransport(local_address=address), timeout=120)


def test_the_api_answers_while_a_step_is_computing(loaded):
    """The decoder steps in a worker thread: a step that takes as long as it likes holds up no answer."""
    with serve_on_a_free_port(Service(*loaded, max_batch=4, max_new_tokens=50)) as server:
        decoder, in_step, release = server.service.decoder, threading.Event(), threading.Event()
        forward = decoder._forward

        def held(*args):
            in_step.set()
            release.wait(60)
            return forward(*args)

        decoder._forward = held
        streaming = threading.Thread(target=httpx2.post, args=(f"{server.url}/api/generate",),
                                     kwargs={"json": {"prompt": "one day", "max_new_tokens": 5}, "timeout": 120})
        streaming.start()
        try:
            assert in_step.wait(30)
            info = httpx2.get(f"{server.url}/api/info", timeout=10)  # the step is still held
            assert info.status_code == 200 and info.json()["load"]["active"] == 1 and not release.is_set()
        finally:
            release.set()
            streaming.join()


def test_a_long_request_completes_beside_clients_looping_short_ones(loaded):
    """Admission once took the shortest first: clients that looped 8-token requests kept every seat, and a
    100-token request waited until its deadline (504, no tokens)."""
    with serve_on_a_free_port(Service(*loaded, max_batch=2, max_new_tokens=100, timeout=30)) as server:
        stop = threading.Event()

        def loop_short(address):
            with from_address(address) as client:
                while not stop.is_set():
                    client.post(f"{server.url}/api/generate", json={"prompt": "one day", "max_new_tokens": 8})

        loopers = [threading.Thread(target=loop_short, args=(f"127.0.0.{20 + i}",)) for i in range(8)]
        for t in loopers:
            t.start()
        try:
            assert until(lambda: len(server.submitted) >= 16)
            with from_address("127.0.0.3") as honest:
                answer = honest.post(f"{server.url}/api/generate", json={"prompt": "one day", "max_new_tokens": 100})
        finally:
            stop.set()
            for t in loopers:
                t.join()
    assert answer.status_code == 200 and answer.json()["tokens"] == 100


def test_one_clients_flood_waits_its_turn_and_is_capped(loaded):
    """A client with many requests holds its share of the seats, has a capped queue (429 past it), and another
    client's request starts at once, ahead of the flood's waiting ones."""
    service = Service(*loaded, max_batch=4, max_new_tokens=400, max_per_client=2, max_queued_per_client=3)
    with serve_on_a_free_port(service) as server:
        decoder, step = service.decoder, service.decoder._step
        decoder._step = lambda *args: (time.sleep(0.03), step(*args))[1]  # 300 tokens take 9 s at least
        flood, answers = from_address("127.0.0.2"), []

        def flood_one():
            answers.append(flood.post(f"{server.url}/api/generate", json={"prompt": "one day", "max_new_tokens": 300}))

        floods = [threading.Thread(target=flood_one) for _ in range(5)]
        # one after another, each in the decoder's hands before the next: the first two seated (its share), the
        # rest queued. Waiting for "submitted" alone, a busy decoder had not seated the second when the fifth came
        for i, t in enumerate(floods):
            t.start()
            assert until(lambda: (len(decoder.active), len(decoder.pending)) == (min(i + 1, 2), max(0, i - 1)))
        floods += [threading.Thread(target=flood_one) for _ in range(3)]
        for t in floods[5:]:
            t.start()
        assert until(lambda: len(answers) == 3)
        refused, still_waiting = list(answers), None
        with from_address("127.0.0.3") as honest, honest.stream(
                "POST", f"{server.url}/api/stream", json={"prompt": "one day", "max_new_tokens": 20}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and still_waiting is None:  # its first text: who is still waiting?
                    still_waiting = [r for r in decoder.pending if r.client == "127.0.0.2"]
        for r in server.submitted:
            r.cancelled = True
        for t in floods:
            t.join()
        flood.close()
    assert len(still_waiting) == 3  # the flood's waiting requests, all sent before it, still wait
    assert all(r.status_code == 429 and r.headers["retry-after"] == "2" for r in refused)
    assert refused[0].json()["error"].startswith("too many requests from you (3 of your requests are waiting")


def silent_connection(port):
    """A connection that sends nothing."""
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_silent_connections_cannot_lock_an_honest_client_out(server):
    """255 connections that send nothing, then each re-opened as soon as the server closes it: the server closes
    idle connections of the address that holds the most to make room, and another user's requests still
    complete. The cap was once on connections: 255 silent ones got honest requests uvicorn's plain-text 503,
    or a reset."""
    silent = [silent_connection(server.port) for _ in range(255)]  # the server holds 64 open: twice its 32
    stop, reopened = threading.Event(), [0]

    def keep_them_open():
        while not stop.is_set():
            for i, connection in enumerate(silent):
                connection.setblocking(False)
                try:
                    closed = connection.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                if closed and not stop.is_set():
                    connection.close()
                    silent[i] = silent_connection(server.port)
                    reopened[0] += 1
            time.sleep(0.01)

    attacker = threading.Thread(target=keep_them_open)
    attacker.start()
    try:
        answers = []
        for seed in range(10):
            with from_address("127.0.0.3") as honest:  # another user, on a connection of its own each time
                answers.append(honest.post(f"{server.url}/api/generate",
                                           json={"prompt": "one day", "max_new_tokens": 5, "seed": seed}))
            time.sleep(0.1)
    finally:
        stop.set()
        attacker.join()
        for connection in silent:
            connection.close()
    assert [a.status_code for a in answers] == [200] * 10 and reopened[0] > 0


def test_requests_in_flight_past_the_cap_get_a_json_503_with_retry_after(loaded):
    with serve_on_a_free_port(Service(*loaded, max_batch=4, max_new_tokens=400), max_connections=1) as server:
        decoder, step = server.service.decoder, server.service.decoder._step
        decoder._step = lambda *args: (time.sleep(0.01), step(*args))[1]
        with httpx2.stream("POST", f"{server.url}/api/stream", json={"prompt": "one day", "max_new_tokens": 400},
                           timeout=60) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)  # in flight
            refused = httpx2.get(f"{server.url}/api/info", timeout=10)
        for r in server.submitted:
            r.cancelled = True
    assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
    assert refused.json()["error"].startswith("the server is busy: 1 requests are in flight")
