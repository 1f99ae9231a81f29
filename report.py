"""Write a report on how well the dial works: sweep, cost of the dial, calibration, samples, plots.

    python train.py --baselines                      # the gated run, then one vanilla GPT per source
    python report.py --ckpt out/ckpt.pt --out reports/my-run

Baselines are found beside the checkpoint (out/baseline-NAME/ckpt.pt, as train.py
--baselines writes them); without them the cost of the dial is "not measured".
Plots need matplotlib (pip install matplotlib).
"""
import argparse
import sys
from pathlib import Path

from abcgpt.checkpoint import CheckpointError, load_model
from abcgpt.data import DataError
from abcgpt.device import resolve_device
from abcgpt.evaluate import corpus_for, require_gated
from abcgpt.report import build_report, write_report


def load_baselines(ckpt, names, device):
    baselines = {}
    for name in names:
        path = Path(ckpt).parent / f"baseline-{name}" / "ckpt.pt"
        if path.exists():
            model, _, state = load_model(path, device)
            if model.config.gated or state["train_config"].get("only_source") != name:
                raise CheckpointError(f"{path} is not a single-source baseline for {name!r}")
            baselines[name] = model
    return baselines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/ckpt.pt")
    p.add_argument("--out", required=True, help="folder for report.md, report.json and the plots")
    p.add_argument("--title", default=None)
    p.add_argument("--sources", help="NAME or NAME=PATH, comma-separated (default: the run's own)")
    p.add_argument("--cache_dir", default=None)
    p.add_argument("--samples", type=int, default=8, help="samples per alpha for the calibration curve")
    p.add_argument("--sample_tokens", type=int, default=200)
    p.add_argument("--max_windows", type=int, default=None, help="score at most this many val windows per source")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto (CUDA if there is one), cpu, cuda or cuda:N")
    args = p.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        model, tokenizer, state = load_model(args.ckpt, args.device)
        require_gated(model, args.ckpt)
        corpus = corpus_for(state, tokenizer, args.sources, args.cache_dir)
        baselines = load_baselines(args.ckpt, corpus.names, args.device)
    except (CheckpointError, DataError, ValueError) as e:
        sys.exit(f"error: {e}")
    report = build_report(model, tokenizer, state, corpus, baselines, args.samples, args.sample_tokens,
                          args.max_windows, args.device, args.seed)
    path = write_report(report, args.out, args.title or f"abcGPT report: {args.ckpt}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
