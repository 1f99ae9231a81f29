"""The dial, measured and written up (docs/design.md, section 5).

A report holds the held-out sweep (corner losses, contrast, middle, best alpha),
the cost of the dial (each corner against a vanilla GPT trained on that source
alone with as many of its tokens), the calibration of generated text (character
n-gram models fitted on the train splits score samples at each alpha as
P(source 1 | text)), samples at five alphas and, with matplotlib, two plots.
"""
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from abcgpt.core import outputs
from abcgpt.core.atomic import save_figure, write_json, write_text
from abcgpt.core.tables import markdown_table
from abcgpt.data.corpus import source_alphas
from abcgpt.model.sampling import Sampling

from .dial import CALIBRATION, classifier_for, measure, mix_to_alpha, sample_texts
from .loss import SWEEP, format_table, summarize, sweep, val_loss
from .ngram import spearman

SAMPLE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIXES = tuple(round(0.1 * i, 1) for i in range(11))


def dial_cost(corner_loss, baselines):
    """Each source's corner loss against its single-source baseline at its best held-out val."""
    return {
        name: {
            "corner_loss": corner_loss[name],
            "baseline_loss": baselines[name]["best"]["loss"],
            "excess": corner_loss[name] - baselines[name]["best"]["loss"],
            "relative": corner_loss[name] / baselines[name]["best"]["loss"] - 1.0,
        }
        for name in corner_loss
        if name in baselines
    }


def calibration_summary(alphas, scores):
    """scores: {alpha: [P(source 1 | sample), ...]}. The mean curve, its rank correlation with
    alpha over all samples, its endpoints, and whether the mean curve never falls."""
    curve = [float(np.mean(scores[a])) for a in alphas]
    flat_alphas = [a for a in alphas for _ in scores[a]]
    flat_scores = [p for a in alphas for p in scores[a]]
    return {
        "alphas": list(alphas),
        "mean_p_source_1": curve,
        "spearman": spearman(flat_alphas, flat_scores),
        "at_alpha_0": curve[0],
        "at_alpha_1": curve[-1],
        "monotone": all(b >= a for a, b in zip(curve, curve[1:])),
    }


def calibrated_dial(model, tokenizer, classifier, dial_map, n_samples, tokens, seed, device):
    """The calibrated dial scored on fresh samples: at each mix, the measured mean P(source 1)."""
    alphas = [mix_to_alpha(dial_map, m) for m in MIXES]
    scores = measure(model, tokenizer, classifier, alphas, n_samples, tokens, seed, device, desc="calibrated dial")
    measured = [float(np.mean(scores[a])) for a in alphas]
    return {
        "mixes": list(MIXES), "alphas": alphas, "measured": measured,
        "max_abs_error": max(abs(p - m) for p, m in zip(measured, MIXES)),
        "spearman": spearman(list(MIXES), measured),  # of the measured curve: does more mix give more voice?
        "spearman_samples": spearman([m for m, a in zip(MIXES, alphas) for _ in scores[a]],
                                     [p for a in alphas for p in scores[a]]),  # of single samples, which scatter
        "samples_per_mix": n_samples, "seed": seed,
    }


def reusable_sweep(evaluation, weights_sha256, max_windows, corpus):
    """(alphas, losses) of evaluate.py's sweep in the file evaluation, where it swept these very weights (their
    sha256, run.weights_digest) over the report's alphas, the same windows and the same val text; else None."""
    try:
        record = json.loads(Path(evaluation).read_text())
        same = (weights_sha256 is not None and record["weights_sha256"] == weights_sha256
                and record["max_windows"] == max_windows
                and record["sources"] == corpus.names and record["alphas"] == list(SWEEP)
                and record["val_tokens"] == {n: len(v) for n, v in zip(corpus.names, corpus.val)})
        losses = {name: [float(v) for v in record["losses"][name]] for name in corpus.names}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (list(SWEEP), losses) if same and all(len(v) == len(SWEEP) for v in losses.values()) else None


def reusable_calibration(dial_map, n_samples, sample_tokens):
    """{alpha: [P, ...]} at the report's alphas from the scores calibrate.py kept in the map, where it sampled
    as many samples of as many tokens at each; None otherwise. The map lives in the checkpoint it measured."""
    dial_map = dial_map or {}
    scores = dial_map.get("scores") or {}
    if dial_map.get("samples_per_alpha") != n_samples or dial_map.get("sample_tokens") != sample_tokens:
        return None
    kept = {a: scores.get(str(a)) or scores.get(str(float(a))) for a in SWEEP}
    return kept if all(isinstance(s, list) and len(s) == n_samples for s in kept.values()) else None


