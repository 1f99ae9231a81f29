"""The judge of many voices: does a dial over N sources pass the method author's two criteria?

    python -m bench.voices --sources a=A.txt,b=B.txt,c=C.txt,d=D.txt,e=E.txt --runs runs/voices \\
        --out_dir reports/voices-5 --designs pool,simplex,tent,pool@shared=0.9@uniform_share=0.1

A design is a geometry's name, optionally with @FLAG=VALUE settings of train.py that differ from the
common --shared and --uniform_share (a variant, to study a setting).

Trains, on the same sources with the same architecture (the CPU preset), steps and batch:
- a gated model for each design (a geometry of docs/design.md, section 8);
- an ungated model on the union, drawing each source as often as the gated ones do;
- an ungated model on each source alone.
Runs already finished in --runs with the same settings are reused.

Then it measures, on each source's held-out split:
- the gated model's loss on every source at every source's setting (a heatmap), and in uniform mode;
- source mode: the loss of source c at c's setting, against the ungated model on c (must be below) and
  against c's own model (within --own_margin);
- uniform mode: the mean over sources with every gate 1, against the ungated model's (within
  --uniform_margin);
- a source-confusion matrix: samples drawn at each source's setting, attributed to a source by character
  n-gram models of the sources' train splits; its diagonal is the share that sounds like the source dialled
  (at least --confusion_target).
It writes voices.json, voices.md and, with matplotlib, voices.png into --out_dir.
"""
import hashlib
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from abcgpt.core.atomic import save_figure, write_json, write_text
from abcgpt.core.tables import markdown_table
from abcgpt.gates.voice import UNIFORM, voices
from abcgpt.measuring.dial import prompt_ids
from abcgpt.measuring.loss import val_loss
from abcgpt.measuring.ngram import SourceClassifier
from abcgpt.model.sampling import Generation, generate
from abcgpt.serving.settings import DEFAULTS
from abcgpt.tools.cli import HelpFormatter, Parser, run_tool
from abcgpt.training.run import Run, RunFolder, corpus_for, load_model

DESIGNS = {  # name: train.py flags that make the design (docs/design.md, section 8)
    "pool": ["--geometry", "pool"],
    "simplex": ["--geometry", "simplex"],
    "tent": ["--geometry", "tent"],
    "line": ["--geometry", "line"],  # today's one line, for comparison
}


def plan(args):
    """[(run name, train.py flags)]: each design's gated model, the ungated model on the union, and one
    ungated model per source."""
    common = ["--preset", "cpu", "--sources", args.sources, "--max_iters", str(args.steps),
              "--eval_interval", str(args.steps), "--eval_iters", "2", "--seed", str(args.seed)]
    runs = []
    for design in args.designs:
        geometry, settings = design_settings(design)
        gated = {"uniform_share": str(args.uniform_share), "shared": str(args.shared), **settings}
        runs.append((f"gated-{design}", common + DESIGNS[geometry] + [part for k, v in gated.items()
                                                                      for part in (f"--{k}", v)]))
    # the union draws sources as a simplex design does: each equally often
    runs.append(("ungated", common + ["--gated", "false", "--geometry", "simplex"]))
    runs += [(f"alone-{name}", common + ["--gated", "false", "--only_source", name]) for name in args.names]
    return runs


def design_settings(design):
    """(geometry, {train.py flag: value}) of a design such as pool@shared=0.9."""
    geometry, *settings = design.split("@")
    pairs = [setting.partition("=") for setting in settings]
    if geometry not in DESIGNS or any(not name or not sep for name, sep, _ in pairs):
        raise ValueError(design)
    return geometry, {name: value for name, _, value in pairs}


