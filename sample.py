"""Generate text from a trained abcGPT checkpoint at one or more dial settings.

    python sample.py --alpha 0.3
    python sample.py --ckpt out/ckpt.pt --alpha 0,0.5,1 --start "ROMEO:" --num_samples 2
    python sample.py --alpha 1 --start FILE:prompt.txt --max_new_tokens 500 --top_k 50
    python sample.py --mix 0.3      # 30% of source 1's voice, through the map calibrate.py stored
"""
import math
import sys

import torch

from abcgpt.cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags, check_seed
from abcgpt.data import source_alphas
from abcgpt.dial import mix_to_alpha
from abcgpt.errors import SettingsError, UserError
from abcgpt.run import load_model
from abcgpt.sampling import generate
from abcgpt.tokenizer import UnknownCharactersError


class InputError(SettingsError):
    pass


def parse_alphas(text, flag="--alpha"):
    """'0.3' or '0,0.5,1' to a list of floats in [0, 1]."""
    alphas = []
    for part in text.split(","):
        try:
            alpha = float(part)
        except ValueError:
            raise InputError(f"{flag}: {part.strip()!r} is not a number (give one value or a list like 0,0.5,1)") from None
        if math.isnan(alpha) or not 0.0 <= alpha <= 1.0:
            raise InputError(f"{flag}: {part.strip()} is outside [0, 1]")
        alphas.append(alpha)
    return alphas


def dials(args, run):
    """(alpha, label) for each dial asked for: --alpha as is, or --mix through the checkpoint's map."""
    if args.mix is None:
        return [(a, dial_label(a, run.source_names)) for a in parse_alphas(args.alpha)]
    mixes = parse_alphas(args.mix, "--mix")
    if not run.dial_map:
        raise InputError(f"--mix: {args.ckpt} has no calibrated dial; make one with: python calibrate.py --ckpt "
                         f"{args.ckpt} (or use --alpha)")
    return [(mix_to_alpha(run.dial_map, m), f"mix {m} (alpha {mix_to_alpha(run.dial_map, m):.3f})")
            for m in mixes]


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
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt", help="checkpoint written by train.py")
    dial = p.add_mutually_exclusive_group()
    dial.add_argument("--alpha", default="0.5", help="the dial: one value in [0, 1] or a list such as 0,0.5,1")
    dial.add_argument("--mix", default=None, help="the share of source 1's voice, in [0, 1] (or a list), through "
                                                   "the calibrated map calibrate.py stored; instead of --alpha")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file (default: %(default)r)")
    p.add_argument("--num_samples", type=int, default=1, help="samples per alpha")
    p.add_argument("--max_new_tokens", type=int, default=300, help="tokens to generate per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="above 0; lower is more conservative")
    p.add_argument("--top_k", type=int, default=200, help="sample from the k likeliest tokens only")
    p.add_argument("--seed", type=int, default=1337, help="the same seed gives the same text")
    add_runtime_flags(p)
    return p.parse_args(argv)


def check_numbers(args):
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise InputError(f"--temperature must be a positive number, got {args.temperature}")
    if args.top_k < 1 or args.num_samples < 1:
        raise InputError(f"--top_k and --num_samples must be at least 1, got {args.top_k} and {args.num_samples}")
    if args.max_new_tokens < 0:
        raise InputError(f"--max_new_tokens must not be negative, got {args.max_new_tokens}")
    check_seed(args.seed)


def dial_label(alpha, names):
    """'alpha 0.0 (tinystories)' at a source's own corner, 'alpha 0.3' elsewhere."""
    corners = dict(zip(source_alphas(len(names)), names)) if len(names) > 1 else {}
    return f"alpha {alpha}" + (f" ({corners[alpha]})" if alpha in corners else "")


def main(argv=None):
    args = parse_args(argv)
    try:
        apply_runtime_flags(args)
        parse_alphas(args.alpha if args.mix is None else args.mix, "--alpha" if args.mix is None else "--mix")
        check_numbers(args)
        prompt = read_prompt(args.start)
        model, tokenizer, run = load_model(args.ckpt, args.device)
        settings = dials(args, run)
        try:
            start_ids = tokenizer.encode(prompt)
        except UnknownCharactersError as e:
            raise InputError(f"--start: the prompt has {e}") from None
        if not start_ids:
            raise InputError("--start: the prompt is empty")
    except UserError as e:
        sys.exit(f"error: {e}")

    gated = model.config.gated
    for alpha, label in settings if gated else [(None, "")]:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        idx = torch.tensor([start_ids] * args.num_samples, dtype=torch.long, device=args.device)
        out = generate(model, idx, args.max_new_tokens, alpha, args.temperature, args.top_k, generator)
        for row in out.tolist():
            print(f"--- {label}" if gated else "---")
            print(tokenizer.decode(row))


if __name__ == "__main__":
    main()
