"""The live dial: its API, batched decoding of many users at once, a real server, and the page in a browser."""
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
import httpx2  # noqa: E402
import uvicorn  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from abcgpt.batching import BatchedDecoder, Request  # noqa: E402
from abcgpt.run import load_model  # noqa: E402
from abcgpt.serve import Service, create_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(trained_checkpoint):
    return load_model(trained_checkpoint)


@pytest.fixture(scope="module")
def client(loaded):
    service = Service(*loaded, max_batch=8, max_new_tokens=60, max_body=2000)
    with TestClient(create_app(service)) as client:
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
                 "EventSource", 'class="compare"', "/api/info"):
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
    params = {"prompt": "one day", "alpha": "0.8", "max_new_tokens": "25", "seed": "3"}
    pieces, done = [], None
    with client.stream("GET", "/api/stream", params=params) as response:
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
    expected = client.post("/api/generate", json={**params, "alpha": 0.8, "max_new_tokens": 25, "seed": 3}).json()
    assert "".join(pieces) == done["text"] == expected["text"]


@pytest.mark.parametrize("body, message", [
    ({"alpha": 1.5}, "alpha must be in [0, 1], got 1.5"),
    ({"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
    ({"alpha": "high"}, "alpha must be a number, got 'high'"),
    ({"alpha": True}, "alpha must be a number, got True"),
    ({"alpha": None}, "alpha must be a number, got None"),
    ({"mix": 0.3}, "this checkpoint has no calibrated dial"),
    ({"mix": 2}, "mix must be in [0, 1], got 2.0"),
    ({"alpha": 0.2, "mix": 0.3}, "give alpha or mix, not both"),
    ({"prompt": "one Q day €"}, "the prompt has 2 character(s) not in the vocabulary: 'Q', '€'"),
    ({"prompt": "one day " * 10}, "the prompt is 80 tokens long; the context holds 16"),
    ({"prompt": ""}, "prompt must be a non-empty string"),
    ({"prompt": 7}, "prompt must be a non-empty string"),
    ({"max_new_tokens": 61}, "max_new_tokens must be between 1 and 60, got 61"),
    ({"max_new_tokens": 0}, "max_new_tokens must be between 1 and 60, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer, got 2.5"),
    ({"temperature": 0}, "temperature must be a positive number, got 0.0"),
    ({"top_k": 0}, "top_k must be at least 1, got 0"),
    ({"seed": -1}, "seed must be in [0, 2**63 - 1], got -1"),
    ({"alpha": 0.5, "color": "red"}, "unknown field(s): color"),
])
def test_bad_requests_get_a_4xx_json_error_and_the_server_goes_on(client, body, message):
    response = client.post("/api/generate", json={"prompt": "one day", **body})
    assert response.status_code == 400 and response.json()["error"].startswith(message)
    stream = client.get("/api/stream", params={"prompt": "one day", **{k: str(v) for k, v in body.items()}})
    assert 400 <= stream.status_code < 500 and "error" in stream.json()
    assert client.post("/api/generate", json={"prompt": "one day", "max_new_tokens": 3}).status_code == 200


def test_malformed_oversized_and_non_object_bodies(client):
    for raw, status, message in [(b"{bad json", 400, "malformed JSON"), (b"[1, 2]", 400, "must be a JSON object"),
                                 (b'{"prompt": "' + b"a" * 3000 + b'"}', 413, "over 2000 bytes")]:
        response = client.post("/api/generate", content=raw)
        assert response.status_code == status and message in response.json()["error"]
    assert client.post("/api/generate", json={"prompt": "one day", "max_new_tokens": 2}).status_code == 200


# the batched decoder, with the model in float64 so that no float rounding can part batched from alone
@pytest.fixture(scope="module")
def model64(loaded):
    return loaded[0].double()


def decode(model, requests, max_batch=8, join_later=()):
    """Run a decoder over requests (and join_later, submitted once the first ones are under way)."""
    decoder = BatchedDecoder(model, max_batch)

    async def main():
        task = asyncio.create_task(decoder.run())
        for r in requests:
            decoder.submit(r)
        if join_later:
            while not any(len(r.tokens) >= 3 for r in requests):
                await asyncio.sleep(0.001)
            for r in join_later:
                decoder.submit(r)
        everyone = [*requests, *join_later]
        while not all(r.done for r in everyone):
            await asyncio.sleep(0.001)
        task.cancel()

    asyncio.run(main())
    return decoder


def request(alpha, seed=0, top_k=1, n=20, prompt=(4, 5, 6)):
    return Request(list(prompt), alpha, n, temperature=1.0, top_k=top_k, seed=seed)


def test_greedy_requests_at_different_alphas_get_what_they_would_alone(model64):
    alphas = [0.0, 0.15, 0.5, 0.5, 0.9, 1.0]
    prompts = [(4, 5, 6), (7,), (4, 5, 6), (8, 9, 10, 11), (4,), (12, 13)]
    together = [request(a, prompt=p) for a, p in zip(alphas, prompts)]
    decoder = decode(model64, together)
    assert decoder.largest_batch == len(alphas)  # one forward per step served them all
    for r, a, p in zip(together, alphas, prompts):
        alone = request(a, prompt=p)
        decode(model64, [alone])
        assert r.tokens == alone.tokens
    assert len({tuple(r.tokens) for r in together}) > 1  # the dial made a difference


def test_sampled_requests_depend_on_their_seed_alone_whoever_joins(model64):
    """Requests join and leave between steps; each draws from its own generator."""
    def mine():
        return request(0.4, seed=99, top_k=None, n=30)

    alone = mine()
    decode(model64, [alone])
    crowded = mine()
    others = [request(a, seed=s, top_k=None, n=n) for a, s, n in [(0.0, 1, 5), (1.0, 2, 40), (0.7, 3, 12)]]
    late = [request(0.2, seed=4, top_k=None, n=25), request(0.9, seed=5, top_k=None, n=8)]
    decode(model64, [crowded, *others], max_batch=4, join_later=late)  # more requests than slots, too
    assert crowded.tokens == alone.tokens
    different = request(0.4, seed=100, top_k=None, n=30)
    decode(model64, [different])
    assert different.tokens != alone.tokens


def test_a_cancelled_request_frees_its_slot(model64):
    decoder = BatchedDecoder(model64, max_batch=2)
    long = request(0.5, n=1000, prompt=(4,))
    long.max_new_tokens = 10**6  # far beyond the context: decoded window by window until cancelled

    async def main():
        task = asyncio.create_task(decoder.run())
        decoder.submit(long)
        while len(long.tokens) < 20:  # past block_size 16: the window path too
            await asyncio.sleep(0.001)
        assert len(decoder.cache.free) == 1
        long.cancelled = True
        while len(decoder.cache.free) < 2:
            await asyncio.sleep(0.001)
        assert await long.queue.get() is not None  # its tokens, then the end
        task.cancel()

    asyncio.run(main())
    assert decoder.active == []


# a real server on a free local port
@pytest.fixture(scope="module")
def server(loaded):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = Service(*loaded, max_batch=4, max_new_tokens=400)
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning")
    running = uvicorn.Server(config)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not running.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", service
    running.should_exit = True
    thread.join(timeout=10)


def test_several_clients_at_once_are_decoded_together(server):
    url, service = server
    bodies = [{"prompt": "one day", "alpha": a, "max_new_tokens": 60, "seed": i, "top_k": 1}
              for i, a in enumerate([0.0, 0.3, 0.6, 1.0])]
    results = [None] * len(bodies)

    def call(i):
        results[i] = httpx2.post(f"{url}/api/generate", json=bodies[i], timeout=60).json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert service.decoder.largest_batch >= 2
    for body, result in zip(bodies, results):  # greedy: the same text as alone
        assert result["text"] == httpx2.post(f"{url}/api/generate", json=body, timeout=60).json()["text"]


def test_a_client_that_disconnects_frees_its_slot(server):
    url, service = server
    with httpx2.stream("GET", f"{url}/api/stream", params={"prompt": "one day", "max_new_tokens": "400"},
                      timeout=60) as response:
        next(response.iter_lines())
        assert len(service.decoder.cache.free) < 4
    deadline = time.time() + 20
    while len(service.decoder.cache.free) < 4 and time.time() < deadline:
        time.sleep(0.05)
    assert len(service.decoder.cache.free) == 4 and not service.decoder.active


def chromium():
    for browser, driver in (("/usr/bin/chromium", "/usr/bin/chromedriver"),):
        if Path(browser).exists() and Path(driver).exists():
            return browser, driver
    return None


@pytest.mark.browser
@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium and chromium-driver")
def test_the_page_in_a_browser(server, tmp_path):
    """Headless Chromium opens the page, moves the slider, generates, and reads the streamed text."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as Driver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Driver(driver_path), options=options)
    url, _ = server
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "left").text == "stories")
        assert driver.find_element(By.ID, "right").text == "plays"
        slider = driver.find_element(By.ID, "dial")
        slider.send_keys(Keys.END)  # the slider to its right end: alpha 1
        assert driver.find_element(By.ID, "dial-value").text == "1.00"
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("one day")
        length = driver.find_element(By.ID, "length")
        length.clear()
        length.send_keys("60")
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_element(By.ID, "output").text) >= len("one day") + 40)
        assert driver.find_element(By.ID, "output").text.startswith("one day")
        driver.find_element(By.ID, "compare-button").click()
        wait.until(lambda d: all(len(o.text) > 20 for o in d.find_elements(By.CLASS_NAME, "compare-output")))
        shot = os.environ.get("ABCGPT_SCREENSHOT")  # set to refresh the README's picture
        if shot:
            driver.save_screenshot(str(tmp_path / "page.png"))
            shutil.copy(tmp_path / "page.png", shot)
    finally:
        driver.quit()
