"""Generate text from a trained abcGPT checkpoint at one or more dial settings.

    python sample.py --alpha 0.3
    python sample.py --ckpt out/ckpt.pt --alpha 0,0.5,1 --start "ROMEO:" --num_samples 2
    python sample.py --alpha 1 --start FILE:prompt.txt --max_new_tokens 500 --top_k 50
"""
import argparse
import math
import sys

import torch

from abcgpt.checkpoint import CheckpointError, load_model
from abcgpt.device import resolve_device
from abcgpt.sampling import generate
from abcgpt.tokenizer import UnknownCharactersError


class InputError(ValueError):
    pass


def parse_alphas(text):
    """'0.3' or '0,0.5,1' to a list of floats in [0, 1]."""
    alphas = []
    for part in text.split(","):
        try:
            alpha = float(part)
        except ValueError:
            raise InputError(f"--alpha: {part.strip()!r} is not a number (give one value or a list like 0,0.5,1)") from None
        if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
            raise InputError(f"--alpha: {part.strip()} is outside [0, 1]")
        alphas.append(alpha)
    return alphas


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--start: cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    p.add_argument("--alpha", default="0.5", help="the dial: one value in [0, 1] or a list such as 0,0.5,1")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=1, help="samples per alpha")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda or cuda:N")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        alphas = parse_alphas(args.alpha)
        if args.temperature <= 0 or args.num_samples < 1 or args.max_new_tokens < 0 or args.top_k < 1:
            raise InputError("--temperature and --top_k must be positive, --num_samples at least 1, --max_new_tokens not negative")
        prompt = read_prompt(args.start)
        model, tokenizer, _ = load_model(args.ckpt, args.device)
        try:
            start_ids = tokenizer.encode(prompt)
        except UnknownCharactersError as e:
            raise InputError(f"--start: the prompt has {e}") from None
        if not start_ids:
            raise InputError("--start: the prompt is empty")
    except (ValueError, CheckpointError) as e:
        sys.exit(f"error: {e}")

    gated = model.config.gated
    for alpha in alphas if gated else [None]:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        idx = torch.tensor([start_ids] * args.num_samples, dtype=torch.long, device=args.device)
        out = generate(model, idx, args.max_new_tokens, alpha, args.temperature, args.top_k, generator)
        for row in out.tolist():
            print(f"--- alpha {alpha}" if gated else "---")
            print(tokenizer.decode(row))


if __name__ == "__main__":
    main()
