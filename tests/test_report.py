"""Measuring the dial: n-gram scorer, report numbers, baselines, and the report command end to end."""
import json
import math
import subprocess
import sys
from importlib.util import find_spec as importlib_find_spec
from pathlib import Path

import numpy as np
import pytest
from conftest import play_text, story_text

from abcgpt.core.checkpoint import load_checkpoint
from abcgpt.measuring.ngram import CharNgram, SourceClassifier, spearman
from abcgpt.measuring.report import calibration_summary, dial_cost
from abcgpt.training.run import Run, corpus_for, load_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def classifier():
    return SourceClassifier(story_text(400, seed=0), play_text(400, seed=1))


def chunks(text, length, count):
    step = (len(text) - length) // count
    return [text[i * step : i * step + length] for i in range(count)]


def test_ngram_tells_the_sources_apart_on_unseen_text(classifier):
    unseen_stories, unseen_plays = story_text(100, seed=7), play_text(100, seed=8)  # not fitted on
    assert all(classifier.p_source_1(t) < 0.01 for t in chunks(unseen_stories, 60, 30))
    assert all(classifier.p_source_1(t) > 0.99 for t in chunks(unseen_plays, 60, 30))


def test_ngram_confidence_matches_accuracy_on_short_unseen_text(classifier):
    """Calibration: of the short snippets called with over 90% confidence, at least 90% are right."""
    snippets = [(t, 0) for n in (6, 8, 12) for t in chunks(story_text(60, seed=9), n, 40)]
    snippets += [(t, 1) for n in (6, 8, 12) for t in chunks(play_text(60, seed=10), n, 40)]
    confident = [(classifier.p_source_1(t), label) for t, label in snippets]
    confident = [(p, label) for p, label in confident if p > 0.9 or p < 0.1]
    assert len(confident) > 50
    right = sum((p > 0.5) == (label == 1) for p, label in confident)
    assert right / len(confident) >= 0.9


def test_ngram_is_a_distribution():
    alphabet = sorted(set("hello world"))
    model = CharNgram("hello world, hello there", alphabet, order=3)
    for context in ("hel", "xyz", "o w"):
        total = sum(math.exp(model.log_probs(context + c)[-1]) for c in alphabet + ["\x00"])  # \x00: unknown
        assert total == pytest.approx(1.0, abs=1e-9)


