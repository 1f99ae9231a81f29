"""Guarded training: divergence stops the run and keeps the last good checkpoint; Ctrl-C saves;
the best and the latest checkpoints are kept apart."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from abcgpt.core.checkpoint import load_checkpoint
from abcgpt.training.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
quiet = dict(log=lambda line: None)


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_non_finite_stops_the_run_naming_the_step(corpus_files, tmp_path, where):
    # the reference backend calls lm_head as a module, where the hook below can poison it
    config = tiny_config(corpus_files, tmp_path, max_iters=10, eval_interval=2, log_interval=1, gate_backend="reference")
    trainer = Trainer(config, **quiet)
    poison_at = 5  # the 5th step, counting from 1 as the logs do

    def poison(module, inputs, output):  # in training steps only: the evaluation at step 4 stays clean
        return output * float("nan") if trainer.step == poison_at - 1 and module.training else output

    if where == "loss":
        trainer.model.lm_head.register_forward_hook(poison)
    else:  # a finite loss whose gradient is not
        trainer.model.transformer.h[0].mlp.c_fc.weight.register_hook(
            lambda g: g * float("nan") if trainer.step == poison_at - 1 else g)
    with pytest.raises(TrainingDiverged, match=rf"diverged at step {poison_at}: .*last good checkpoint .*step 4"):
        trainer.train()
    kept = load_checkpoint(tmp_path / "ckpt.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(t).all() for t in kept["model"].values())


def test_best_and_latest_are_kept_apart(corpus_files, tmp_path):
    trainer = Trainer(tiny_config(corpus_files, tmp_path, max_iters=6, eval_interval=2, learning_rate=3e-2), **quiet)
    scores = iter([2.0, 1.0, 3.0])  # held-out scores at steps 2, 4, 6: the best is step 4
    trainer.held_out_score = lambda losses: next(scores)
    trainer.train()
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 6
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["step"] == 4 and best["best_val_loss"] == 1.0


def test_held_out_score_is_the_mean_own_corner_loss(corpus_files, tmp_path):
    trainer = Trainer(tiny_config(corpus_files, tmp_path), **quiet)
    losses = {"val/stories@0": 1.0, "val/stories@1": 9.0, "val/plays@0": 9.0, "val/plays@1": 2.0, "val/plays@0.5": 5.0}
    assert trainer.held_out_score(losses) == pytest.approx(1.5)


def test_ctrl_c_saves_a_checkpoint_to_resume_from(corpus_files, tmp_path):
    stories, plays = corpus_files
    args = ["--sources", f"stories={stories},plays={plays}", "--out_dir", str(tmp_path), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "4", "--eval_iters", "1",
            "--device", "cpu", "--log_interval", "1"]
    process = subprocess.Popen([sys.executable, "train.py", *args, "--max_iters", "100000", "--eval_interval", "100000"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # training is under way
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: saved" in stderr and "--resume" in stderr
    step = load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert step >= 3
    last_logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert step == last_logged or step == last_logged + 1  # nothing trained is lost
    resumed = subprocess.run([sys.executable, "train.py", "--resume", "--out_dir", str(tmp_path),
                              "--max_iters", str(step + 2)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == step + 2


def test_overwrite_replaces_a_run_only_once_the_new_one_starts(corpus_files, tmp_path):
    Trainer(tiny_config(corpus_files, tmp_path, max_iters=3, eval_interval=3), **quiet).train()
    old_log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        Trainer(tiny_config(corpus_files, tmp_path, max_iters=2, eval_interval=2), **quiet)
    broken = tiny_config(corpus_files, tmp_path, max_iters=2, eval_interval=2, block_size=10**5)
    with pytest.raises(Exception, match="fewer than one block"):  # setup fails: the old run is untouched
        Trainer(broken, overwrite=True, **quiet)
    assert (tmp_path / "log.jsonl").read_text() == old_log and load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3
    Trainer(tiny_config(corpus_files, tmp_path, max_iters=2, eval_interval=2), overwrite=True, **quiet).train()
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert max(steps) == 2 and 3 not in steps  # a fresh log, not appended to the old one
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 2


def test_log_lines_are_strict_json(corpus_files, tmp_path):
    trainer = Trainer(tiny_config(corpus_files, tmp_path), **quiet)
    trainer.log.record({"step": 1, "loss": float("nan"), "val": float("inf")})
    assert json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=lambda c: 1 / 0) == \
        {"step": 1, "loss": None, "val": None}


def start_training(corpus_files, out_dir, *extra, stdout=subprocess.PIPE):
    stories, plays = corpus_files
    args = ["--sources", f"stories={stories},plays={plays}", "--out_dir", str(out_dir), "--n_layer", "1",
            "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "4", "--eval_iters", "1",
            "--device", "cpu", "--log_interval", "1", "--max_iters", "100000", "--eval_interval", "100000", *extra]
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE,
                            text=True)


def wait_for_steps(process, log, steps=3):
    deadline = time.time() + 120
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):  # training is under way
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_like_ctrl_c(corpus_files, tmp_path, sig):
    """Batch schedulers and containers stop with SIGTERM, a closed terminal with SIGHUP: the run saves its
    step, says so in one line and exits with 128 + the signal, as a shell reports it."""
    process = start_training(corpus_files, tmp_path)
    wait_for_steps(process, tmp_path / "log.jsonl")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1
    assert f"interrupted: saved {tmp_path / 'ckpt.pt'} at step" in stderr and signal.Signals(sig).name in stderr
    step = load_checkpoint(tmp_path / "ckpt.pt")["step"]
    last_logged = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["step"]
    assert step in (last_logged, last_logged + 1)  # nothing trained is lost
    assert not (tmp_path / ".lock").exists()


def test_a_second_writer_is_refused_naming_the_first(corpus_files, tmp_path):
    first = start_training(corpus_files, tmp_path)
    try:
        wait_for_steps(first, tmp_path / "log.jsonl")
        log = (tmp_path / "log.jsonl").read_text()
        second = start_training(corpus_files, tmp_path, "--overwrite")  # even told to replace the run
        _, stderr = second.communicate(timeout=120)
        assert second.returncode == 1 and stderr.count("\n") == 1, stderr
        assert f"{tmp_path} is being written by pid {first.pid} on " in stderr
        assert (tmp_path / "log.jsonl").read_text().startswith(log)  # the first run's log goes on, untouched
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


def test_output_into_a_file_arrives_line_by_line(corpus_files, tmp_path):
    """Redirected to a file, the run's lines are there while it runs, the first one at its first step."""
    with open(tmp_path / "out.txt", "w") as out:
        process = start_training(corpus_files, tmp_path / "run", stdout=out)
        try:
            deadline = time.time() + 120
            while "step 1/100000" not in (tmp_path / "out.txt").read_text():
                assert time.time() < deadline and process.poll() is None, process.communicate()
                time.sleep(0.2)
        finally:
            process.send_signal(signal.SIGINT)
            process.communicate(timeout=120)
    assert (tmp_path / "out.txt").read_text().startswith("preset: ")