def train(name, flags, runs_dir):
    """The run's folder, trained with flags unless a finished run with the same flags is there. The folder
    is named by the flags' digest, so a changed setting never reuses an old run."""
    digest = hashlib.sha256(json.dumps(flags).encode()).hexdigest()[:10]
    folder = RunFolder(Path(runs_dir) / f"{name}-{digest}")
    if folder.checkpoint.exists():
        run = Run.load(folder.checkpoint)
        if run.step >= run.train_config.max_iters:
            return folder
    log = Path(runs_dir) / f"{name}-{digest}.log"
    command = [sys.executable, "train.py", *flags, "--out_dir", str(folder.path), "--threads", "1", "--overwrite"]
    with open(log, "w") as out:  # train.py's output, beside its run
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"error: training {name} failed (exit {done.returncode}); see {log}")
    return folder


def confusion(models, tokenizer, classifier, settings, n_samples, tokens, seed):
    """Row per setting (a model and its dial): the share of its samples attributed to each source. Samples are
    drawn at the product's default temperature and top-k (settings.DEFAULTS), each setting its own seed."""
    start = prompt_ids(tokenizer)
    rows = []
    for i, (model, dial) in enumerate(zip(models, settings)):
        idx = torch.tensor([start] * n_samples, dtype=torch.long)
        out = generate(model, idx, Generation(dial, DEFAULTS, seed + i, tokens))
        picks = [classifier.classify(tokenizer.decode(row[len(start):])) for row in out.tolist()]
        rows.append((np.bincount(picks, minlength=len(classifier.models)) / n_samples).tolist())
    return rows


def measure(folders, args):
    """Every figure of the report, from the trained runs."""
    ungated, tokenizer, run = load_model(folders["ungated"].checkpoint)
    corpus = corpus_for(run, tokenizer)
    names = corpus.names
    loss = lambda model, k, dial: val_loss(model, corpus.val[k], dial, max_windows=args.windows)
    union = {n: loss(ungated, k, None) for k, n in enumerate(names)}
    alone_models = [load_model(folders[f"alone-{n}"].checkpoint)[0] for n in names]
    alone = {n: loss(model, k, None) for k, (n, model) in enumerate(zip(names, alone_models))}
    classifier = SourceClassifier(*(tokenizer.decode(ids.tolist()) for ids in corpus.train))
    if args.max_new_tokens is None:
        args.max_new_tokens = ungated.config.block_size - 1
    # the classifier's own ceiling: samples of each source's own model, attributed alike
    alone_confusion = confusion(alone_models, tokenizer, classifier, [None] * len(names), args.samples,
                                args.max_new_tokens, args.seed)
    designs = {}
    for design in args.designs:
        model, _, gated_run = load_model(folders[f"gated-{design}"].checkpoint)
        settings = voices(names, gated_run.model_config.geometry)
        grid = {label: {n: loss(model, k, dial) for k, n in enumerate(names)} for label, dial in settings}
        own = {n: grid[n][n] for n in names}
        uniform_mean, union_mean = float(np.mean(list(grid[UNIFORM].values()))), float(np.mean(list(union.values())))
        uniform_vs_ungated = uniform_mean / union_mean - 1
        matrix = confusion([model] * len(names), tokenizer, classifier, [dial for _, dial in settings[:-1]],
                           args.samples, args.max_new_tokens, args.seed)
        per_source = {n: {
            "source_mode": own[n],
            "vs_ungated": own[n] / union[n] - 1,
            "vs_alone": own[n] / alone[n] - 1,
            "confusion_diagonal": matrix[k][k],
            "below_ungated": own[n] < union[n],
            "near_alone": own[n] / alone[n] - 1 <= args.own_margin,
            "sounds_like_itself": matrix[k][k] >= args.confusion_target,
        } for k, n in enumerate(names)}
        designs[design] = {
            "grid": grid, "confusion": matrix, "per_source": per_source,
            "uniform_mean": uniform_mean, "union_mean": union_mean, "uniform_vs_ungated": uniform_vs_ungated,
            "passes": {
                "uniform": uniform_vs_ungated <= args.uniform_margin,
                "below_ungated": all(s["below_ungated"] for s in per_source.values()),
                "near_alone": all(s["near_alone"] for s in per_source.values()),
                "confusion": all(s["sounds_like_itself"] for s in per_source.values()),
            },
        }
    return {"names": names, "ungated": union, "alone": alone, "alone_confusion": alone_confusion, "designs": designs}


