"""Serving speed and fairness: the batched decoder against vanilla generation, batched serving against one
request at a time, and how long a short request waits beside long ones.

    python -m bench.serve_throughput --ckpt out/ckpt.pt --out bench/results/serve-DEVICE-DATE.json
    python -m bench.serve_throughput --ckpt out/ckpt.pt --quick

1. decoder: the BatchedDecoder alone (no HTTP) serving B requests at mixed alphas, against a vanilla GPT of
   the same shape and weights generating a batch of B with sampling.generate, same tokens and threads; the two run
   alternately --repeats times and the ratio is of their medians.
2. serving: the real server (serve.py's app and limits under uvicorn) on a free local port. N clients each
   send one /api/generate at a random alpha, all at once; the same N requests are then sent one at a time.
   Alternated --repeats times: the median speedup and its range.
3. fairness: --long requests of --long_tokens each fill the decoder; then short requests (--short_tokens)
   arrive one after another. Their p50/p95 latency, beside their latency on an idle server.
"""
import asyncio
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx2
import torch
import uvicorn

from abcgpt.batching import BatchedDecoder, Request
from abcgpt.cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags
from abcgpt.connections import server_config
from abcgpt.model import GPT, GPTConfig
from abcgpt.run import load_model
from abcgpt.sampling import generate
from abcgpt.serve import Service, create_app
from bench.timing import environment
from abcgpt.atomic import write_json


def start_server(service, max_connections):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(server_config(create_app(service), "127.0.0.1", port, max_connections, 10.0))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}"


def timed_post(url, body, latencies):
    start = time.perf_counter()
    response = httpx2.post(f"{url}/api/generate", json=body, timeout=600)
    response.raise_for_status()
    latencies.append(time.perf_counter() - start)
    return response.json()["tokens"]


def send(url, bodies, concurrent):
    """(tokens/s, latencies) for the bodies sent all at once or one after another."""
    latencies, tokens = [], []
    start = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=lambda b=b: tokens.append(timed_post(url, b, latencies))) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        tokens = [timed_post(url, b, latencies) for b in bodies]
    return sum(tokens) / (time.perf_counter() - start), latencies


def percentile(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def decoder_tokens_per_s(model, alphas, tokens):
    """tokens/s of the BatchedDecoder serving one request per alpha, each a one-token prompt."""
    decoder = BatchedDecoder(model, max_batch=len(alphas))
    requests = [Request([0], a, tokens, seed=i) for i, a in enumerate(alphas)]

    async def serve():
        task = asyncio.create_task(decoder.run())
        for r in requests:
            decoder.submit(r)
        while not all(r.done for r in requests):
            await asyncio.sleep(0.001)
        task.cancel()

    start = time.perf_counter()
    asyncio.run(serve())
    return sum(len(r.tokens) for r in requests) / (time.perf_counter() - start)


def vanilla_tokens_per_s(model, batch, tokens):
    """tokens/s of one batched generation by a vanilla GPT."""
    prompt = torch.zeros((batch, 1), dtype=torch.long, device=model.lm_head.weight.device)
    start = time.perf_counter()
    generate(model, prompt, tokens)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return batch * tokens / (time.perf_counter() - start)


def decoder_vs_vanilla(model, batch, tokens, repeats, rng):
    vanilla = GPT(GPTConfig(**{**model.config.to_dict(), "gated": False})).to(model.lm_head.weight.device).eval()
    vanilla.load_state_dict(model.state_dict(), strict=False)  # the same weights (less the unit scores): the
    # same activations, so that no data-dependent cost (GELU's, for one) parts the two
    alphas = [round(rng.random(), 3) for _ in range(batch)]
    decoder_tokens_per_s(model, alphas, 4), vanilla_tokens_per_s(vanilla, batch, 4)  # warm-up
    ours, theirs = [], []
    for _ in range(repeats):  # alternately, so that the machine's drift falls on both
        ours.append(decoder_tokens_per_s(model, alphas, tokens))
        theirs.append(vanilla_tokens_per_s(vanilla, batch, tokens))
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"decoder at {batch} mixed alphas: {statistics.median(ours):,.0f} tokens/s, vanilla generate "
          f"{statistics.median(theirs):,.0f} tokens/s: {ratio:.2f}x (medians of {repeats})", flush=True)
    return {"batch": batch, "new_tokens": tokens, "decoder_tokens_per_s": spread(ours),
            "vanilla_tokens_per_s": spread(theirs), "decoder_vs_vanilla": ratio}