def test_spearman_by_hand():
    assert spearman([0, 1, 2, 3], [1, 5, 7, 9]) == pytest.approx(1.0)
    assert spearman([0, 1, 2, 3], [9, 7, 5, 1]) == pytest.approx(-1.0)
    # ties share ranks: y ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3): 4.5 / sqrt(5 * 4.5)
    assert spearman([0, 1, 2, 3], [0.1, 0.2, 0.2, 0.9]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_report_numbers_by_hand():
    baselines = {"a": {"best": {"loss": 1.0, "step": 10}, "final": {"loss": 1.3, "step": 40}}}
    cost = dial_cost({"a": 1.10, "b": 2.0}, baselines)  # judged against the baseline's best, not its final
    assert cost["a"]["excess"] == pytest.approx(0.10) and cost["a"]["relative"] == pytest.approx(0.10)
    assert "b" not in cost  # no baseline: not measured
    cal = calibration_summary([0.0, 0.5, 1.0], {0.0: [0.0, 0.1], 0.5: [0.4, 0.6], 1.0: [1.0, 0.9]})
    assert cal["mean_p_source_1"] == pytest.approx([0.05, 0.5, 0.95])
    assert cal["at_alpha_0"] == pytest.approx(0.05) and cal["at_alpha_1"] == pytest.approx(0.95)
    assert cal["monotone"]
    # alphas (0,0,.5,.5,1,1) have ranks (.5,.5,2.5,2.5,4.5,4.5); scores (0,.1,.4,.6,1,.9) ranks (0,1,2,3,5,4)
    assert cal["spearman"] == pytest.approx(np.corrcoef([0.5, 0.5, 2.5, 2.5, 4.5, 4.5], [0, 1, 2, 3, 5, 4])[0, 1])
    assert not calibration_summary([0.0, 1.0], {0.0: [0.3], 1.0: [0.2]})["monotone"]


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_with_baselines(corpus_files, tmp_path_factory):
    stories, plays = corpus_files
    out = tmp_path_factory.mktemp("baselines")
    result = run("train.py", "--sources", f"stories={stories},plays={plays}", "--out_dir", out, "--n_layer", "1",
                 "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--batch_size", "8", "--max_iters", "30",
                 "--eval_interval", "10", "--eval_iters", "2", "--device", "cpu", "--baselines")
    assert result.returncode == 0, result.stderr
    return out


def test_baselines_see_as_many_tokens_of_their_source(run_with_baselines):
    gated = load_checkpoint(run_with_baselines / "ckpt.pt")
    assert sum(gated["tokens_seen"]) == 30 * 8 * 16  # every training token counted once
    tokens_per_step = 8 * 16
    for k, name in enumerate(["stories", "plays"]):
        baseline = load_checkpoint(run_with_baselines / f"baseline-{name}" / "ckpt.pt")
        assert baseline["train_config"]["only_source"] == name and not baseline["model_config"]["gated"]
        seen = baseline["tokens_seen"]
        assert seen[1 - k] == 0  # nothing from the other source
        assert gated["tokens_seen"][k] <= seen[k] < gated["tokens_seen"][k] + tokens_per_step


def test_report_command_end_to_end(run_with_baselines, tmp_path):
    from abcgpt.measuring.loss import val_loss

    out = tmp_path / "report"
    result = run("report.py", "--ckpt", run_with_baselines / "ckpt.pt", "--out_dir", out, "--samples", "2",
                 "--sample_tokens", "30", "--max_windows", "8")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    for section in ("Held-out loss along the dial", "Cost of the dial", "Calibration of generated text", "Samples"):
        assert f"## {section}" in markdown
    stories, plays = report["losses"]["stories"], report["losses"]["plays"]
    assert report["corner_loss"] == {"stories": stories[0], "plays": plays[-1]}
    # the baseline numbers are the baselines' own held-out losses, at their best checkpoint and their last
    for which, file in (("best", "best.pt"), ("final", "ckpt.pt")):
        model, tokenizer, baseline = load_model(run_with_baselines / "baseline-plays" / file)
        corpus = corpus_for(Run.load(run_with_baselines / "ckpt.pt"), tokenizer)
        expected = val_loss(model, corpus.val[1], None, max_windows=8)
        assert report["baselines"]["plays"][which] == {"loss": pytest.approx(expected), "step": baseline.step}
    best = report["baselines"]["plays"]["best"]["loss"]
    assert report["dial_cost"]["plays"]["baseline_loss"] == pytest.approx(best)
    assert report["dial_cost"]["plays"]["excess"] == pytest.approx(plays[-1] - best)
    assert report["at_best"]["step"] == load_checkpoint(run_with_baselines / "best.pt")["step"]
    cal = report["calibration"]
    assert len(cal["mean_p_source_1"]) == 11 and all(0 <= p <= 1 for p in cal["mean_p_source_1"])
    assert set(report["samples"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert (out / "val_loss.png").stat().st_size > 0 and (out / "calibration.png").stat().st_size > 0


def test_report_without_baselines_says_not_measured(trained_checkpoint, tmp_path):
    result = run("report.py", "--ckpt", trained_checkpoint, "--out_dir", tmp_path, "--samples", "1",
                 "--sample_tokens", "10", "--max_windows", "4")
    assert result.returncode == 0, result.stderr
    assert "| stories | " in (tmp_path / "report.md").read_text() and "not measured" in (tmp_path / "report.md").read_text()


def test_the_report_says_when_plots_were_skipped(run_with_baselines, tmp_path, monkeypatch):
    import abcgpt.measuring.report as report_module

    monkeypatch.setattr(report_module.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else importlib_find_spec(name))
    report = {"sources": ["a", "b"], "checkpoint_step": 1, "val_tokens": {"a": 1, "b": 1}, "alphas": [0.0, 1.0],
              "losses": {"a": [1.0, 2.0], "b": [2.0, 1.0]}, "corner_loss": {"a": 1.0, "b": 1.0}, "diag": 2.0,
              "contrast": {"a": 1.0, "b": 1.0}, "best_alpha": {"a": 0.0, "b": 1.0}, "dial_cost": {}, "baselines": {},
              "samples": {}}
    report_module.write_report(report, tmp_path, "t")
    assert "Plots: not made, as matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert not list(tmp_path.glob("*.png"))
