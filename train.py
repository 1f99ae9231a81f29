"""Train a gated GPT. The reference recipe on CUDA, a small CPU preset elsewhere.

    python train.py                                   # downloads TinyStories + tinyshakespeare
    python train.py --sources tinystories=a.txt,tinyshakespeare=b.txt   # local files, offline
    python train.py --preset cpu --max_iters 500 --out_dir out-small
    python train.py --resume --out_dir out            # continue a run
    python train.py --baselines                       # then one vanilla GPT per source, same tokens of it
    torchrun --standalone --nproc_per_node=4 train.py --grad_accum 4

Every field of abcgpt.config.TrainConfig is a flag (python train.py --help).
"""
import argparse
import sys

from abcgpt.checkpoint import CheckpointError, load_checkpoint
from abcgpt.config import PRESETS, add_config_flags, baseline_config, build_config, default_preset
from abcgpt.data import DataError
from abcgpt.device import default_device
from abcgpt.trainer import CHECKPOINT_NAME, Trainer, TrainingDiverged


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: reference on CUDA, cpu elsewhere")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in out_dir")
    parser.add_argument("--baselines", action="store_true",
                        help="after the run, train a vanilla GPT on each source alone with as many of its tokens "
                             "as the run saw (into out_dir/baseline-NAME)")
    add_config_flags(parser)
    args = vars(parser.parse_args(argv))
    return args.pop("preset"), args.pop("resume"), args.pop("baselines"), args


def main(argv=None):
    preset, resume, baselines, overrides = parse_args(argv)
    try:
        base = None
        if resume:  # the saved run's settings, with only the flags given now on top
            out_dir = overrides.get("out_dir", "out")
            base = load_checkpoint(f"{out_dir}/{CHECKPOINT_NAME}")["train_config"]
        preset = preset or default_preset(default_device() == "cuda")
        config = build_config(preset, overrides, base)
        if not resume:
            print(f"preset: {preset}")
        losses, tokens_seen, names = run(config, resume)
        if losses is None:
            sys.exit(130)
        if baselines:
            for name, tokens in zip(names, tokens_seen):
                print(f"baseline: vanilla GPT on {name} alone, {tokens:,} tokens")
                if run(baseline_config(config, name, tokens), resume=False)[0] is None:
                    sys.exit(130)  # interrupted: the next baseline would start with no one asking
    except (DataError, CheckpointError, ValueError, TrainingDiverged) as e:
        sys.exit(f"error: {e}")


def run(config, resume):
    trainer = Trainer(config, resume=resume)
    try:
        losses = trainer.train()
        tokens_seen = trainer.tokens_seen()
    finally:
        trainer.close()
    if trainer.interrupted:
        if trainer.is_master:
            print(f"interrupted: saved {config.out_dir}/{CHECKPOINT_NAME} at step {trainer.step}; "
                  f"continue with: python train.py --resume --out_dir {config.out_dir}", file=sys.stderr)
        return None, tokens_seen, trainer.corpus.names
    if trainer.is_master and losses:
        print("final held-out losses: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    return losses, tokens_seen, trainer.corpus.names


if __name__ == "__main__":
    main()
