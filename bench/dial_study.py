"""The recipe study: which training settings give the strongest, best-calibrated dial (issue: the dial).

    python -m bench.dial_study --sources tinystories=A.txt,tinyshakespeare=B.txt --runs /tmp/study \\
        --out_dir reports/recipe-study-2 --jobs 2

Trains the CPU preset once per setting (and two seeds for --finalists), plus one
vanilla baseline per source, then measures for each run: contrast, diag and middle
on held-out val; the raw dial's calibration (mean P(source 1 | sample) at 11
alphas, its Spearman correlation and whether it rises monotonically); and the cost
of the dial against each baseline's best held-out val. Writes study.json, study.md
and study.png into --out_dir. Runs already finished in --runs are reused.
"""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from abcgpt.core.atomic import save_figure, write_json, write_text
from abcgpt.measuring.dial import classifier_for, measure
from abcgpt.measuring.loss import SWEEP, summarize, sweep, val_loss
from abcgpt.measuring.report import calibration_summary
from abcgpt.tools.cli import HelpFormatter, Parser
from abcgpt.training.config import baseline_config
from abcgpt.training.run import Run, RunFolder, corpus_for, load_model

SETTINGS = {  # name: train.py flags on top of the CPU preset
    "default": [],  # the CPU preset as it stands: one alpha per sequence
    "per-batch": ["--alpha_mode", "batch"],  # the reference recipe's one alpha per batch
    "narrow-0.75": ["--narrowness", "0.75"],
    "narrow-0.5": ["--narrowness", "0.5"],
    "beta-0.3": ["--score_beta", "0.3"],
    "beta-1": ["--score_beta", "1.0"],
    "dropout-0.1": ["--dropout", "0.1"],
    "steps-2000": ["--max_iters", "2000"],  # the preset before round 2 (reports/recipe-study-2)
}


def train(name, flags, args, seed):
    out = RunFolder(Path(args.runs) / f"{name}-seed{seed}")
    if out.checkpoint.exists():
        run = Run.load(out.checkpoint)
        if run.step >= run.train_config.max_iters:
            return out
    command = [sys.executable, "train.py", "--preset", "cpu", "--sources", args.sources, "--out_dir", str(out),
               "--threads", "1", "--seed", str(seed), "--overwrite", *flags]
    with open(Path(args.runs) / f"{name}-seed{seed}.log", "w") as log:  # train.py's output, beside its run
        subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=True)
    return out


def measure_run(path, baselines, args):
    model, tokenizer, run = load_model(path.checkpoint)
    corpus = corpus_for(run, tokenizer)
    alphas, losses = sweep(model, corpus, SWEEP, max_windows=args.windows)
    summary = summarize(corpus.names, alphas, losses)
    scores = measure(model, tokenizer, classifier_for(corpus), SWEEP, args.samples, 150, 7, "cpu")
    calibration = calibration_summary(SWEEP, scores)
    cost = {n: summary["corner_loss"][n] / baselines[n] - 1 for n in corpus.names if n in baselines}
    return {"contrast": summary["contrast"], "corner_loss": summary["corner_loss"], "diag": summary["diag"],
            "middle": summary["middle"], "calibration": calibration["mean_p_source_1"],
            "spearman": calibration["spearman"], "monotone": calibration["monotone"], "cost_vs_best_baseline": cost}


def baseline_losses(run, args):
    """Each source's vanilla baseline at its best held-out val, trained on as many of that source's tokens as
    run saw; shared by the runs of run's length, which draw about as many."""
    saved = Run.load(run.checkpoint)
    length = saved.train_config.max_iters
    losses = {}
    for k, name in enumerate(saved.source_names):
        folder = RunFolder(Path(args.runs) / f"baseline-{name}-{length}steps")
        if not folder.best.exists():  # trained as train.py --baselines would (config.baseline_config)
            steps = baseline_config(saved.train_config, name, saved.tokens_seen[k], folder).max_iters
            subprocess.run([sys.executable, "train.py", "--preset", "cpu", "--sources", args.sources, "--gated",
                            "false", "--only_source", name, "--max_iters", str(steps), "--out_dir", str(folder),
                            "--threads", "2", "--overwrite"], stdout=subprocess.DEVNULL, check=True)
        model, tokenizer, best = load_model(folder.best)
        corpus = corpus_for(best, tokenizer)
        losses[name] = val_loss(model, corpus.val[k], None, max_windows=args.windows)
    return losses


def write(results, baselines, args):
    """baselines: {run length in steps: {source: best held-out val}}."""
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", {"baselines_best_val": baselines, "runs": results})
    names = list(next(iter(baselines.values())))
    lines = ["# Recipe study (CPU preset, shared corpora)", "",
             "Baselines (vanilla, one source each, as many of its tokens as the first gated run of that length saw; "
             "best held-out val):", ""]
    lines += [f"- {length} steps: " + ", ".join(f"{n} {v:.4f}" for n, v in losses.items())
              for length, losses in baselines.items()]
    lines += ["", "| run | steps | " + " | ".join(f"contrast {n}" for n in names) + " | diag | middle | Spearman | "
              "monotone | " + " | ".join(f"cost {n}" for n in names) + " | calibration at alpha 0, 0.1, ..., 1 |",
              "| --- |" + " ---: |" * (2 * len(names) + 5) + " --- |"]
    for run, r in results.items():
        lines.append(f"| {run} | {r['steps']} | " + " | ".join(f"{r['contrast'][n]:+.3f}" for n in names)
                     + f" | {r['diag']:.3f} | {r['middle']:.3f} | {r['spearman']:.3f} | {'yes' if r['monotone'] else 'no'} | "
                     + " | ".join(f"{r['cost_vs_best_baseline'][n]:+.1%}" for n in names)
                     + " | " + " ".join(f"{p:.2f}" for p in r["calibration"]) + " |")
    write_text(out / "study.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run, r in results.items():
        ax.plot(SWEEP, r["calibration"], marker=".", label=run)
    ax.plot([0, 1], [0, 1], linestyle=":", color="0.5")
    ax.set(xlabel="alpha", ylabel=f"mean P({names[-1]} | sample)", title="Raw dial calibration per setting")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "study.png", dpi=120)


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sources", required=True, help="NAME=PATH,NAME=PATH")
    p.add_argument("--runs", required=True, help="the folder the training runs go into")
    p.add_argument("--out_dir", required=True, help="the folder this writes study.json, study.md and study.png into")
    p.add_argument("--settings", default=",".join(SETTINGS), help="which settings to run")
    p.add_argument("--finalists", default="", help="settings to repeat with a second seed")
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--samples", type=int, default=16, help="samples per alpha for the raw calibration")
    p.add_argument("--windows", type=int, default=300, help="val windows per source and alpha")
    args = p.parse_args(argv)
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    plan = [(s, 1337) for s in args.settings.split(",")] + [(s, 7) for s in args.finalists.split(",") if s]
    with ThreadPoolExecutor(args.jobs) as pool:
        paths = list(pool.map(lambda job: train(job[0], SETTINGS[job[0]], args, job[1]), plan))
    lengths = [Run.load(path.checkpoint).train_config.max_iters for path in paths]
    baselines = {}  # by run length, on the tokens of the first run of each length
    for path, length in zip(paths, lengths):
        if length not in baselines:
            baselines[length] = baseline_losses(path, args)
    results = {f"{name} (seed {seed})": {"steps": length, **measure_run(path, baselines[length], args)}
               for (name, seed), path, length in zip(plan, paths, lengths)}
    write(results, baselines, args)
    print(f"wrote {Path(args.out_dir) / 'study.md'}")


if __name__ == "__main__":
    main()