def build_report(model, tokenizer, run, corpus, baselines=None, n_samples=8, sample_tokens=200,
                 max_windows=None, device="cpu", seed=1337, best=None, reused_sweep=None, reused_calibration=None):
    """Everything the report shows, as plain data.

    baselines: {source name: {"best": (model, step), "final": (model, step)}} of single-source
    vanilla GPTs; best: (model, step) of the gated run's best checkpoint, if there is one. reused_sweep and
    reused_calibration: what evaluate.py and calibrate.py measured of this checkpoint (reusable_sweep,
    reusable_calibration), used instead of measuring it again.
    """
    alphas, losses = reused_sweep or sweep(model, corpus, SWEEP, max_windows=max_windows, device=device,
                                           progress=True)
    summary = summarize(corpus.names, alphas, losses)
    report = {
        "checkpoint_step": run.step, "sources": corpus.names, "tokens_seen": run.tokens_seen or None,
        "val_tokens": {n: len(v) for n, v in zip(corpus.names, corpus.val)},
        "alphas": alphas, "losses": losses, **summary,
    }
    if best is not None:  # the corners at the gated run's best checkpoint, as the baselines are judged at theirs
        best_model, best_step = best
        corners = source_alphas(len(corpus.names))
        _, best_losses = sweep(best_model, corpus, corners, max_windows=max_windows, device=device)
        report["at_best"] = {"step": best_step, **summarize(corpus.names, corners, best_losses)}
    scored = {}
    for name, kept in (baselines or {}).items():
        k = corpus.names.index(name)
        scored[name] = {which: {"step": step, "loss": val_loss(m.eval(), corpus.val[k], None, max_windows=max_windows,
                                                                device=device)}
                        for which, (m, step) in kept.items()}
    report["baselines"] = scored
    report["dial_cost"] = dial_cost(summary["corner_loss"], scored)

    if len(corpus.names) == 2:
        classifier = classifier_for(corpus)
        scores = reused_calibration or measure(model, tokenizer, classifier, SWEEP, n_samples, sample_tokens, seed,
                                               device)
        report["calibration"] = {**calibration_summary(SWEEP, scores), "samples_per_alpha": n_samples,
                                 "sample_tokens": sample_tokens, "scores": {str(a): s for a, s in scores.items()},
                                 "seed": run.dial_map["seed"] if reused_calibration else seed,
                                 "from": "calibrate.py" if reused_calibration else "report.py"}
        if run.dial_map:  # fresh seeds: not the samples the map was fitted on
            report["calibrated_dial"] = calibrated_dial(model, tokenizer, classifier, run.dial_map, n_samples,
                                                        sample_tokens, seed + 10_000, device)
    report["samples"] = {
        str(a): sample_texts(model, tokenizer, a, 1, sample_tokens, seed, device,
                             replace(CALIBRATION, temperature=Sampling().temperature))[0]
        for a in SAMPLE_ALPHAS
    }
    return report


