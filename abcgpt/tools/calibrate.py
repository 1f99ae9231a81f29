"""Calibrate the dial: measure how much of source 1's voice samples have at each alpha, and store in the
checkpoint a monotone map from a mix (the share of source 1's voice wanted) to alpha.

    python calibrate.py --ckpt out/ckpt.pt                      # 32 samples at each of 21 alphas
    python sample.py --ckpt out/ckpt.pt --mix 0.3                # then ask for a mix instead of an alpha

Each sample is scored by character 4-gram models of the two sources (fitted on
their train splits) as P(source 1 | text); the mean at each alpha, made
non-decreasing by isotonic regression, is the curve the map inverts. The
checkpoint is rewritten atomically, with its checksums, and keeps everything else.
"""
import os
from pathlib import Path

import numpy as np

from abcgpt.core import limits
from abcgpt.core.errors import SettingsError
from abcgpt.core.preflight import check_disk
from abcgpt.data.corpus import DataError
from abcgpt.measuring.dial import classifier_for, fit_map, measure
from abcgpt.serving import settings
from abcgpt.training.run import DEFAULT_CHECKPOINT, editing, load_gated_run, require_two_source_line

from .cli import (
    HelpFormatter, Parser, add_generation_flags, add_runtime_flags, add_source_flags, apply_runtime_flags,
    check_generation_flags, run_tool, user_errors,
)


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="the checkpoint to calibrate (rewritten with its map)")
    add_source_flags(p)
    add_generation_flags(p, 32, "samples per alpha", 200)
    p.add_argument("--grid", type=int, default=21, help="alphas, evenly from 0 to 1")
    p.add_argument("--seed", type=int, default=2024, help="seeds the samples (alpha i uses seed + i)")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    limits.check("grid", args.grid, "--grid")
    settings.check_seed(args.seed, "--seed")
    with editing(args.ckpt) as save:  # no training run rewrites the checkpoint from before it is read
        model, tokenizer, run, corpus = load_gated_run(args.ckpt, args.device, args.sources, args.cache_dir)
        require_two_source_line(run, args.ckpt, "the calibrated mix")
        if not os.access(args.ckpt, os.W_OK):
            raise SettingsError(f"--ckpt: cannot write {args.ckpt} (no write permission), where the map goes")
        if len(corpus.names) != 2:
            raise DataError(f"calibration needs two sources, the checkpoint has {len(corpus.names)}")
        check_generation_flags(args, args.device, model.config)
        check_disk(Path(args.ckpt).parent, Path(args.ckpt).stat().st_size, "rewriting the checkpoint")
        alphas = [round(float(a), 6) for a in np.linspace(0.0, 1.0, args.grid)]
        scores = measure(model, tokenizer, classifier_for(corpus), alphas, args.samples, args.max_new_tokens,
                         args.seed, args.device)
        dial_map = {**fit_map(scores), "samples_per_alpha": args.samples, "sample_tokens": args.max_new_tokens,
                    "seed": args.seed, "scores": {str(a): s for a, s in scores.items()}}  # report.py reuses them
        print(f"P({corpus.names[1]} | sample), mean of {args.samples} samples, and the fitted monotone curve:")
        for a, fitted in zip(dial_map["alpha"], dial_map["p"]):
            print(f"  alpha {a:.3f}: measured {np.mean(scores[a]):.3f}, fitted {fitted:.3f}")
        run.dial_map = dial_map
        save(run)
    print(f"wrote the map into {args.ckpt}; sample with --mix")


def command():
    """python calibrate.py, python -m abcgpt.tools.calibrate and the console script abcgpt-calibrate."""
    run_tool(main)


if __name__ == "__main__":
    command()