def batched_vs_alone(url, service, n, tokens, repeats, rng, prompt):
    bodies = [{"prompt": prompt, "alpha": round(rng.random(), 3), "max_new_tokens": tokens,
               "seed": rng.randrange(2**31)} for _ in range(n)]
    send(url, bodies[:1], False)  # warm-up
    speedups, rows = [], []
    for _ in range(repeats):
        service.decoder.largest_batch = 0
        batched, batched_latency = send(url, bodies, True)
        largest = service.decoder.largest_batch
        alone, alone_latency = send(url, bodies, False)
        speedups.append(batched / alone)
        rows.append({"batched_tokens_per_s": batched, "one_at_a_time_tokens_per_s": alone, "largest_batch": largest,
                     "batched_p50_s": percentile(batched_latency, 50), "batched_p95_s": percentile(batched_latency, 95),
                     "one_at_a_time_p50_s": percentile(alone_latency, 50),
                     "one_at_a_time_p95_s": percentile(alone_latency, 95)})
    result = {"clients": n, "new_tokens": tokens, "speedup": spread(speedups), "runs": rows}
    print(f"{n:>3} clients: batched {statistics.median(r['batched_tokens_per_s'] for r in rows):,.0f} tokens/s, "
          f"one at a time {statistics.median(r['one_at_a_time_tokens_per_s'] for r in rows):,.0f}: median "
          f"{result['speedup']['median']:.2f}x (range {min(speedups):.2f}-{max(speedups):.2f}, {repeats} runs)",
          flush=True)
    return result


def fairness(url, service, long_n, long_tokens, short_n, short_tokens, prompt):
    """Latencies of short requests sent one after another while long_n long requests are decoded."""
    short = {"prompt": prompt, "alpha": 0.5, "max_new_tokens": short_tokens, "seed": 1}
    idle = []
    for _ in range(3):
        timed_post(url, short, idle)
    busy, long_latencies = [], []
    longs = [threading.Thread(target=timed_post, args=(url, {"prompt": prompt, "alpha": i / long_n, "seed": i,
                                                             "max_new_tokens": long_tokens}, long_latencies))
             for i in range(long_n)]
    for t in longs:
        t.start()
    while len(service.decoder.active) < long_n:
        time.sleep(0.01)
    for _ in range(short_n):
        timed_post(url, short, busy)
    still_running = sum(t.is_alive() for t in longs)
    for t in longs:
        t.join()
    result = {"long_requests": long_n, "long_tokens": long_tokens, "short_requests": short_n,
              "short_tokens": short_tokens, "short_idle_p50_s": percentile(idle, 50),
              "short_busy_p50_s": percentile(busy, 50), "short_busy_p95_s": percentile(busy, 95),
              "long_p50_s": percentile(long_latencies, 50), "long_still_running_after_shorts": still_running}
    print(f"fairness: {short_n} requests of {short_tokens} tokens beside {long_n} of {long_tokens}: p50/p95 "
          f"{result['short_busy_p50_s']:.2f}/{result['short_busy_p95_s']:.2f} s (idle server: "
          f"{result['short_idle_p50_s']:.2f} s; the long ones took {result['long_p50_s']:.1f} s)", flush=True)
    return result


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to serve")
    p.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients")
    p.add_argument("--new_tokens", type=int, default=100, help="tokens per request")
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each comparison")
    p.add_argument("--long", type=int, default=32, help="long requests in the fairness test")
    p.add_argument("--long_tokens", type=int, default=500, help="tokens of each long request")
    p.add_argument("--short_tokens", type=int, default=50, help="tokens of each short request")
    p.add_argument("--quick", action="store_true", help="small sizes and one repeat: checks the script")
    p.add_argument("--out", help="the JSON file this writes")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    if args.quick:  # enough tokens that four clients surely overlap
        args.clients, args.new_tokens, args.repeats = "1,4", 32, 1
        args.long, args.long_tokens, args.short_tokens = 4, 64, 8
    clients = [int(n) for n in args.clients.split(",")]
    model, tokenizer, saved = load_model(args.ckpt, args.device)
    rng = random.Random(0)
    record = {**environment(args.device), "checkpoint": str(args.ckpt), "threads": torch.get_num_threads(),
              "model": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")}}
    record["decoder"] = [decoder_vs_vanilla(model, n, args.new_tokens, args.repeats, rng) for n in clients]
    most = max(*clients, args.long)
    service = Service(model, tokenizer, saved, max_batch=most, max_new_tokens=max(args.new_tokens, args.long_tokens),
                      timeout=3600)
    server, url = start_server(service, max_connections=4 * most)
    prompt = tokenizer.decode([rng.randrange(model.config.vocab_size)])
    try:
        record["serving"] = [batched_vs_alone(url, service, n, args.new_tokens, args.repeats, rng, prompt)
                             for n in clients]
        record["fairness"] = fairness(url, service, args.long, args.long_tokens, 16 if not args.quick else 3,
                                      args.short_tokens, prompt)
    finally:
        server.should_exit = True
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, record)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
