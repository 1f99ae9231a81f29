"""Print what a checkpoint holds: its sources, model and training settings, step, held-out losses and size.

    python -m abcgpt.tools.inspect out/ckpt.pt
"""
import math
from pathlib import Path

import torch

from abcgpt.data.corpus import source_alphas
from abcgpt.measuring.dial import mix_to_alpha
from abcgpt.serving.settings import calibrated_at, described
from abcgpt.training.run import Run

from .cli import HelpFormatter, Parser, run_tool, user_errors


def units_nearest(state, n_sources):
    """How many units sit nearest each source's vertex (shared units at the centre not counted)."""
    places = torch.cat([t for name, t in state.items() if name.endswith("_scores")])
    top, nearest = places.max(-1)
    return torch.bincount(nearest[top * n_sources > 1.0 + 1e-6], minlength=n_sources).tolist()


def describe(path, run):
    """The checkpoint as lines of text."""
    model, train, names = run.model_config, run.train_config, run.source_names
    digests = run.source_sha256 or [None] * len(names)
    n_params = sum(t.numel() for name, t in run.model.items()
                   if not name.endswith("_scores") and name != "lm_head.weight")  # lm_head is tied to wte
    lines = [
        f"{path}: {Path(path).stat().st_size / 2**20:.1f} MiB, step {run.step}, format {run.format}, "
        f"written by abcgpt {run.version}",
        f"model: {'gated' if model.gated else 'vanilla'}, {model.n_layer} layers, {model.n_head} heads, "
        f"{model.n_embd} wide, block {model.block_size}, vocab {model.vocab_size}, "
        f"{n_params / 1e6:.2f}M parameters, narrowness {model.narrowness}, mask_seed {model.mask_seed}",
        f"tokenizer: {run.tokenizer['kind']}",
        "sources (dial order):",
    ]
    seen = run.tokens_seen or [None] * len(names)
    geometry = getattr(model, "geometry", "line")
    if geometry == "line":
        places = [f"alpha {a:g}" for a in source_alphas(max(2, len(names)))]
    else:
        lines[-1] = (f"sources, on the {geometry} dial{f' (shared share {model.shared:g})' if geometry == 'pool' else ''}"
                     ": each at its own vertex, with the units nearest it:")
        counts = units_nearest(run.model, len(names)) if model.gated else [None] * len(names)
        places = [f"vertex {k}" + (f" ({c:,} units)" if c is not None else "") for k, c in enumerate(counts)]
    for name, place, digest, tokens in zip(names, places, digests, seen):
        lines.append(f"  {place}: {name}" + (f", sha256 {digest[:16]}..." if digest else "")
                     + (f", {tokens:,} training tokens drawn" if tokens is not None else ""))
    if train is not None:
        lines.append("training: " + ", ".join(f"{k} {getattr(train, k)}" for k in (
            "alpha_mode", "uniform_share", "batch_size", "max_iters", "learning_rate", "min_lr", "dropout", "seed")))
    if run.val_losses:
        lines.append("held-out losses at this step: " + ", ".join(f"{k.removeprefix('val/')} {v:.4f}"
                                                                 for k, v in run.val_losses.items()))
    if run.best_val_loss is not None and math.isfinite(run.best_val_loss):
        lines.append(f"best held-out score of the run so far: {run.best_val_loss:.4f}")
    lines.append(calibration_line(run))
    if run.run_id:
        lines.append(f"run id: {run.run_id}")
    return lines


def calibration_line(run):
    """Whether sample.py --mix can be used, and if so the map calibrate.py stored: alpha for each mix."""
    if not run.dial_map:
        return "calibrated dial: none (python calibrate.py makes one; then sample.py --mix)"
    dial_map, at = run.dial_map, calibrated_at(run.dial_map)
    mixes = ", ".join(f"{m:g} -> {mix_to_alpha(dial_map, m):.3f}" for m in (0.0, 0.25, 0.5, 0.75, 1.0))
    measured = (f", {dial_map['samples_per_alpha']} samples per alpha" if "samples_per_alpha" in dial_map else "")
    return (f"calibrated dial: mix -> alpha {mixes} (measured at {described(at)}, {len(dial_map['alpha'])} "
            f"alphas{measured})")


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("ckpt", help="a checkpoint written by train.py")
    args = p.parse_args(argv)
    run = Run.load(args.ckpt)
    print("\n".join(describe(args.ckpt, run)))


def command():
    """python -m abcgpt.tools.inspect and the console script abcgpt-inspect."""
    run_tool(main)


if __name__ == "__main__":
    command()
