"""Serving speed and fairness, each against an honest baseline.

    python -m bench.serve_throughput --ckpt out/ckpt.pt --out bench/results/serve-DEVICE-DATE.json
    python -m bench.serve_throughput --ckpt out/ckpt.pt --quick

1. decoder: the BatchedDecoder alone (no HTTP) serving B requests at mixed alphas, against a vanilla GPT of
   the same shape and weights generating a batch of B with sampling.generate: what the per-row gates cost.
2. throughput: N requests of --new_tokens at random alphas and seeds, four ways, alternated --repeats times
   (the ratios are of medians):
   - generate: the model's own sampling.generate(), in this process, one request after another;
   - decoder: the BatchedDecoder in this process, all N at once;
   - http: the real server (serve.py's app and limits under uvicorn, on a free local port), N clients at
     once, each from a loopback address of its own (127.0.0.2, 127.0.0.3, ...: N users);
   - http_one_at_a_time: the same requests over HTTP, one after another.
   Same weights, threads and sampling settings throughout.
3. info: /api/info's latency, probed every 20 ms while --streams streams are in flight.
4. fairness:
   - flood: one request of --honest_tokens alone, then again while one client has sent 100 at once;
   - starvation: a request of --honest_tokens beside 150 clients looping 8-token requests, on a server
     whose deadline is 20 s: does it complete, and how long does it take;
   - short beside long: --short_tokens requests one after another while --long requests of --long_tokens
     fill the decoder (p50/p95, and on an idle server).
"""
import asyncio
import copy
import random
import socket
import statistics
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx2
import torch
import uvicorn

from abcgpt.core.atomic import write_json
from abcgpt.model.gpt import GPT, GPTConfig
from abcgpt.model.sampling import PLAIN, Generation, generate
from abcgpt.serving import settings
from abcgpt.serving.batching import BatchedDecoder, Request
from abcgpt.serving.connections import server_config
from abcgpt.serving.server import Service, create_app
from abcgpt.tools.cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags
from abcgpt.training.run import DEFAULT_CHECKPOINT, load_model
from bench.timing import environment


def start_server(service, max_connections):
    """The real server for service (serve.py's app and limits under uvicorn) in a thread, on a free local port;
    its decoder is left to decode_on_this_thread, as serve.py runs it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(service), "127.0.0.1", port, max_connections, 10.0))
    threading.Thread(target=server.run, daemon=True).start()
    service.started.wait()
    return server, f"http://127.0.0.1:{port}"


def decode_on_this_thread(decoder, loop, traffic):
    """traffic() in a thread while decoder serves on this one (the thread that loaded the model, as in
    serve.py); what traffic returned."""
    outcome = {}

    def drive():
        try:
            outcome["result"] = traffic()
        except BaseException as e:  # raised again on this thread
            outcome["error"] = e
        finally:
            decoder.stop()

    driver = threading.Thread(target=drive)
    driver.start()
    decoder.serve(loop)
    driver.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def background_loop():
    """An event loop in a thread of its own, for the decoder's queues when no server runs one."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    return loop


def address(i):
    """The loopback address of user i: 127.0.0.2 onwards."""
    return f"127.0.{(i + 2) // 250}.{(i + 2) % 250}"


def client_at(i):
    return httpx2.Client(transport=httpx2.HTTPTransport(local_address=address(i)), timeout=600)


def timed_post(client, url, body, latencies):
    start = time.perf_counter()
    response = client.post(f"{url}/api/generate", json=body)
    response.raise_for_status()
    latencies.append(time.perf_counter() - start)
    return response.json()["tokens"]


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def decode_all(model, requests, loop):
    """Seconds for a BatchedDecoder, in this process and on this thread, to serve the requests submitted at
    once."""
    decoder = BatchedDecoder(model, max_batch=len(requests))

    def wait():
        while not all(r.done for r in requests):
            time.sleep(0.001)

    start = time.perf_counter()
    for r in requests:
        decoder.submit(r)
    decode_on_this_thread(decoder, loop, wait)
    return time.perf_counter() - start


