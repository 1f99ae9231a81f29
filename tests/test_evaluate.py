import json
import subprocess
import sys
from pathlib import Path

import pytest

from abcgpt.measuring.loss import summarize, summarize_voices

ROOT = Path(__file__).resolve().parents[1]


def test_summary_by_hand():
    alphas = [0.0, 0.5, 1.0]
    losses = {"a": [1.0, 1.5, 2.5], "b": [3.0, 2.0, 2.2]}
    s = summarize(["a", "b"], alphas, losses)
    assert s["corner_loss"] == {"a": 1.0, "b": 2.2}
    assert s["diag"] == pytest.approx(3.2)
    assert s["contrast"]["a"] == pytest.approx(1.5)  # 2.5 at the wrong corner - 1.0 at its own
    assert s["contrast"]["b"] == pytest.approx(0.8)  # 3.0 - 2.2
    assert s["middle"] == pytest.approx(1.75)
    assert s["best_alpha"] == {"a": 0.0, "b": 0.5}


def test_summary_with_three_sources():
    alphas = [0.0, 0.5, 1.0]
    losses = {"a": [1.0, 2.0, 4.0], "b": [3.0, 1.0, 2.0], "c": [5.0, 3.0, 1.0]}
    s = summarize(["a", "b", "c"], alphas, losses)
    assert s["corner_loss"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert s["contrast"] == pytest.approx({"a": 2.0, "b": 1.5, "c": 3.0})  # mean over the other corners


def test_evaluate_command_end_to_end(trained_checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    run = subprocess.run(
        [sys.executable, "evaluate.py", "--ckpt", str(trained_checkpoint), "--out", str(out), "--max_windows", "5"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert result["alphas"] == [round(0.1 * i, 1) for i in range(11)]
    assert result["sources"] == ["stories", "plays"]
    stories, plays = result["losses"]["stories"], result["losses"]["plays"]
    assert result["corner_loss"] == {"stories": stories[0], "plays": plays[-1]}
    assert result["contrast"]["stories"] == pytest.approx(stories[-1] - stories[0])
    assert "contrast" in run.stdout and "corner loss" in run.stdout


def test_training_log_and_evaluate_agree_on_the_same_windows(trained_checkpoint, corpus_files):
    """One definition of held-out loss: the trainer's evaluation is measuring.loss.val_loss on its windows."""
    from conftest import tiny_config

    from abcgpt.measuring.loss import val_loss
    from abcgpt.training.run import load_model
    from abcgpt.training.trainer import Trainer

    config = tiny_config(corpus_files, trained_checkpoint.parent)
    trainer = Trainer(config, resume=True, log=lambda line: None)
    logged = trainer.evaluate()
    model, _, _ = load_model(trained_checkpoint)
    for name, ids in zip(trainer.corpus.names, trainer.corpus.val):
        for alpha in (0.0, 0.5, 1.0):
            windows = config.eval_iters * config.batch_size
            assert logged[f"val/{name}@{alpha:g}"] == val_loss(model, ids, alpha, config.batch_size, windows)


def test_a_many_source_summary_by_hand():
    labels = ["a", "b", "c", "all"]
    losses = {"a": [1.0, 2.0, 4.0, 1.5], "b": [3.0, 1.0, 2.0, 1.2], "c": [5.0, 3.0, 1.0, 2.1]}
    s = summarize_voices(["a", "b", "c"], labels, losses)
    assert s["corner_loss"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert s["contrast"] == pytest.approx({"a": 2.0, "b": 1.5, "c": 3.0})
    assert s["best_setting"] == {"a": "a", "b": "b", "c": "c"}
    assert s["uniform"] == pytest.approx((1.5 + 1.2 + 2.1) / 3)


def test_evaluate_py_sweeps_every_voice_of_a_many_source_checkpoint(voices_checkpoint, tmp_path):
    from abcgpt.gates.voice import Dial
    from abcgpt.measuring.loss import val_loss
    from abcgpt.training.run import corpus_for, load_model

    out = tmp_path / "eval.json"
    done = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(voices_checkpoint), "--max_windows", "8",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    names = ["stories", "plays", "words"]
    assert record["geometry"] == "pool" and record["settings"] == names + ["all"]
    model, tokenizer, run = load_model(voices_checkpoint)
    corpus = corpus_for(run, tokenizer)
    assert record["losses"]["plays"][0] == val_loss(model, corpus.val[1], Dial.source(0, "pool", 3), 32, 8)
    assert record["corner_loss"] == {n: record["losses"][n][k] for k, n in enumerate(names)}
    assert "uniform mode (every gate open): mean loss" in done.stdout
