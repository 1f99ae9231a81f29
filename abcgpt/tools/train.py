"""Train a gated GPT: the reference recipe on CUDA, a small CPU preset elsewhere.

    python train.py                                   # TinyStories + tinyshakespeare, shipped with the package
    python train.py --sources tinystories=a.txt,tinyshakespeare=b.txt   # local files
    python train.py --preset cpu --max_iters 500 --out_dir out-small
    python train.py --resume --out_dir out            # continue a run
    python train.py --resume --max_iters 20000 --lr_decay_iters 20000   # extend a run and its schedule
    python train.py --baselines                       # then one vanilla GPT per source, same tokens of it
    torchrun --standalone --nproc_per_node=4 train.py --grad_accum 4

Every setting below is a field of abcgpt.training.config.TrainConfig; a flag left out keeps
its preset's value (or, with --resume, the saved run's).
"""
import argparse
import signal
import sys

from tqdm.auto import tqdm

from abcgpt.core.device import default_device
from abcgpt.core.errors import SettingsError
from abcgpt.training.config import (
    DEFAULT_OUT_DIR, PRESETS, add_config_flags, baseline_config, build_config, default_preset,
)
from abcgpt.training.run import Run, RunFolder
from abcgpt.training.trainer import Trainer

from .cli import HelpFormatter, Parser, add_runtime_flags, apply_runtime_flags, run_tool, user_errors


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: reference on CUDA, cpu elsewhere")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in out_dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an out_dir that already holds a run, replacing its checkpoints and log")
    parser.add_argument("--baselines", action="store_true",
                        help="after the run, train a vanilla GPT on each source alone with as many of its tokens "
                             "as the run saw (into out_dir/baseline-NAME)")
    parser.add_argument("--new_sources", action="store_true",
                        help="with --resume, go on with sources whose text differs from what the run recorded "
                             "(the log records the change)")
    runtime = add_runtime_flags(parser, device=False)
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    options = {k: args.pop(k) for k in ("preset", "resume", "overwrite", "baselines", "new_sources")}
    return options, argparse.Namespace(**{k: args.pop(k) for k in runtime}), args


def resumed_base(overrides):
    """The saved run's settings; a longer --max_iters keeps the saved decay unless --lr_decay_iters says otherwise.
    None for a run that saved no checkpoint, only its log: it starts from nothing."""
    folder = RunFolder(overrides.get("out_dir", DEFAULT_OUT_DIR))
    if folder.holds_only_a_log():
        return None
    if not folder.checkpoint.exists():
        raise SettingsError(f"--resume: {folder} holds no run to continue (no {folder.checkpoint.name}): start one "
                            "without --resume")
    saved = Run.load(folder.checkpoint).train_config
    extends = overrides.get("max_iters", saved.max_iters) != saved.max_iters
    if extends and "lr_decay_iters" not in overrides and not saved.lr_decay_iters:
        overrides["lr_decay_iters"] = saved.max_iters
        print(f"note: the learning rate keeps the saved run's decay (ending at step {saved.max_iters}); "
              "pass --lr_decay_iters to decay over the longer run instead")
    return saved.to_dict()


@user_errors
def main(argv=None):
    options, runtime, overrides = parse_args(argv)
    apply_runtime_flags(runtime)
    base = resumed_base(overrides) if options["resume"] else None
    preset = options["preset"] or default_preset(default_device() == "cuda")
    config = build_config(preset, overrides, base)
    if not options["resume"]:
        print(f"preset: {preset}")
    if options["new_sources"] and not options["resume"]:
        raise SettingsError("--new_sources goes with --resume: a new run records whatever sources it has")
    losses, tokens_seen, names = run(config, options["resume"], options["overwrite"], options["new_sources"])
    if options["baselines"]:
        train_baselines(config, names, tokens_seen, options["resume"], options["overwrite"])


def train_baselines(config, names, tokens_seen, resume, overwrite):
    """One vanilla GPT per source on as many of its tokens as the run saw; with resume, a baseline cut short
    goes on from its checkpoint and a finished one is kept."""
    folder = RunFolder(config.out_dir)
    for name, tokens in tqdm(list(zip(names, tokens_seen)), desc="baselines", unit="source"):
        baseline = baseline_config(config, name, tokens, folder.baseline(name))
        where = RunFolder(baseline.out_dir)
        done = Run.load(where.checkpoint).step if resume and where.checkpoint.exists() else None
        if done is not None and done >= baseline.max_iters:
            tqdm.write(f"baseline: {name} is done ({where.checkpoint}, step {done})")
            continue
        tqdm.write(f"baseline: vanilla GPT on {name} alone, {tokens:,} tokens"
                   + (f", from step {done}" if done is not None else ""))
        with folder.lock():  # the run's manifest, so that --overwrite removes exactly what runs wrote
            folder.record(where.path.name)
        run(baseline, resume and where.run_files() != [], overwrite)


def run(config, resume, overwrite, new_sources=False):
    """Train one run; a stop by signal ends the program, after its checkpoint, with 128 + the signal."""
    trainer = Trainer(config, resume=resume, overwrite=overwrite, new_sources=new_sources)
    try:
        losses = trainer.train()
        tokens_seen = trainer.tokens_seen()
    finally:
        trainer.close()
    if trainer.interrupted:
        if trainer.is_master:
            print(f"interrupted: saved {RunFolder(config.out_dir).checkpoint} at step {trainer.step} "
                  f"({signal.Signals(trainer.interrupted).name}); continue with: python train.py --resume --out_dir "
                  f"{config.out_dir}", file=sys.stderr)
        sys.exit(128 + trainer.interrupted)  # as a shell reports a program a signal stopped
    if trainer.is_master and losses:
        print("final held-out losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return losses, tokens_seen, trainer.corpus.names


def command():
    """python train.py, python -m abcgpt.tools.train and the console script abcgpt-train."""
    run_tool(main)


if __name__ == "__main__":
    command()