def vanilla_tokens_per_s(model, batch, tokens):
    """tokens/s of one batched generation by a vanilla GPT."""
    prompt = torch.zeros((batch, 1), dtype=torch.long, device=model.lm_head.weight.device)
    start = time.perf_counter()
    generate(model, prompt, Generation(None, PLAIN, max_new_tokens=tokens))
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return batch * tokens / (time.perf_counter() - start)


def decoder_vs_vanilla(model, batch, tokens, repeats, rng, loop):
    vanilla = GPT(GPTConfig(**{**model.config.to_dict(), "gated": False})).to(model.lm_head.weight.device).eval()
    vanilla.load_state_dict(model.state_dict(), strict=False)  # the same weights (less the unit scores): the
    # same activations, so that no data-dependent cost (GELU's, for one) parts the two
    alphas = [round(rng.random(), 3) for _ in range(batch)]

    def ours(n):
        requests = [Request([0], Generation(a, PLAIN, i, n), streamed=False) for i, a in enumerate(alphas)]
        return batch * n / decode_all(model, requests, loop)

    ours(4), vanilla_tokens_per_s(vanilla, batch, 4)  # warm-up
    decoder, theirs = [], []
    for _ in range(repeats):  # alternately, so that the machine's drift falls on both
        decoder.append(ours(tokens))
        theirs.append(vanilla_tokens_per_s(vanilla, batch, tokens))
    ratio = statistics.median(decoder) / statistics.median(theirs)
    print(f"decoder at {batch} mixed alphas: {statistics.median(decoder):,.0f} tokens/s, vanilla generate "
          f"{statistics.median(theirs):,.0f} tokens/s: {ratio:.2f}x (medians of {repeats})", flush=True)
    return {"batch": batch, "new_tokens": tokens, "decoder_tokens_per_s": spread(decoder),
            "vanilla_tokens_per_s": spread(theirs), "decoder_vs_vanilla": ratio}


class Workload:
    """N requests, each with its alpha and seed, sampled as the server would sample them."""

    def __init__(self, model, tokenizer, n, tokens, rng):
        self.model, self.n, self.tokens = model, n, tokens
        self.prompt_text = tokenizer.decode([rng.randrange(model.config.vocab_size)])
        self.prompt = tokenizer.encode(self.prompt_text)
        self.alphas = [round(rng.random(), 3) for _ in range(n)]
        self.seeds = [rng.randrange(2**31) for _ in range(n)]
        self.sampling = settings.DEFAULTS  # the server's

    def resized(self, tokens):
        """The same requests, each of `tokens` tokens."""
        other = copy.copy(self)
        other.tokens = tokens
        return other

    def bodies(self):
        given = {name: value for name, value in asdict(self.sampling).items() if value is not None}
        return [{"prompt": self.prompt_text, "alpha": a, "max_new_tokens": self.tokens, "seed": s, **given}
                for a, s in zip(self.alphas, self.seeds)]

    def generate_one_at_a_time(self):
        device = self.model.lm_head.weight.device
        start = time.perf_counter()
        for a, s in zip(self.alphas, self.seeds):
            prompt = torch.tensor([self.prompt], device=device)
            generate(self.model, prompt, Generation(a, self.sampling, s, self.tokens))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return self.n * self.tokens / (time.perf_counter() - start)

    def decoder(self, loop):
        requests = [Request(list(self.prompt), Generation(a, self.sampling, s, self.tokens), streamed=False)
                    for a, s in zip(self.alphas, self.seeds)]
        return self.n * self.tokens / decode_all(self.model, requests, loop)

    def http(self, url, service, clients):
        """tokens/s of the N requests sent at once, one per client; and the most one step served."""
        service.decoder.largest_batch, tokens, latencies = 0, [], []

        def send():
            threads = [threading.Thread(target=lambda c=c, b=b: tokens.append(timed_post(c, url, b, latencies)))
                       for c, b in zip(clients, self.bodies())]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        start = time.perf_counter()
        decode_on_this_thread(service.decoder, service.loop, send)
        return sum(tokens) / (time.perf_counter() - start), service.decoder.largest_batch

    def http_one_at_a_time(self, url, service, client):
        def send():
            return sum(timed_post(client, url, b, []) for b in self.bodies())

        start = time.perf_counter()
        tokens = decode_on_this_thread(service.decoder, service.loop, send)
        return tokens / (time.perf_counter() - start)


