"""Batched serving against serving one request at a time: tokens/s and latency with N concurrent clients.

    python -m bench.serve_throughput --ckpt out/ckpt.pt --out bench/results/serve-DEVICE-DATE.json
    python -m bench.serve_throughput --ckpt out/ckpt.pt --quick

Starts the real server (serve.py's app under uvicorn) on a free local port. For
each N in --clients, N clients each send one /api/generate request at a random
alpha, all at once; the same N requests are then sent one at a time. Reports
tokens/s over the whole batch of requests, and p50/p95 request latency, for both,
and their ratio; and a vanilla GPT's batched generation at the same batch size (no
server, one dial), for the cost of mixed alphas.
"""
import json
import random
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx2
import torch
import uvicorn

from abcgpt.cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags
from abcgpt.model import GPT, GPTConfig
from abcgpt.run import load_model
from abcgpt.sampling import generate
from abcgpt.serve import Service, create_app
from bench.timing import environment


def start_server(service):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
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


def run(url, bodies, concurrent):
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
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def vanilla_batched(config, batch, tokens, device):
    """tokens/s of one batched generation by a vanilla GPT of the same shape (weights do not matter)."""
    model = GPT(GPTConfig(**{**config.to_dict(), "gated": False})).to(device).eval()
    prompt = torch.zeros((batch, 1), dtype=torch.long, device=device)
    generate(model, prompt, 4)
    start = time.perf_counter()
    generate(model, prompt, tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * tokens / (time.perf_counter() - start)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint to serve")
    p.add_argument("--clients", default="1,8,32", help="numbers of concurrent clients")
    p.add_argument("--new_tokens", type=int, default=100, help="tokens per request")
    p.add_argument("--quick", action="store_true", help="clients 1,4 and 32 tokens: checks the script")
    p.add_argument("--out", help="the JSON file this writes")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    if args.quick:
        args.clients, args.new_tokens = "1,4", 32  # enough tokens that four clients surely overlap
    clients = [int(n) for n in args.clients.split(",")]
    model, tokenizer, saved = load_model(args.ckpt, args.device)
    service = Service(model, tokenizer, saved, max_batch=max(clients), max_new_tokens=args.new_tokens)
    server, url = start_server(service)
    rng = random.Random(0)
    prompt = tokenizer.decode([rng.randrange(model.config.vocab_size)])
    results = []
    try:
        for n in clients:
            bodies = [{"prompt": prompt, "alpha": round(rng.random(), 3), "max_new_tokens": args.new_tokens,
                       "seed": rng.randrange(2**31)} for _ in range(n)]
            run(url, bodies[:1], False)  # warm-up
            service.decoder.largest_batch = 0
            batched, batched_latency = run(url, bodies, True)
            largest = service.decoder.largest_batch
            alone, alone_latency = run(url, bodies, False)
            row = {"clients": n, "new_tokens": args.new_tokens, "largest_batch": largest,
                   "batched_tokens_per_s": batched, "one_at_a_time_tokens_per_s": alone, "speedup": batched / alone,
                   "batched_p50_s": percentile(batched_latency, 50), "batched_p95_s": percentile(batched_latency, 95),
                   "one_at_a_time_p50_s": percentile(alone_latency, 50),
                   "one_at_a_time_p95_s": percentile(alone_latency, 95)}
            row["vanilla_generate_tokens_per_s"] = vanilla_batched(model.config, n, args.new_tokens, args.device)
            row["batched_vs_vanilla"] = batched / row["vanilla_generate_tokens_per_s"]
            results.append(row)
            print(f"{n:>3} clients: batched {batched:,.0f} tokens/s (largest step {largest}), one at a time "
                  f"{alone:,.0f} tokens/s: {batched / alone:.2f}x; p50/p95 latency batched "
                  f"{row['batched_p50_s']:.2f}/{row['batched_p95_s']:.2f} s, alone "
                  f"{row['one_at_a_time_p50_s']:.2f}/{row['one_at_a_time_p95_s']:.2f} s", flush=True)
    finally:
        server.should_exit = True
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        record = {**environment(args.device), "checkpoint": str(args.ckpt), "threads": torch.get_num_threads(),
                  "model": {k: getattr(model.config, k) for k in ("n_layer", "n_head", "n_embd", "block_size")},
                  "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
