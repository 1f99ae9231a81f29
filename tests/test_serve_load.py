"""`python serve.py` as a process: load and faults on 127.0.0.1: honest clients at mixed alphas beside abandoned
POSTs and streams, readers that never read, a hostile temperature, hostile JSON, an oversized body and
slowloris connections. Every honest request completes in full, the server's memory stays bounded, the
half-open connections are cut off, and the log has no tracebacks. And listening beyond loopback warns, with
the token and the allowed host names enforced."""
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
import httpx2  # noqa: E402
from test_serve import from_address  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADER_TIMEOUT = 1.0


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def served(trained_checkpoint, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "serve.py", "--ckpt", str(trained_checkpoint), "--port", str(port), "--max_batch", "8",
             "--max_new_tokens", "200", "--max_queue", "64", "--timeout", "60", "--max_connections", "64",
             "--header_timeout", str(HEADER_TIMEOUT)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            httpx2.get(f"{url}/api/info", timeout=2)
            break
        except httpx2.TransportError:
            time.sleep(0.2)
    yield url, port, process, log
    process.terminate()
    process.wait(timeout=30)


def raw(port, data):
    connection = socket.create_connection(("127.0.0.1", port), timeout=30)
    connection.sendall(data)
    return connection


def post_bytes(body, path="/api/generate"):
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" % path.encode()
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def test_honest_requests_complete_in_full_under_load_and_faults(served):
    url, port, process, log = served
    httpx2.post(f"{url}/api/generate", json={"prompt": "one day", "max_new_tokens": 20}, timeout=60)  # warm
    baseline = rss_mb(process.pid)
    peak, stop = [baseline], threading.Event()

    def watch_memory():
        while not stop.is_set():
            peak.append(rss_mb(process.pid))
            time.sleep(0.1)

    honest = []  # (asked, got)

    def honest_client(i):
        client = from_address(f"127.0.0.{10 + i}")  # a user of their own: turns are shared by address
        for j in range(3):
            asked = 40 + 40 * ((i + j) % 4)
            fields = {"prompt": "one day", "alpha": (i % 5) / 4, "max_new_tokens": asked, "seed": 100 * i + j}
            if (i + j) % 2:
                got = client.post(f"{url}/api/generate", json=fields, timeout=120).json().get("tokens")
            else:
                done = None
                with client.stream("POST", f"{url}/api/stream", json=fields, timeout=120) as response:
                    event = None
                    for line in response.iter_lines():
                        if line.startswith("event: "):
                            event = line[len("event: "):]
                        elif line.startswith("data: ") and event == "done":
                            done = json.loads(line[len("data: "):])
                got = done and done["tokens"]
            honest.append((asked, got))

    def abandoned_posts():
        body = json.dumps({"prompt": "one day", "max_new_tokens": 200}).encode()
        for _ in range(10):
            connection = raw(port, post_bytes(body))
            time.sleep(0.2)
            connection.close()

    def abandoned_streams():
        for _ in range(5):
            with httpx2.stream("POST", f"{url}/api/stream", json={"prompt": "one day", "max_new_tokens": 200},
                               timeout=60) as response:
                next(response.iter_lines())

    def hostile():
        for _ in range(5):
            httpx2.post(f"{url}/api/stream", json={"prompt": "a", "temperature": 1e-40}, timeout=60)
            for raw_body in (b'{"seed": 1e400}', b'{"top_k": NaN}', b"[" * 3000 + b"]" * 3000):
                httpx2.post(f"{url}/api/generate", content=raw_body, headers={"content-type": "application/json"},
                            timeout=60)
            time.sleep(0.1)

    streamed = json.dumps({"prompt": "one day", "max_new_tokens": 200}).encode()
    never_reading = [raw(port, post_bytes(streamed, "/api/stream")) for _ in range(2)]
    oversized = raw(port, b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 536870912\r\n\r\n")
    slowloris = [raw(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n") for _ in range(3)]
    threads = [threading.Thread(target=watch_memory)]
    threads += [threading.Thread(target=honest_client, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=f) for f in (abandoned_posts, abandoned_streams, hostile)]
    for t in threads:
        t.start()
    cut_off = 0
    for _ in range(int(3 * HEADER_TIMEOUT / 0.2)):  # a header byte every 0.2 s: the deadline still holds
        time.sleep(0.2)
        for connection in slowloris:
            try:
                connection.sendall(b"X")
            except OSError:
                pass
    for connection in slowloris:
        try:
            cut_off += connection.recv(1) == b""
        except OSError:
            cut_off += 1
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()

    assert len(honest) == 24 and all(got == asked for asked, got in honest), honest
    assert cut_off == len(slowloris)
    assert oversized.recv(64).startswith(b"HTTP/1.1 413")
    for connection in [*never_reading, oversized, *slowloris]:
        connection.close()
    load = None
    for _ in range(100):  # the abandoned and unread requests end or are cancelled
        load = httpx2.get(f"{url}/api/info", timeout=10).json()["load"]
        if load["active"] == 0 and load["queued"] == 0:
            break
        time.sleep(0.2)
    assert load["active"] == 0 and load["queued"] == 0
    assert max(peak) - baseline < 200, f"memory grew from {baseline:.0f} to {max(peak):.0f} MB"
    stderr = log.read_text()
    assert "Traceback" not in stderr and process.poll() is None
    assert "a client left" in stderr and all(len(line) < 300 for line in stderr.splitlines())  # one line each


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("extra, said, unsaid", [
    ([], ["anyone who can reach it can use it", "give --token", "--allow_host NAME"], []),
    (["--token", "s3cret", "--allow_host", "dial.example"], ["anyone who can reach it can use it"],
     ["give --token", "--allow_host NAME"]),
])
def test_listening_beyond_loopback_warns(trained_checkpoint, extra, said, unsaid):
    port = free_port()
    process = subprocess.Popen([sys.executable, "serve.py", "--ckpt", str(trained_checkpoint), "--host", "0.0.0.0",
                                "--port", str(port), *extra], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("serving ")  # the warning comes before it
        if extra:  # a served name and the token: let in; a wrong token: not
            url, host = f"http://127.0.0.1:{port}/api/info", {"host": "dial.example"}
            deadline = time.time() + 60
            while time.time() < deadline:
                try:
                    refused = httpx2.get(url, headers=host, timeout=5)
                    break
                except httpx2.TransportError:
                    time.sleep(0.2)
            assert refused.status_code == 401
            assert httpx2.get(url, headers={**host, "authorization": "Bearer s3cret"}, timeout=5).status_code == 200
    finally:
        process.terminate()
        stderr = process.communicate(timeout=30)[1]
    warning = stderr.splitlines()[0]
    assert warning.startswith("warning: listening on 0.0.0.0")
    assert all(s in warning for s in said) and not any(s in warning for s in unsaid)


@pytest.mark.parametrize("sig, status, said", [(signal.SIGINT, 130, "interrupted\n"), (signal.SIGTERM, 0, "")])
def test_ctrl_c_and_sigterm_stop_the_server_and_its_decoder(trained_checkpoint, sig, status, said):
    """serve.py decodes on its main thread with the HTTP server in a thread beside it: a signal to the process
    stops both, mid-generation, in one line (Ctrl-C) or none (SIGTERM), with no traceback; the stream under way
    ends with an error event rather than waiting on a decoder that is gone."""
    command = [sys.executable, "serve.py", "--ckpt", str(trained_checkpoint), "--port", "0",
               "--max_new_tokens", "100000"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's
    try:
        url = process.stdout.readline().split(" on ")[1].split()[0]
        with httpx2.stream("POST", f"{url}/api/stream", json={"prompt": "one day", "max_new_tokens": 100000},
                           timeout=60) as response:
            lines = response.iter_lines()
            next(lines)  # a generation is under way
            process.send_signal(sig)
            rest = list(lines)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == status and stderr == said, stderr
    assert rest[-3:-1] == ["event: error", 'data: {"error": "the server stopped before this request ended"}'], rest
