"""Serve the live dial: a web page with a slider, and an API that decodes many users' requests together.

    pip install -e ".[serve]"
    python serve.py --ckpt out/ckpt.pt                     # http://127.0.0.1:8000
    python serve.py --ckpt out/ckpt.pt --host 0.0.0.0 --port 8080 --max_batch 64
"""
import sys

from abcgpt.cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags, positive, run_tool
from abcgpt.errors import SettingsError, UserError
from abcgpt.preflight import check_memory, generation_bytes
from abcgpt.run import load_model


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--max_batch", type=int, default=32, help="requests decoded together at most")
    p.add_argument("--max_new_tokens", type=int, default=500, help="the most tokens one request may ask for")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    try:
        import uvicorn

        from abcgpt.serve import Service, create_app
    except ImportError as e:
        sys.exit(f"error: serving needs the [serve] extra ({e.name} is missing): pip install -e \".[serve]\"")
    try:
        apply_runtime_flags(args)
        positive("--max_batch", args.max_batch)
        positive("--max_new_tokens", args.max_new_tokens)
        if not 0 <= args.port < 65536:
            raise SettingsError(f"--port must be in [0, 65535], got {args.port}")
        model, tokenizer, run = load_model(args.ckpt, args.device)
        check_memory(generation_bytes(model.config, args.max_batch), args.device, f"--max_batch {args.max_batch:,}")
    except UserError as e:
        sys.exit(f"error: {e}")
    service = Service(model, tokenizer, run, args.max_batch, args.max_new_tokens)
    print(f"serving {args.ckpt} on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(service), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_tool(main)
