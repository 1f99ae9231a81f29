"""The command-line entry points, run as a user runs them."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_sample_at_several_alphas(trained_checkpoint):
    result = run("sample.py", "--ckpt", trained_checkpoint, "--alpha", "0,0.5,1", "--start", "one day",
                 "--num_samples", "2", "--max_new_tokens", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("--- alpha") == 6
    for alpha in ("0.0", "0.5", "1.0"):
        assert f"--- alpha {alpha}" in result.stdout
    samples = [s.strip("\n") for s in result.stdout.split("--- alpha")[1:]]
    assert all(s.split("\n", 1)[1].startswith("one day") and len(s.split("\n", 1)[1]) == 27 for s in samples)


def test_sample_is_reproducible_from_the_seed(trained_checkpoint):
    args = ("--ckpt", trained_checkpoint, "--alpha", "0.3", "--max_new_tokens", "30")
    assert run("sample.py", *args, "--seed", "1").stdout == run("sample.py", *args, "--seed", "1").stdout
    assert run("sample.py", *args, "--seed", "1").stdout != run("sample.py", *args, "--seed", "2").stdout


def test_prompt_from_file(trained_checkpoint, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("ROMEO:\n")
    result = run("sample.py", "--ckpt", trained_checkpoint, "--start", f"FILE:{prompt}", "--max_new_tokens", "5")
    assert result.returncode == 0 and "ROMEO:\n" in result.stdout


def test_corrupt_checkpoint_gets_one_line(trained_checkpoint, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained_checkpoint.read_bytes()[: trained_checkpoint.stat().st_size // 2])
    result = run("sample.py", "--ckpt", broken)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: {broken} is not a readable checkpoint (truncated or corrupt?)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_train_command_then_resume(corpus_files, tmp_path):
    stories, plays = corpus_files
    common = ["--sources", f"stories={stories},plays={plays}", "--out_dir", tmp_path, "--n_layer", "1",
              "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "4", "--eval_iters", "1",
              "--device", "cpu"]
    first = run("train.py", "--preset", "cpu", *common, "--max_iters", "4", "--eval_interval", "2", "--log_interval", "2")
    assert first.returncode == 0, first.stderr
    assert "step 4 | val/stories@0" in first.stdout and (tmp_path / "ckpt.pt").exists()
    second = run("train.py", "--resume", "--out_dir", tmp_path, "--max_iters", "6")
    assert second.returncode == 0, second.stderr
    assert "step 6 |" in second.stdout and "step 2 |" not in second.stdout


def test_train_command_reports_bad_data_in_one_line(tmp_path):
    result = run("train.py", "--sources", f"a={tmp_path / 'missing.txt'},b={tmp_path / 'missing2.txt'}", "--out_dir", tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == f"error: source 'a': file not found: {tmp_path / 'missing.txt'}"


def test_every_flag_of_every_tool_is_described_without_empty_defaults():
    for script in ("train.py", "sample.py", "evaluate.py", "report.py", "calibrate.py", "serve.py"):
        result = run(script, "--help")
        assert result.returncode == 0, (script, result.stderr)
        options = result.stdout.split("options:", 1)[1]
        for entry in re.split(r"\n  (?=-)", options)[1:]:  # one flag and its description each
            flag, _, description = entry.partition("  ")
            assert description.strip() or "\n" in flag, f"{script}: {flag} has no description"
            assert "(default: None)" not in entry and "(default: False)" not in entry, f"{script}: {entry}"
            assert not ("(default:" in entry and entry.count("default") > 1), f"{script}: default said twice: {entry}"


def test_ctrl_c_while_sampling_is_one_line(trained_checkpoint):
    import signal

    process = subprocess.Popen([sys.executable, "sample.py", "--ckpt", str(trained_checkpoint), "--samples", "1",
                                "--max_new_tokens", "100000", "--alpha", "0,0.5,1,0.2,0.8,0.3,0.7"], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a terminal's Ctrl-C,
    # even where this test itself runs as a background job, which the shell starts with SIGINT ignored
    assert process.stdout.readline() == "--- alpha 0.0 (stories)\n"  # generating, however busy the machine is
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr == "interrupted\n", stderr


def test_a_closed_pipe_ends_sampling_quietly(trained_checkpoint):
    """sample.py | head -1: the reader goes away after one line; the sampler ends without a traceback."""
    shell = (f"{sys.executable} sample.py --ckpt {trained_checkpoint} --alpha 0,0.5,1 --samples 50 "
             "--max_new_tokens 2000 | head -1")
    result = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.startswith("--- alpha 0.0") and result.stdout.count("\n") == 1
    assert result.stderr == "", result.stderr


def test_a_busy_machine_gets_a_hint():
    from abcgpt.tools.cli import busy_machine_hint

    assert "--threads 1" in busy_machine_hint(load=3.9, cores=2)
    assert busy_machine_hint(load=0.3, cores=2) is None
    assert busy_machine_hint(load=9.0, cores=1) is None  # one core: there is nothing to choose
