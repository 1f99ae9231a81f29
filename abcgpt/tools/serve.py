"""Serve the live dial: a web page with a slider, and an API that decodes many users' requests together.

    pip install -e ".[serve]"
    python serve.py --ckpt out/ckpt.pt                     # http://127.0.0.1:8000
    python serve.py --ckpt out/ckpt.pt --host 0.0.0.0 --port 8080 --max_batch 64 --token "$SECRET"

Beyond loopback, give --token (or ABCGPT_TOKEN): then the API needs "Authorization: Bearer <token>", and the
page takes it from its address, http://host:port/#token=<token>.
"""
import logging
import os
import signal
import socket
import sys
import threading

from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.core.preflight import check_memory, generation_bytes
from abcgpt.serving.access import LOOPBACK_HOSTS, Access, is_loopback
from abcgpt.serving.settings import check_new_tokens
from abcgpt.training.run import DEFAULT_CHECKPOINT, load_model

from .cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags, run_tool, user_errors


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max_batch", type=int, default=32, help="requests decoded together at most")
    p.add_argument("--max_new_tokens", type=int, default=500, help="the most tokens one request may ask for")
    p.add_argument("--max_queue", type=int, help="requests that may wait for a slot; more get 503 "
                   "(default: 4 x --max_batch)")
    p.add_argument("--max_per_client", type=int, help="requests one client (an address) may have decoding at once; "
                   "its others wait their turn (default: an eighth of --max_batch, at least 1)")
    p.add_argument("--max_queued_per_client", type=int, help="requests one client may have waiting; more get 429 "
                   "(default: --max_batch)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take, waiting included; "
                   "then it ends with what it has (504, or an error event)")
    p.add_argument("--max_connections", type=int, default=256, help="requests in flight at most; more get 503 "
                   "with Retry-After. Twice as many connections may be open; past that, idle ones are closed first")
    p.add_argument("--header_timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers, and again its body")
    p.add_argument("--token", default=os.environ.get("ABCGPT_TOKEN"),
                   help="require 'Authorization: Bearer TOKEN' on the API (default: $ABCGPT_TOKEN)")
    p.add_argument("--allow_same_site", action="store_true",
                   help="take API requests from pages on other subdomains of this site (Sec-Fetch-Site: same-site)")
    p.add_argument("--allow_host", action="append", default=[], metavar="NAME",
                   help="a host name clients may reach the server by, beyond loopback and --host (repeatable)")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    try:
        import uvicorn

        from abcgpt.serving.connections import server_config
        from abcgpt.serving.server import Service, create_app
    except ImportError as e:
        sys.exit(f"error: serving needs the [serve] extra ({e.name} is missing): pip install -e \".[serve]\"")
    apply_runtime_flags(args)
    check_new_tokens(args.max_new_tokens, "--max_new_tokens", least=1)
    for flag in ("max_batch", "max_queue", "max_per_client", "max_queued_per_client", "max_connections", "port",
                 "timeout", "header_timeout"):
        if getattr(args, flag) is not None:
            limits.check(flag.replace("header_", ""), getattr(args, flag), f"--{flag}")
    if args.token is not None and not args.token.strip():
        raise SettingsError("--token must not be empty")
    model, tokenizer, run = load_model(args.ckpt, args.device)
    check_memory(generation_bytes(model.config, args.max_batch), args.device, f"--max_batch {args.max_batch:,}")
    listening = bind(args.host, args.port)
    wildcard = args.host in ("0.0.0.0", "::", "")
    hosts = None if wildcard and not args.allow_host else [*LOOPBACK_HOSTS, args.host, *args.allow_host]
    if not is_loopback(args.host):
        print(f"warning: listening on {args.host or 'every address'}: anyone who can reach it can use it"
              + ("" if args.token else "; give --token to require a token")
              + ("; any Host name is taken: give --allow_host NAME to name yours" if hosts is None else ""),
              file=sys.stderr, flush=True)
    service = Service(model, tokenizer, run, args.max_batch, args.max_new_tokens, max_queue=args.max_queue,
                      timeout=args.timeout, body_timeout=args.header_timeout, max_per_client=args.max_per_client,
                      max_queued_per_client=args.max_queued_per_client,
                      access=Access(hosts, args.token, args.allow_same_site), decoder_thread=False)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    host, port = listening.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {args.ckpt} on http://{shown}:{port} (Ctrl-C stops)", flush=True)  # the bound port, for --port 0
    config = server_config(create_app(service), args.host, port, args.max_connections, args.header_timeout)
    serve_beside(uvicorn.Server(config), listening, service)


def serve_beside(server, listening, service):
    """The HTTP server in a thread of its own, and the decoder on this one (the thread that loaded the model,
    where torch's thread pool runs fastest), until Ctrl-C or SIGTERM."""
    http = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, name="http", daemon=True)
    http.start()
    while not service.started.wait(0.1):
        if not http.is_alive():
            raise SystemExit("error: the HTTP server did not start")
    signal.signal(signal.SIGTERM, lambda *_: service.decoder.stop())
    try:
        service.decoder.serve(service.loop)
    finally:
        server.should_exit = True
        http.join(timeout=10)


def bind(host, port):
    """The listening socket, bound by us rather than by uvicorn: a port in use is one line, and --port 0 gets a
    free port whose number the server then prints."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as e:
        listening.close()
        raise SettingsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    listening.listen(2048)
    listening.set_inheritable(True)
    return listening


def command():
    """python serve.py, python -m abcgpt.tools.serve and the console script abcgpt-serve."""
    run_tool(main)


if __name__ == "__main__":
    command()
