"""Write a report on how well the dial works: sweep, cost of the dial, calibration, samples, plots.

    python train.py --baselines                      # the gated run, then one vanilla GPT per source
    python report.py --ckpt out/ckpt.pt --out_dir reports/my-run

Baselines are found beside the checkpoint (out/baseline-NAME/, as train.py
--baselines writes them) and judged at their best held-out val (best.pt), with
their final value beside; without them the cost of the dial is "not measured".
The gated run's corners are also given at its own best.pt. With a calibrated dial
in the checkpoint (calibrate.py), the report scores it on fresh samples.
Plots need matplotlib (pip install -e ".[report]"); without it the report says they were skipped.
"""
from pathlib import Path

from abcgpt.core.checkpoint import CheckpointError
from abcgpt.measuring.report import (
    build_report, check_report_folder, plots_unavailable, reusable_calibration, reusable_sweep, write_report,
)
from abcgpt.serving import settings
from abcgpt.training.config import ARCHITECTURE
from abcgpt.training.run import DEFAULT_CHECKPOINT, RunFolder, load_gated_run, load_model, require_two_source_line

from .cli import (
    HelpFormatter, Parser, add_generation_flags, add_runtime_flags, add_source_flags, apply_runtime_flags,
    check_generation_flags, check_max_windows, run_tool, user_errors,
)

SHAPE = [f for f in ARCHITECTURE if f not in ("gated", "narrowness", "mask_seed", "score_beta", "sort_units")]


def check_baseline(path, baseline, run, name):
    """A baseline is judged against the run only if it trained on the run's own text of its source with the
    run's model shape and tokenizer."""
    config = baseline.train_config
    if baseline.model_config.gated or config is None or config.only_source != name:
        raise CheckpointError(f"{path} is not a single-source baseline for {name!r}")
    k = run.source_names.index(name)
    if baseline.source_sha256[k:k + 1] != run.source_sha256[k:k + 1]:
        raise CheckpointError(f"{path} was trained on other text for {name!r} than the run was: it is not this "
                              "run's baseline (train it again with train.py --baselines)")
    shape = [f for f in SHAPE if getattr(config, f) != getattr(run.train_config, f)]
    if shape:
        raise CheckpointError(f"{path} has another {', '.join(shape)} than the run: it is not this run's baseline")


def load_baselines(ckpt, run, device):
    """{name: {"best": (model, step), "final": (model, step)}} for each baseline found beside ckpt."""
    baselines = {}
    for name in run.source_names:
        folder = RunFolder.of(ckpt).baseline(name)
        kept = {}
        for which, path in (("best", folder.best), ("final", folder.checkpoint)):
            if path.exists():
                model, _, baseline = load_model(path, device)
                check_baseline(path, baseline, run, name)
                if which == "final" and baseline.step < baseline.train_config.max_iters:
                    raise CheckpointError(f"{path} stopped at step {baseline.step} of {baseline.train_config.max_iters}"
                                          f": finish it with python train.py --resume --baselines --out_dir "
                                          f"{RunFolder.of(ckpt)}")
                kept[which] = (model, baseline.step)
        if kept:
            kept.setdefault("best", kept.get("final"))
            baselines[name] = kept
    return baselines


def same_run(best, run):
    """Whether best is an earlier state of run: the same run id (older checkpoints, without one: the same
    seed and settings), at a step not after run's."""
    if best.run_id is not None or run.run_id is not None:
        same = best.run_id == run.run_id
    else:
        same = best.seed == run.seed and best.source_names == run.source_names and all(
            getattr(best.train_config, f) == getattr(run.train_config, f) for f in ARCHITECTURE)
    return same and best.step <= run.step


def load_best(ckpt, run, device):
    """The gated run's best checkpoint beside ckpt, as (model, step), unless ckpt is that one."""
    path = RunFolder.of(ckpt).best
    if not path.exists() or path.resolve() == Path(ckpt).resolve():
        return None
    model, _, best = load_model(path, device)
    if not same_run(best, run):
        raise CheckpointError(f"{path} is not {ckpt}'s best checkpoint: it is of another run (run id, settings or "
                              "later step); move it away, or report on it with --ckpt")
    return model, best.step


@user_errors
def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--ckpt", default=DEFAULT_CHECKPOINT, help="checkpoint written by train.py")
    p.add_argument("--out_dir", required=True, help="the folder this writes report.md, report.json and the plots into")
    p.add_argument("--title", default=None, help="the report's title (default: names the checkpoint)")
    add_source_flags(p)
    add_generation_flags(p, 32, "samples per alpha for the calibration curve, and per mix for the calibrated dial",
                         200)
    p.add_argument("--max_windows", type=int, default=None, help="score at most this many val windows per source")
    p.add_argument("--seed", type=int, default=1337, help="seeds the samples")
    add_runtime_flags(p)
    args = p.parse_args(argv)
    apply_runtime_flags(args)
    check_report_folder(args.out_dir)
    check_max_windows(args.max_windows)
    settings.check_seed(args.seed, "--seed")
    model, tokenizer, run, corpus = load_gated_run(args.ckpt, args.device, args.sources, args.cache_dir)
    require_two_source_line(run, args.ckpt, "the dial's report")
    check_generation_flags(args, args.device, model.config)
    baselines = load_baselines(args.ckpt, run, args.device)
    best = load_best(args.ckpt, run, args.device)
    evaluation = RunFolder.of(args.ckpt).evaluation
    reused_sweep = reusable_sweep(evaluation, run.weights_sha256, args.max_windows, corpus)
    reused_calibration = reusable_calibration(run.dial_map, args.samples, args.max_new_tokens)
    for what, where, reused in (("the held-out sweep", evaluation, reused_sweep),
                                ("the calibration samples", f"{args.ckpt}'s calibrated map", reused_calibration)):
        if reused:
            print(f"reusing {what} of this checkpoint from {where}")
    report = build_report(model, tokenizer, run, corpus, baselines, args.samples, args.max_new_tokens,
                          args.max_windows, args.device, args.seed, best, reused_sweep, reused_calibration)
    path = write_report(report, args.out_dir, args.title or f"abcGPT report: {args.ckpt}")
    skipped = plots_unavailable()
    print(f"wrote {path}" + (f"; plots skipped: {skipped}" if skipped else ""))


def command():
    """python report.py, python -m abcgpt.tools.report and the console script abcgpt-report."""
    run_tool(main)


if __name__ == "__main__":
    command()
