"""The live dial over many sources: the API's voice field, per-row points in one batch, and the page's
mixture sliders in a browser."""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402
from test_batching import decode  # noqa: E402
from test_serve import browser, fill, needs_chromium, serve_on_a_free_port  # noqa: E402,F401 (browser: a fixture)

from abcgpt.gates.voice import parse_voice  # noqa: E402
from abcgpt.model.sampling import Generation, Sampling  # noqa: E402
from abcgpt.serving.batching import Request  # noqa: E402
from abcgpt.serving.server import Service, create_app  # noqa: E402
from abcgpt.training.run import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["stories", "plays", "words"]


@pytest.fixture(scope="module")
def loaded(voices_checkpoint):
    return load_model(voices_checkpoint)


@pytest.fixture(scope="module")
def client(loaded):
    with TestClient(create_app(Service(*loaded, max_batch=8, max_new_tokens=60)), base_url="http://localhost") as c:
        yield c


def test_info_gives_the_geometry_and_every_source(client):
    info = client.get("/api/info").json()
    assert info["geometry"] == "pool" and info["uniform"] == "all"
    assert info["sources"] == [{"name": n, "vertex": k} for k, n in enumerate(NAMES)]


@pytest.mark.parametrize("voice", ["plays", "stories=1,words=3", "all"])
def test_a_voice_gives_what_sample_py_prints_for_it(client, voices_checkpoint, voice):
    body = {"prompt": "one day", "voice": voice, "max_new_tokens": 30, "temperature": 0.9, "top_k": 20, "seed": 4}
    answer = client.post("/api/generate", json=body).json()
    assert answer["voice"] == voice and answer["alpha"] is None and answer["tokens"] == 30
    printed = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(voices_checkpoint), "--voice", voice, "--start", "one day",
         "--max_new_tokens", "30", "--temperature", "0.9", "--top_k", "20", "--seed", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert printed.stdout.split("\n", 1)[1] == "one day" + answer["text"] + "\n"


@pytest.mark.parametrize("body, message", [
    ({"alpha": 0.5}, "alpha: this checkpoint's dial is a mixture of its 3 sources (pool), not one line"),
    ({"mix": 0.5}, "mix: this checkpoint's dial is a mixture of its 3 sources (pool), not one line"),
    ({"voice": "psalms"}, "no source named 'psalms': this checkpoint's sources are stories, plays, words"),
    ({"voice": "plays=0"}, "voice 'plays=0': the weights must sum to a positive number"),
])
def test_a_bad_dial_over_many_sources_is_a_400(client, body, message):
    response = client.post("/api/generate", json={"prompt": "one day", **body})
    assert response.status_code == 400 and response.json()["error"].startswith(message)


def test_requests_at_different_voices_share_a_batch_and_each_gets_its_own_text(loaded):
    """Per-row points in one forward give each request the text it gets decoded alone."""
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode("one day")

    def tokens(voices):
        requests = [Request(prompt, Generation(parse_voice(v, NAMES, "pool")[0], Sampling(1.0, None), 9, 20))
                    for v in voices]
        return [r.tokens for r in requests], decode(model, requests, max_batch=4).largest_batch

    voices = ["stories", "plays=2,words=1", "all", "words"]
    together, largest = tokens(voices)
    assert largest == 4
    assert together == [tokens([v])[0][0] for v in voices]


@pytest.mark.browser
@needs_chromium
def test_the_page_offers_every_source_as_a_mixture_and_uniform_mode(loaded, browser):
    """Headless Chromium: one slider per source; moving them sends that mixture; the switch sends all."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with serve_on_a_free_port(Service(*loaded, max_batch=4, max_new_tokens=100)) as server:
        browser.get(server.url)
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: len(d.find_elements(By.CLASS_NAME, "voice-weight")) == 3)
        labels = [e.text for e in browser.find_elements(By.CLASS_NAME, "voice-name")]
        assert labels == NAMES
        assert not browser.find_element(By.ID, "dial").is_displayed()  # the line's one slider is hidden
        sliders = browser.find_elements(By.CLASS_NAME, "voice-weight")
        for slider in sliders:
            slider.send_keys(Keys.HOME)  # every weight to 0 ...
        sliders[1].send_keys(Keys.END)  # ... but plays's
        assert browser.find_element(By.ID, "voice-value").text == "plays"  # one source alone: its own setting
        fill(browser, "prompt", "one day")
        fill(browser, "length", "30")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_element(By.ID, "output").get_attribute("data-done"))
        assert server.submitted[-1].voice == "plays"
        browser.find_element(By.ID, "uniform").click()
        assert browser.find_element(By.ID, "voice-value").text == "all"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(server.submitted) >= 2 and server.submitted[-1].done)
        assert server.submitted[-1].voice == "all"
        browser.find_element(By.ID, "compare-button").click()
        wait.until(lambda d: all(o.get_attribute("data-done") for o in d.find_elements(By.CLASS_NAME, "compare-output")))
        assert sorted(r.voice for r in server.submitted[-3:]) == sorted(["stories", "all", "words"])