def plot(report, out_dir):
    """val loss against alpha per source, and the calibration curve, as PNGs (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in report["sources"]:
        line = ax.plot(report["alphas"], report["losses"][name], marker="o", label=name)[0]
        if name in report["dial_cost"]:
            ax.axhline(report["dial_cost"][name]["baseline_loss"], color=line.get_color(), linestyle="--",
                       label=f"{name}: vanilla on {name} alone")
    ax.set(xlabel="alpha", ylabel="held-out val loss (nats/token)", title="Loss along the dial")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out_dir / "val_loss.png")
    written.append("val_loss.png")
    if "calibration" in report:
        cal = report["calibration"]
        fig, ax = plt.subplots(figsize=(6, 4))
        for a, s in cal["scores"].items():
            ax.scatter([float(a)] * len(s), s, color="0.7", s=10)
        ax.plot(cal["alphas"], cal["mean_p_source_1"], marker="o", color="C0", label="mean over samples")
        ax.plot([0, 1], [0, 1], linestyle=":", color="0.5", label="y = alpha")
        ax.set(xlabel="alpha", ylabel=f"P({report['sources'][1]} | sample)", title="Calibration of generated text",
               ylim=(-0.05, 1.05))
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out_dir / "calibration.png")
        written.append("calibration.png")
    plt.close("all")
    return written


def _fmt(x, spec=".4f"):
    return "not measured" if x is None else format(x, spec)


def render_markdown(report, title, plots, plots_skipped=None):
    names = report["sources"]
    lines = [f"# {title}", "", f"Checkpoint step {report['checkpoint_step']}; held-out val tokens: "
             + ", ".join(f"{n} {report['val_tokens'][n]:,}" for n in names) + "."]
    if report.get("tokens_seen"):
        lines[-1] += " Training tokens seen: " + ", ".join(f"{n} {t:,}" for n, t in zip(names, report["tokens_seen"])) + "."
    lines += ["", "## Held-out loss along the dial", "", "```", format_table(names, report["alphas"], report["losses"], report), "```", ""]
    if "val_loss.png" in plots:
        lines += ["![val loss against alpha](val_loss.png)", ""]
    elif plots_skipped:
        lines += [f"Plots: not made, as {plots_skipped}.", ""]
    lines += ["## Cost of the dial", "", "Each source's loss at its own corner against a vanilla GPT trained on that "
              "source alone with as many of its tokens, judged at its best held-out val (its final value beside).",
              ""]
    cost = []
    for n in names:
        c, b = report["dial_cost"].get(n), report["baselines"].get(n, {})
        kept = lambda which: (f"{b[which]['loss']:.4f} ({b[which]['step']})" if which in b else "not measured")
        cost.append([n, f"{report['corner_loss'][n]:.4f}", kept("best"), kept("final"),
                     _fmt(c and c["excess"], "+.4f"), _fmt(c and c["relative"], "+.1%")])
    lines += [markdown_table(["source", "corner loss", "baseline best (step)", "baseline final (step)",
                              "excess over best (nats)", "relative"], cost, numeric=range(1, 6)), ""]
    if "at_best" in report:
        at = report["at_best"]
        lines += [f"At the gated run's best checkpoint (step {at['step']}): " + "; ".join(
            f"{n} corner {at['corner_loss'][n]:.4f}, contrast {at['contrast'][n]:+.4f}" for n in names) + ".", ""]
    if "calibration" in report:
        cal = report["calibration"]
        lines += ["## Calibration of generated text", "",
                  f"{cal['samples_per_alpha']} samples of {cal['sample_tokens']} tokens at each alpha (temperature 1), "
                  f"scored by character 4-gram models fitted on the train splits as P({names[1]} | text)"
                  + (" (calibrate.py's samples, kept in the checkpoint's map)." if cal.get("from") == "calibrate.py"
                     else "."), "",
                  markdown_table(["alpha", *(f"{a:g}" for a in cal["alphas"])],
                                 [["mean P", *(f"{p:.3f}" for p in cal["mean_p_source_1"])]],
                                 numeric=range(1, len(cal["alphas"]) + 1)), "",
                  f"Spearman rank correlation with alpha: {cal['spearman']:.3f}; at alpha 0: {cal['at_alpha_0']:.3f}; "
                  f"at alpha 1: {cal['at_alpha_1']:.3f}; mean curve {'rises monotonically' if cal['monotone'] else 'is not monotone'}.", ""]
        if "calibration.png" in plots:
            lines += ["![calibration curve](calibration.png)", ""]
    if "calibrated_dial" in report:
        dial = report["calibrated_dial"]
        lines += ["## The calibrated dial", "",
                  f"The checkpoint's map from mix (the share of {names[1]}'s voice asked for) to alpha, scored on "
                  f"{dial['samples_per_mix']} fresh samples per mix (seeds not used to fit the map).", "",
                  markdown_table(["mix", *(f"{m:g}" for m in dial["mixes"])],
                                 [["alpha", *(f"{a:.3f}" for a in dial["alphas"])],
                                  ["measured P", *(f"{p:.3f}" for p in dial["measured"])]],
                                 numeric=range(1, len(dial["mixes"]) + 1)), "",
                  f"Largest |P - mix|: {dial['max_abs_error']:.3f}; Spearman correlation of the measured curve "
                  f"with mix: {dial['spearman']:.3f} (of single samples with mix: {dial['spearman_samples']:.3f}).",
                  ""]
    lines += ["## Samples", ""]
    for a, text in report["samples"].items():
        lines += [f"alpha {a} (temperature {Sampling().temperature}):", "", "```", text.strip("\n"), "```", ""]
    return "\n".join(lines)


REPORT_FILES = ("report.md", "report.json", "val_loss.png", "calibration.png")


def check_report_folder(out_dir):
    """Refuse, before any work, a folder whose report files report.py would write over but did not write
    (its report.json says whose they are)."""
    out_dir = outputs.check_out_dir(out_dir)
    for name in REPORT_FILES:
        if (out_dir / name).exists() or (out_dir / name).is_symlink():
            outputs.check_output(out_dir / name, "--out_dir", "part of a report that report.py wrote",
                             lambda _: outputs.is_json_object(out_dir / "report.json", "corner_loss", "sources"))
    return out_dir


def plots_unavailable():
    """Why the report has no plots, or None where it can have them."""
    if importlib.util.find_spec("matplotlib") is None:
        return 'matplotlib is not installed (pip install -e ".[report]")'
    return None


def write_report(report, out_dir, title):
    """report.json, report.md and, where matplotlib is installed, the plots; report.md says if they were
    skipped and why."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = plots_unavailable()
    plots = plot(report, out_dir) if skipped is None else []
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", render_markdown(report, title, plots, skipped) + "\n")
    return out_dir / "report.md"