def throughput(work, url, service, repeats, loop):
    clients = [client_at(i) for i in range(work.n)]
    ways = {"generate": lambda w: w.generate_one_at_a_time(), "decoder": lambda w: w.decoder(loop),
            "http": lambda w: w.http(url, service, clients)[0],
            "http_one_at_a_time": lambda w: w.http_one_at_a_time(url, service, clients[0])}
    for way in ways.values():  # warm-up, at 4 tokens (the server's connections too)
        way(work.resized(4))
    runs = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():  # alternately, so that the machine's drift falls on all four
            runs[name].append(way(work))
    _, largest = work.http(url, service, clients)
    for c in clients:
        c.close()
    median = {name: statistics.median(values) for name, values in runs.items()}
    ratios = {"http_vs_decoder": median["http"] / median["decoder"],
              "http_vs_generate": median["http"] / median["generate"],
              "decoder_vs_generate": median["decoder"] / median["generate"],
              "http_vs_http_one_at_a_time": median["http"] / median["http_one_at_a_time"]}
    print(f"{work.n:>3} requests of {work.tokens} tokens, tokens/s (median of {repeats}): generate() one at a time "
          f"{median['generate']:,.0f}, decoder {median['decoder']:,.0f}, HTTP {median['http']:,.0f}, HTTP one at "
          f"a time {median['http_one_at_a_time']:,.0f}; HTTP x decoder {ratios['http_vs_decoder']:.2f}, HTTP x "
          f"generate() {ratios['http_vs_generate']:.2f}", flush=True)
    return {"requests": work.n, "new_tokens": work.tokens, **asdict(work.sampling),
            "tokens_per_s": {name: spread(values) for name, values in runs.items()}, "ratios": ratios,
            "largest_batch": largest}


def info_latency(url, streams, tokens, prompt):
    """/api/info's latency while streams are in flight (each from a client of its own)."""
    started, stop, latencies = threading.Barrier(streams + 1), threading.Event(), []

    def stream(i):
        with client_at(i) as client, client.stream("POST", f"{url}/api/stream", json={
                "prompt": prompt, "alpha": i / max(1, streams - 1), "max_new_tokens": tokens, "seed": i}) as response:
            lines = response.iter_lines()
            next(lines)
            started.wait()
            for _ in lines:
                pass

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    started.wait()
    with client_at(streams) as probe:
        while any(t.is_alive() for t in threads) and not stop.is_set():
            start = time.perf_counter()
            probe.get(f"{url}/api/info").raise_for_status()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.02)
    for t in threads:
        t.join()
    result = {"streams": streams, "stream_tokens": tokens, "probes": len(latencies),
              "p50_ms": 1e3 * percentile(latencies, 50), "p95_ms": 1e3 * percentile(latencies, 95),
              "max_ms": 1e3 * max(latencies)}
    print(f"/api/info with {streams} streams in flight: p50 {result['p50_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms, "
          f"max {result['max_ms']:.1f} ms ({len(latencies)} probes)", flush=True)
    return result