def markdown(results, args):
    names = results["names"]
    mark = lambda ok: "pass" if ok else "FAIL"
    lines = [f"# Many voices: {len(names)} sources, the CPU preset, {args.steps} steps each", "",
             f"Sources: {', '.join(names)}. Every model has the same architecture, steps and batch; held-out loss in "
             f"nats per character over {args.windows} windows per source. Targets: uniform mode within "
             f"{args.uniform_margin:.0%} of the ungated model on the union; each source at its own setting below the "
             f"ungated model and within {args.own_margin:.0%} of its own model; confusion diagonal at least "
             f"{args.confusion_target:g}. Gated runs: {args.uniform_share:g} of training dials in uniform mode"
             f"{f', pool shared share {args.shared:g}' if any(d.startswith('pool') for d in args.designs) else ''}"
             " unless a design says otherwise. Samples for the confusion matrices: "
             f"{args.samples} per source of {args.max_new_tokens} characters, at temperature {DEFAULTS.temperature} and "
             f"top-k {DEFAULTS.top_k} (the product's defaults). Each source's own model, sampled alike, sounds like its "
             "source in a share of " + ", ".join(f"{n} {row[k]:.2f}" for k, (n, row) in
                                                  enumerate(zip(names, results["alone_confusion"]))) +
             ": the classifier's ceiling.", "",
             "## The criteria per design", ""]
    rows = []
    for design, r in results["designs"].items():
        p = r["passes"]
        rows.append([design, f"{r['uniform_vs_ungated']:+.1%} ({mark(p['uniform'])})",
                     f"{max(s['vs_ungated'] for s in r['per_source'].values()):+.1%} ({mark(p['below_ungated'])})",
                     f"{max(s['vs_alone'] for s in r['per_source'].values()):+.1%} ({mark(p['near_alone'])})",
                     f"{min(s['confusion_diagonal'] for s in r['per_source'].values()):.2f} ({mark(p['confusion'])})"])
    lines += [markdown_table(["design", "uniform vs ungated (union)", "worst source vs ungated",
                              "worst source vs its own model", "lowest confusion diagonal"], rows, range(1, 5)), ""]
    for design, r in results["designs"].items():
        lines += [f"## {design}", "", "Per source, at its own setting:", ""]
        lines += [markdown_table(
            ["source", "gated", "ungated (union)", "alone", "vs ungated", "vs alone", "confusion diagonal"],
            [[n, f"{s['source_mode']:.4f}", f"{results['ungated'][n]:.4f}", f"{results['alone'][n]:.4f}",
              f"{s['vs_ungated']:+.1%}", f"{s['vs_alone']:+.1%}", f"{s['confusion_diagonal']:.2f}"]
             for n, s in r["per_source"].items()], range(1, 7)), ""]
        lines += [f"Uniform mode: mean {r['uniform_mean']:.4f} against the ungated model's {r['union_mean']:.4f} "
                  f"({r['uniform_vs_ungated']:+.1%}).", "", "Loss of each source (columns) at each setting (rows):", ""]
        lines += [markdown_table(["setting", *names], [[label, *(f"{v:.3f}" for v in row.values())]
                                                       for label, row in r["grid"].items()], range(1, len(names) + 1)), ""]
        lines += ["Confusion (rows: the source dialled; columns: the source the samples sound like):", ""]
        lines += [markdown_table(["dialled", *names], [[n, *(f"{v:.2f}" for v in row)]
                                                       for n, row in zip(names, r["confusion"])],
                                 range(1, len(names) + 1)), ""]
    return "\n".join(lines)