def test_a_lock_left_by_a_dead_process_is_taken_over(trained_checkpoint, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    (run / ".lock").write_text("pid 999999 on gone since long ago\n")  # its holder died: no OS lock on it
    result = subprocess.run([sys.executable, "train.py", "--resume", "--out_dir", str(run), "--max_iters", "7"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert load_checkpoint(run / "ckpt.pt")["step"] == 7 and not (run / ".lock").exists()


def test_new_sources_on_resume_are_recorded(trained_checkpoint, corpus_files, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, run)
    stories, plays = corpus_files
    edited = tmp_path / "stories.txt"
    edited.write_text(stories.read_text().replace("happy", "glad"))
    command = [sys.executable, "train.py", "--resume", "--out_dir", str(run), "--max_iters", "7",
               "--sources", f"stories={edited},plays={plays}"]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "--new_sources" in refused.stderr
    before = load_checkpoint(run / "ckpt.pt")["source_sha256"]
    accepted = subprocess.run([*command, "--new_sources"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert accepted.returncode == 0, accepted.stderr
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    change = next(r["new_sources"] for r in records if "new_sources" in r)
    after = load_checkpoint(run / "ckpt.pt")["source_sha256"]
    assert change == {"stories": {"from": before[0], "to": after[0]}} and after[1] == before[1]


def test_overwrite_clears_the_recorded_baselines_and_nothing_else(trained_checkpoint, corpus_files, tmp_path):
    from abcgpt.training.run import RunFolder

    Trainer(tiny_config(corpus_files, tmp_path, max_iters=2, eval_interval=2), **quiet).train()
    (tmp_path / "baseline-stories").mkdir()
    (tmp_path / "baseline-stories" / "ckpt.pt").write_bytes(trained_checkpoint.read_bytes())
    RunFolder(tmp_path).record("baseline-stories")  # as train.py --baselines does before it trains one
    (tmp_path / "baseline-notes").mkdir()  # the user's own, named like a baseline
    (tmp_path / "baseline-notes" / "todo.txt").write_text("keep me")
    trainer = Trainer(tiny_config(corpus_files, tmp_path, max_iters=2, eval_interval=2), overwrite=True, **quiet)
    assert (tmp_path / "baseline-stories").exists()  # nothing goes before the new run starts
    trainer.train()
    assert not (tmp_path / "baseline-stories").exists()
    assert (tmp_path / "baseline-notes" / "todo.txt").read_text() == "keep me"


def test_a_pipe_as_a_source_is_refused_without_waiting(corpus_files, tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    _, plays = corpus_files
    result = subprocess.run([sys.executable, "train.py", "--sources", f"a={fifo},b={plays}", "--out_dir",
                             str(tmp_path / "out"), "--max_iters", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and "is not a regular file" in result.stderr


def test_a_comma_in_a_source_path(corpus_files, tmp_path):
    import shutil

    stories, plays = corpus_files
    odd = tmp_path / "stories, revised.txt"
    shutil.copy(stories, odd)
    config = tiny_config(corpus_files, tmp_path / "run", max_iters=1, eval_interval=1,
                         sources=f"stories={str(odd).replace(',', chr(92) + ',')},plays={plays}")
    assert config.sources[0] == f"stories={odd}"
    Trainer(config, **quiet).train()
    assert load_checkpoint(tmp_path / "run" / "ckpt.pt")["source_names"] == ["stories", "plays"]