def flood(url, service, tokens, prompt, repeats, flood_n=100):
    """An honest request alone, then while one client has flood_n in (alternately): sent at once, its
    refusals answered, its share decoding and the rest queued, so that what is timed is the server's
    sharing, not this process's client threads on the same cores."""
    honest_body = {"prompt": prompt, "alpha": 0.5, "max_new_tokens": tokens, "seed": 7}
    alone, beside, answers = [], [], []
    with client_at(0) as honest, client_at(1) as flooder:
        timed_post(honest, url, honest_body, [])  # warm-up
        for _ in range(repeats):
            timed_post(honest, url, honest_body, alone)
            answers.clear()
            threads = [threading.Thread(target=lambda i=i: answers.append(flooder.post(f"{url}/api/generate", json={
                "prompt": prompt, "alpha": 0.3, "max_new_tokens": tokens, "seed": i}).status_code))
                for i in range(flood_n)]
            for t in threads:
                t.start()
            decoding = min(flood_n, service.decoder.max_per_client)
            refused = flood_n - decoding - min(flood_n - decoding, service.decoder.max_queued_per_client)
            while (len(answers) < refused  # the flood is in: its refusals answered, its share decoding, the rest
                   or sum(r.client == address(1) for r in service.decoder.active) < decoding):  # queued
                time.sleep(0.005)
            timed_post(honest, url, honest_body, beside)
            for r in [*service.decoder.active, *service.decoder.pending]:
                r.cancelled = True  # the flood is not what is measured
            for t in threads:
                t.join()
    ratio = statistics.median(beside) / statistics.median(alone)
    result = {"honest_tokens": tokens, "flood_requests": flood_n, "alone_s": spread(alone), "beside_flood_s":
              spread(beside), "ratio": ratio, "flood_refused_429": answers.count(429),
              "max_per_client": service.decoder.max_per_client,
              "max_queued_per_client": service.decoder.max_queued_per_client}
    print(f"flood: a {tokens}-token request alone {statistics.median(alone):.2f} s, beside one client's {flood_n} "
          f"{statistics.median(beside):.2f} s: {ratio:.2f}x (median of {repeats}; {answers.count(429)} of the "
          f"flood got 429)", flush=True)
    return result


def starvation(model, tokenizer, saved, tokens, prompt, loopers=150, deadline=20.0):
    """A request of `tokens` beside `loopers` clients that loop 8-token requests, with a 20 s deadline."""
    service = Service(model, tokenizer, saved, max_batch=32, max_new_tokens=max(tokens, 8), timeout=deadline,
                      decoder_thread=False)
    server, url = start_server(service, max_connections=4 * loopers)
    stop, sent = threading.Event(), [0]

    def loop_short(i):
        with client_at(i + 1) as client:
            while not stop.is_set():
                client.post(f"{url}/api/generate", json={"prompt": prompt, "max_new_tokens": 8})
                sent[0] += 1

    def traffic():
        threads = [threading.Thread(target=loop_short, args=(i,)) for i in range(loopers)]
        for t in threads:
            t.start()
        try:
            while sent[0] < 2 * loopers:
                time.sleep(0.01)
            with client_at(0) as honest:
                start = time.perf_counter()
                response = honest.post(f"{url}/api/generate", json={"prompt": prompt, "max_new_tokens": tokens,
                                                                     "seed": 3})
                return response, time.perf_counter() - start
        finally:
            stop.set()
            for t in threads:
                t.join()

    try:
        response, took = decode_on_this_thread(service.decoder, service.loop, traffic)
    finally:
        server.should_exit = True
    result = {"loopers": loopers, "looper_tokens": 8, "honest_tokens": tokens, "deadline_s": deadline,
              "status": response.status_code, "tokens": response.json().get("tokens"), "seconds": took}
    print(f"starvation: a {tokens}-token request beside {loopers} clients looping 8-token ones: {response.status_code}"
          f", {result['tokens']} tokens in {took:.2f} s (deadline {deadline:g} s)", flush=True)
    return result