def plot(results, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names, designs = results["names"], results["designs"]
    fig, axes = plt.subplots(2, len(designs), figsize=(4.2 * len(designs), 8), squeeze=False)
    for col, (design, r) in enumerate(designs.items()):
        grid = np.array([[r["grid"][label][n] for n in names] for label in [*names, UNIFORM]])
        relative = grid / np.array([results["ungated"][n] for n in names]) - 1
        top = axes[0][col].imshow(relative, cmap="RdBu_r", vmin=-0.3, vmax=0.3)
        axes[0][col].set(xticks=range(len(names)), yticks=range(len(names) + 1))
        axes[0][col].set_title(f"{design}\nloss / ungated - 1", fontsize=9)
        axes[0][col].set_xticklabels(names, rotation=60, fontsize=7)
        axes[0][col].set_yticklabels([*names, UNIFORM], fontsize=7)
        fig.colorbar(top, ax=axes[0][col], fraction=0.046)
        bottom = axes[1][col].imshow(np.array(r["confusion"]), cmap="Greens", vmin=0, vmax=1)
        axes[1][col].set(xticks=range(len(names)), yticks=range(len(names)))
        axes[1][col].set_title(f"{design}\nconfusion (row: dialled)", fontsize=9)
        axes[1][col].set_xticklabels(names, rotation=60, fontsize=7)
        axes[1][col].set_yticklabels(names, fontsize=7)
        fig.colorbar(bottom, ax=axes[1][col], fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return True


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sources", required=True, help="NAME=PATH,NAME=PATH,... (at least two)")
    p.add_argument("--runs", required=True, help="the folder the training runs go into (and are reused from)")
    p.add_argument("--out_dir", required=True, help="the folder for voices.json, voices.md and voices.png")
    p.add_argument("--designs", default="pool", help=f"comma-separated, of {', '.join(DESIGNS)}")
    p.add_argument("--steps", type=int, default=1500, help="training steps of every model")
    p.add_argument("--uniform_share", type=float, default=0.2, help="gated runs: share of dials in uniform mode")
    p.add_argument("--shared", type=float, default=0.75, help="the pool design's share of shared units")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--jobs", type=int, default=2, help="training runs at once (one thread each)")
    p.add_argument("--windows", type=int, default=200, help="held-out windows per source and setting")
    p.add_argument("--samples", type=int, default=64, help="samples per source's setting for the confusion matrix")
    p.add_argument("--max_new_tokens", type=int, default=None,
                   help="characters per sample (default: one context window, block_size - 1, all from the key/value "
                        "cache; past it every token costs a whole window)")
    p.add_argument("--uniform_margin", type=float, default=0.05)
    p.add_argument("--own_margin", type=float, default=0.10)
    p.add_argument("--confusion_target", type=float, default=0.9)
    args = p.parse_args(argv)
    args.designs = [d for d in args.designs.split(",") if d]
    unknown = []
    for design in args.designs:
        try:
            design_settings(design)
        except ValueError:
            unknown.append(design)
    if unknown or not args.designs:
        p.error(f"--designs: unknown {', '.join(unknown) or 'none given'}; give NAME or NAME@FLAG=VALUE..., NAME one "
                f"of {', '.join(DESIGNS)}")
    args.names = [s.split("=", 1)[0] for s in args.sources.split(",")]
    if len(args.names) < 2:
        p.error("--sources: the judge needs at least two sources")
    for flag in ("steps", "jobs", "windows", "samples", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1")
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    runs = plan(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        folders = dict(zip([name for name, _ in runs], pool.map(lambda job: train(*job, args.runs), runs)))
    results = measure(folders, args)
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("names",)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "voices.json", results)
    write_text(out / "voices.md", markdown(results, args) + "\n")
    plotted = plot(results, out / "voices.png")
    print(f"wrote {out / 'voices.md'}" + ("" if plotted else " (no plots: matplotlib is not installed)"))


if __name__ == "__main__":
    run_tool(main)
