"""Generate text from a trained abcGPT checkpoint at one or more dial settings.

    python sample.py --alpha 0.3
    python sample.py --ckpt out/ckpt.pt --alpha 0,0.5,1 --start "ROMEO:" --num_samples 2
    python sample.py --alpha 1 --start FILE:prompt.txt --max_new_tokens 500 --top_k 50
    python sample.py --mix 0.3      # 30% of source 1's voice, through the map calibrate.py stored
    python sample.py --voice bible --voice bible=1,poems=2 --voice all   # many sources: by name, a mixture,
                                                                         # uniform mode (every gate open)
"""
import os

import torch

from abcgpt.core.errors import SettingsError
from abcgpt.data.corpus import NotARegularFile, open_regular, source_alphas
from abcgpt.data.tokenizer import TextStream, UnknownCharactersError
from abcgpt.gates.voice import parse_voice
from abcgpt.model.sampling import Generation, generate
from abcgpt.serving import settings
from abcgpt.training.run import DEFAULT_CHECKPOINT, load_model

from .cli import (
    HelpFormatter, Parser, add_generation_flags, add_runtime_flags, apply_runtime_flags, check_generation_flags,
    run_tool, user_errors,
)


class InputError(SettingsError):
    pass


def parse_dials(text, flag="--alpha"):
    """'0.3' or '0,0.5,1' to a list of floats in [0, 1]."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise InputError(f"{flag}: {part.strip()!r} is not a number (give one value or a list like 0,0.5,1)") from None
        values.append(settings.check_unit(value, flag))
    return values


def dials(args, run, sampling):
    """(dial, label, Sampling) for each dial asked for: --voice or --alpha as is, at sampling (the settings given
    or the defaults); or --mix through the checkpoint's map, at the settings it was calibrated at."""
    names, geometry = run.source_names, run.model_config.geometry
    if args.voice is None and args.alpha is None and args.mix is None:  # the dial's middle: alpha 0.5, or all
        args.alpha, args.voice = ("0.5", None) if geometry == "line" else (None, ["all"])
    if args.voice is not None:
        try:
            return [(dial, f"voice {label}", sampling)
                    for dial, label in (parse_voice(text, names, geometry) for text in args.voice)]
        except SettingsError as e:
            raise InputError(f"--voice: {e}") from None
    if geometry != "line":
        flag = "--alpha" if args.mix is None else "--mix"
        raise InputError(f"{flag}: this checkpoint's dial is a mixture of its {len(names)} sources ({geometry}), "
                         "not one line; use --voice NAME, --voice NAME=W,NAME=W or --voice all")
    if args.mix is None:
        return [(a, dial_label(a, names), sampling) for a in parse_dials(args.alpha)]
    if len(names) != 2:
        raise InputError(f"--mix: the calibrated mix is a two-source feature, and this checkpoint has {len(names)} "
                         "sources; use --voice or --alpha")
    missing = (f"--mix: {args.ckpt} has no calibrated dial; make one with: python calibrate.py --ckpt {args.ckpt} "
               "(or use --alpha)")
    resolved = []
    for mix in parse_dials(args.mix, "--mix"):
        alpha, at = settings.resolve_mix(mix, run.dial_map, vars(args), force=args.force, prefix="--", name="--mix",
                                         missing=missing)
        resolved.append((alpha, f"mix {mix} (alpha {alpha:.3f})", at))
    return resolved


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:  # a regular file only, read only if its size is within the bound
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > settings.PROMPT_BYTES:
                raise InputError(f"--start: prompt file {path} has {size:,} bytes; a prompt may have at most "
                                 f"{settings.PROMPT_BYTES:,} (the model reads only its last block_size tokens)")
            return f.read(settings.PROMPT_BYTES + 1).decode("utf-8")
    except NotARegularFile:  # a folder is an OSError below, as it always was
        raise InputError(f"--start: prompt file {path} is not a regular file (a folder, a pipe or a device)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--start: cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None


def parse_args(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    dial = p.add_mutually_exclusive_group()
    dial.add_argument("--alpha", default=None, help="the line dial: one value in [0, 1] or a list such as 0,0.5,1 "
                                                     "(default: 0.5)")
    dial.add_argument("--voice", action="append", default=None,
                      help="a source's name, a mixture NAME=W,NAME=W (weights, made to sum to 1) or 'all' (uniform "
                           "mode: every gate open); repeat for several (default on a many-source dial: all)")
    dial.add_argument("--mix", default=None, help="the share of source 1's voice, in [0, 1] (or a list), through "
                                                   "the calibrated map calibrate.py stored; instead of --alpha")
    p.add_argument("--start", default="\n", help="the prompt, or FILE:path to read it from a file (default: %(default)r)")
    add_generation_flags(p, 1, "samples per dial setting", settings.GENERATION.max_new_tokens)
    settings.add_sampling_flags(p, note="; with --mix, the calibration's")
    p.add_argument("--force", action="store_true", help="with --mix, sample at sampling settings other than the "
                                                        "calibration's, where the mix no longer holds")
    p.add_argument("--seed", type=int, default=settings.SEED, help="the same seed gives the same text")
    add_runtime_flags(p)
    return p.parse_args(argv)


def check_numbers(args):
    """The Sampling of the flags (those given, else the defaults), checked with the seed before the checkpoint
    loads."""
    sampling = settings.sampling(vars(args), prefix="--")
    settings.check_seed(args.seed, "--seed")
    return sampling


def dial_label(alpha, names):
    """'alpha 0.0 (tinystories)' at a source's own corner, 'alpha 0.3' elsewhere."""
    corners = dict(zip(source_alphas(len(names)), names)) if len(names) > 1 else {}
    return f"alpha {alpha}" + (f" ({corners[alpha]})" if alpha in corners else "")


@user_errors
def main(argv=None):
    args = parse_args(argv)
    apply_runtime_flags(args)
    if args.alpha is not None or args.mix is not None:
        parse_dials(args.alpha if args.mix is None else args.mix, "--alpha" if args.mix is None else "--mix")
    sampling = check_numbers(args)
    prompt = read_prompt(args.start)
    model, tokenizer, run = load_model(args.ckpt, args.device)
    check_generation_flags(args, args.device, model.config)
    resolved = dials(args, run, sampling)
    try:
        start_ids = tokenizer.encode(prompt)
    except UnknownCharactersError as e:
        raise InputError(f"--start: the prompt has {e}") from None
    if not start_ids:
        raise InputError("--start: the prompt is empty")

    gated = model.config.gated
    for alpha, label, at in resolved if gated else [(None, "", sampling)]:
        generation = Generation(alpha, at, args.seed, args.max_new_tokens)
        idx = torch.tensor([start_ids] * args.samples, dtype=torch.long, device=args.device)
        heading = f"--- {label}" if gated else "---"
        if args.samples == 1:  # one sample streams as it is generated; several come out whole, one after another
            print(heading)
            print(prompt, end="", flush=True)
            stream = TextStream(tokenizer)
            generate(model, idx, generation,
                     on_token=lambda ids: print(stream.feed(ids[0].tolist()), end="", flush=True))
            print(stream.flush())
            continue
        out = generate(model, idx, generation)
        for row in out.tolist():
            print(heading)
            print(tokenizer.decode(row))


def command():
    """python sample.py, python -m abcgpt.tools.sample and the console script abcgpt-sample."""
    run_tool(main)


if __name__ == "__main__":
    command()