def short_beside_long(url, service, long_n, long_tokens, short_n, short_tokens, prompt):
    """Latencies of short requests sent one after another while long_n long requests are decoded."""
    short = {"prompt": prompt, "alpha": 0.5, "max_new_tokens": short_tokens, "seed": 1}
    idle, busy, long_latencies = [], [], []
    with client_at(0) as client:
        for _ in range(3):
            timed_post(client, url, short, idle)
        longs = [threading.Thread(target=lambda i=i: timed_post(client_at(i + 1), url, {
            "prompt": prompt, "alpha": i / long_n, "seed": i, "max_new_tokens": long_tokens}, long_latencies))
            for i in range(long_n)]
        for t in longs:
            t.start()
        while len(service.decoder.active) < long_n:
            time.sleep(0.01)
        for _ in range(short_n):
            timed_post(client, url, short, busy)
        still_running = sum(t.is_alive() for t in longs)
        for t in longs:
            t.join()
    result = {"long_requests": long_n, "long_tokens": long_tokens, "short_requests": short_n,
              "short_tokens": short_tokens, "short_idle_p50_s": percentile(idle, 50),
              "short_busy_p50_s": percentile(busy, 50), "short_busy_p95_s": percentile(busy, 95),
              "long_p50_s": percentile(long_latencies, 50), "long_still_running_after_shorts": still_running}
    print(f"short beside long: {short_n} requests of {short_tokens} tokens beside {long_n} of {long_tokens}: p50/p95 "
          f"{result['short_busy_p50_s']:.2f}/{result['short_busy_p95_s']:.2f} s (idle server: "
          f"{result['short_idle_p50_s']:.2f} s; the long ones took {result['long_p50_s']:.1f} s)", flush=True)
    return result


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint to serve")
    p.add_argument("--clients", default="1,8,32", help="numbers of concurrent requests")
    p.add_argument("--new_tokens", type=int, default=200, help="tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each comparison")
    p.add_argument("--streams", type=int, default=32, help="streams in flight while /api/info is probed")
    p.add_argument("--honest_tokens", type=int, default=100, help="tokens of the honest request beside a flood")
    p.add_argument("--long", type=int, default=32, help="long requests beside the short ones")
    p.add_argument("--long_tokens", type=int, default=500, help="tokens of each long request")
    p.add_argument("--short_tokens", type=int, default=50, help="tokens of each short request")
    p.add_argument("--quick", action="store_true", help="small sizes and one repeat: checks the script")
    p.add_argument("--out", help="the JSON file this writes")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    loopers, flood_n = 150, 100
    if args.quick:  # enough tokens that four clients surely overlap
        args.clients, args.new_tokens, args.repeats, args.streams, args.honest_tokens = "1,4", 32, 1, 4, 16
        args.long, args.long_tokens, args.short_tokens, loopers, flood_n = 4, 64, 8, 6, 10
    clients = [int(n) for n in args.clients.split(",")]
    model, tokenizer, saved = load_model(args.ckpt, args.device)
    rng = random.Random(0)
    record = {**environment(args.device), "checkpoint": str(args.ckpt), "threads": torch.get_num_threads(),
              "model": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}}
    loop = background_loop()
    record["decoder"] = [decoder_vs_vanilla(model, n, args.new_tokens, args.repeats, rng, loop) for n in clients]
    most = max(*clients, args.long, args.streams)
    service = Service(model, tokenizer, saved, max_batch=most, timeout=3600, decoder_thread=False,
                      max_new_tokens=max(args.new_tokens, args.long_tokens, args.honest_tokens))
    server, url = start_server(service, max_connections=4 * most)
    prompt = tokenizer.decode([rng.randrange(model.config.vocab_size)])

    def served(traffic):  # the decoder on this thread, as serve.py runs it
        return decode_on_this_thread(service.decoder, service.loop, traffic)

    try:
        record["throughput"] = [throughput(Workload(model, tokenizer, n, args.new_tokens, rng), url, service,
                                           args.repeats, loop) for n in clients]
        record["info"] = served(lambda: info_latency(url, args.streams, args.new_tokens, prompt))
        record["flood"] = served(lambda: flood(url, service, args.honest_tokens, prompt, args.repeats, flood_n))
        record["short_beside_long"] = served(lambda: short_beside_long(
            url, service, args.long, args.long_tokens, 16 if not args.quick else 3, args.short_tokens, prompt))
    finally:
        server.should_exit = True
    record["starvation"] = starvation(model, tokenizer, saved, args.honest_tokens, prompt, loopers)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
