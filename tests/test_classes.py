"""Issue 28's reproductions, each where a user meets it: a tool's command line (main(argv), or a process where
the defect needs one: a closed pipe, a file-size or address-space limit, a listening port). Each failed
before the mechanism that closes its class, and passes now; the one-line refusals are rows of
test_bad_input.py."""
import hashlib
import importlib
import io
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from abcgpt.training.run import Run, RunFolder
from abcgpt.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "8", "--batch_size", "4",
        "--eval_iters", "1", "--log_interval", "1", "--device", "cpu", "--threads", "1"]
quiet = dict(log=lambda line: None)


def sources(corpus_files):
    stories, plays = corpus_files
    return ["--sources", f"stories={stories},plays={plays}"]


def main(tool, *argv):
    """A tool's main(argv) as its command line runs it: the exit code (0 when it returns)."""
    try:
        importlib.import_module(tool).main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    return 0


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tool_process(args, limit=None, value=None, **kwargs):
    """A tool run as its own process, optionally under a resource limit (a file-size limit raises EFBIG on the
    write that passes it, rather than killing the process)."""
    def limited():
        if limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(limit, (value, value))

    env = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          preexec_fn=limited, env=env, **kwargs)


@pytest.fixture
def run_copy(trained_checkpoint, tmp_path):
    """A copy of the trained run's folder, its own to change."""
    folder = tmp_path / "run"
    shutil.copytree(trained_checkpoint.parent, folder)
    return folder / "ckpt.pt"


# 1. a modification read before the lock

def test_calibrate_writes_only_over_the_checkpoint_it_read(run_copy, monkeypatch, capsys):
    """Another writer (one that ignores the lock) replaces the checkpoint while calibrate.py measures: the
    calibration is not saved over it, and says so."""
    from abcgpt.tools import calibrate

    other = Run.load(run_copy)
    other.step += 10  # a resume that ended meanwhile
    measure = calibrate.measure

    def measured_while_another_wrote(*args, **kwargs):
        other.save(run_copy)
        return measure(*args, **kwargs)

    monkeypatch.setattr(calibrate, "measure", measured_while_another_wrote)
    code = main("calibrate", "--ckpt", run_copy, "--samples", 2, "--max_new_tokens", 8, "--grid", 3)
    assert "changed while this tool worked on it (step 6 then, step 16 now): nothing was written" in code
    assert Run.load(run_copy).step == 16 and Run.load(run_copy).dial_map is None


def test_permute_in_place_writes_only_over_the_checkpoint_it_read(run_copy, monkeypatch):
    from abcgpt.tools import permute

    other = Run.load(run_copy)
    other.step += 3
    sort_units = permute.sort_units

    def sorted_while_another_wrote(*args):
        other.save(run_copy)
        return sort_units(*args)

    monkeypatch.setattr(permute, "sort_units", sorted_while_another_wrote)
    assert "changed while this tool worked on it" in main("abcgpt.tools.permute", run_copy, "--in_place")
    assert Run.load(run_copy).step == other.step


def test_a_resume_does_not_undo_a_calibration_that_ended_after_it_read_the_run(run_copy, corpus_files):
    """The resume reads the run, calibrate.py then stores its map, and the resume, taking the lock, sees the
    checkpoint is no longer the one it read: it stops, and the map is kept."""
    saved = Run.load(run_copy).train_config
    resume = Trainer(tiny_config(corpus_files, run_copy.parent, max_iters=saved.max_iters + 2,
                                 lr_decay_iters=saved.max_iters), resume=True, **quiet)
    assert main("calibrate", "--ckpt", run_copy, "--samples", 2, "--max_new_tokens", 8, "--grid", 3) == 0
    with pytest.raises(Exception, match="changed while this tool worked on it"):
        resume.train()
    assert Run.load(run_copy).dial_map is not None


# 3. deleting by pattern, 4. writes in place

def test_overwrite_removes_what_runs_wrote_and_keeps_a_users_own_baseline_folder(corpus_files, tmp_path):
    out = tmp_path / "out"
    flags = [*sources(corpus_files), *TINY, "--max_iters", 2, "--eval_interval", 2, "--out_dir", out]
    assert main("train", *flags, "--baselines") == 0
    assert {"baseline-stories", "baseline-plays"} <= set(json.loads((out / "manifest.json").read_text())["written"])
    (out / "baseline-notes").mkdir()
    (out / "baseline-notes" / "plan.txt").write_text("mine")
    (out / "notes.txt").write_text("mine too")
    assert main("train", *flags, "--overwrite") == 0
    assert not (out / "baseline-stories").exists() and not (out / "baseline-plays").exists()
    assert (out / "baseline-notes" / "plan.txt").read_text() == "mine" and (out / "notes.txt").exists()
    assert Run.load(out / "ckpt.pt").step == 2


def test_a_failed_evaluation_write_leaves_the_old_file_whole(run_copy):
    out = run_copy.parent / "eval.json"
    assert tool_process(["evaluate.py", "--ckpt", run_copy, "--max_windows", 4]).returncode == 0
    before = out.read_bytes()
    run_copy.parent.joinpath("best.pt").unlink()  # nothing else to write
    result = tool_process(["evaluate.py", "--ckpt", run_copy, "--max_windows", 8], resource.RLIMIT_FSIZE, 1000)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (f"error: could not write {out}: File too large; it is as it "
                                                      "was before")
    assert out.read_bytes() == before and not [p for p in run_copy.parent.iterdir() if ".tmp" in p.name]


def test_a_failed_report_rewrite_leaves_every_old_file_whole(run_copy, tmp_path):
    pytest.importorskip("matplotlib")
    report = tmp_path / "report"
    args = ["report.py", "--ckpt", run_copy, "--out_dir", report, "--samples", 2, "--sample_tokens", 8,
            "--max_windows", 4]
    assert tool_process(args).returncode == 0
    before = {p.name: p.read_bytes() for p in report.iterdir()}
    result = tool_process(args, resource.RLIMIT_FSIZE, 4000)  # below the plots' size
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "it is as it was before" in result.stderr.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in report.iterdir()} == before


# 6. a closed pipe

def test_a_closed_pipe_saves_the_run_and_ends_quietly(corpus_files, tmp_path):
    out = tmp_path / "out"
    flags = " ".join(map(str, [*sources(corpus_files), *TINY, "--max_iters", 100000, "--eval_interval", 100000,
                               "--out_dir", out]))
    result = subprocess.run(f"{sys.executable} train.py {flags} | head -n 3; exit ${{PIPESTATUS[0]}}", shell=True,
                            executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 141 and "Traceback" not in result.stderr
    assert "interrupted: saved" in result.stderr and "(SIGPIPE)" in result.stderr
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert Run.load(out / "ckpt.pt").step == logged[-1] >= 2  # nothing trained past what was saved


def test_a_folder_with_only_a_log_resumes_from_nothing(corpus_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "log.jsonl").write_text('{"step": 40, "loss": 2.0}\n')
    flags = [*sources(corpus_files), *TINY, "--max_iters", 2, "--eval_interval", 2, "--out_dir", out]
    assert "--resume" in main("train", *flags)
    assert main("train", *flags, "--resume") == 0
    assert Run.load(out / "ckpt.pt").step == 2
    assert (out / "log.jsonl").read_text().startswith('{"step": 40, "loss": 2.0}\n')  # the log goes on


# 7. interrupted baselines

def test_interrupted_baselines_resume_and_the_report_refuses_them_until_then(corpus_files, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    flags = [*sources(corpus_files), *TINY, "--max_iters", 8, "--eval_interval", 4, "--out_dir", out]
    stop = Trainer._stop_now
    monkeypatch.setattr(Trainer, "_stop_now", lambda self, at_log: bool(self.config.only_source == "stories"
                                                                        and self.step == 1) or stop(self, at_log))
    assert main("train", *flags, "--baselines") == 128 + signal.SIGINT  # a Ctrl-C in the first baseline
    monkeypatch.setattr(Trainer, "_stop_now", stop)
    short = Run.load(out / "baseline-stories" / "ckpt.pt")
    assert short.step == 1 < short.train_config.max_iters and not (out / "baseline-plays").exists()
    report = ["--ckpt", out / "ckpt.pt", "--out_dir", tmp_path / "rep", "--samples", 2, "--max_new_tokens", 8]
    assert "baseline-stories/ckpt.pt stopped at step 1 of" in main("report", *report)
    run_before = digest(out / "ckpt.pt")
    assert main("train", *flags, "--baselines", "--resume") == 0
    assert digest(out / "ckpt.pt") == run_before  # the finished gated run is kept as it was
    for name in ("stories", "plays"):
        baseline = Run.load(out / f"baseline-{name}" / "ckpt.pt")
        assert baseline.step == baseline.train_config.max_iters
    assert main("report", *report) == 0


# 10. preflight

def test_memory_preflight_counts_the_address_space_limit(run_copy):
    """Under ulimit -v an evaluation batch that the machine's free memory would hold, but the limit would not,
    is refused in one line before it is allocated."""
    probe = tool_process(["-c", "import torch, resource; print(open('/proc/self/status').read())"])
    mapped = next(int(line.split()[1]) * 1024 for line in probe.stdout.splitlines() if line.startswith("VmSize:"))
    limit = mapped + 3 * 2**30
    result = tool_process(["evaluate.py", "--ckpt", run_copy, "--batch_size", 2**20], resource.RLIMIT_AS, limit)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "--batch_size 1,048,576 needs about" in result.stderr and "(counting ulimit -v" in result.stderr


def test_the_disk_preflight_counts_only_new_bytes_and_never_says_zero(run_copy, corpus_files, monkeypatch):
    from abcgpt.core import preflight

    folder = RunFolder(run_copy.parent)
    size = run_copy.stat().st_size
    assert preflight.checkpoint_writes(folder, 10**9) == size  # both files there: one copy at a time
    (run_copy.parent / "best.pt").unlink()
    assert preflight.checkpoint_writes(folder, 10**9) == size
    assert preflight.checkpoint_writes(RunFolder(run_copy.parent / "new"), 1234) == 2 * 1234
    usage = shutil.disk_usage(run_copy.parent)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage._replace(free=int(1.5 * size)))
    saved = Run.load(run_copy).train_config  # a disk with room for one more checkpoint, not three
    Trainer(tiny_config(corpus_files, run_copy.parent, max_iters=saved.max_iters), resume=True, **quiet)
    with pytest.raises(Exception, match=r"needs about \d+\.\d KiB more of disk in .* and \d+\.\d KiB is free"):
        preflight.check_disk(run_copy.parent, 2 * size, "the run's checkpoints")


# 11, 12. a newcomer's path

def test_train_runs_offline_on_the_corpora_the_package_ships(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(socket.socket, "connect", offline)
    monkeypatch.setenv("ABCGPT_CACHE_DIR", str(tmp_path / "no-cache"))
    out = tmp_path / "out"
    assert main("train", *TINY, "--max_iters", 1, "--eval_interval", 1, "--out_dir", out) == 0
    assert Run.load(out / "ckpt.pt").source_names == ["tinystories", "tinyshakespeare"]
    assert not (tmp_path / "no-cache").exists()


def test_serve_on_port_0_prints_the_port_it_listens_on(run_copy):
    pytest.importorskip("uvicorn")
    server = subprocess.Popen([sys.executable, "serve.py", "--ckpt", str(run_copy), "--port", "0", "--device", "cpu"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = server.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split()[0])
        assert port > 0
        for _ in range(100):  # the model loads after the socket is bound
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
                    info = json.loads(response.read())
                    assert [source["name"] for source in info["sources"]] == ["stories", "plays"]
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("the printed port never answered")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_sample_streams_its_text_as_it_is_generated(run_copy, monkeypatch):
    """One sample goes to stdout token by token (each flushed), and is the text generate() makes."""
    from abcgpt.model.sampling import Generation, Sampling, generate
    from abcgpt.training.run import load_model

    writes = []

    class Console(io.StringIO):
        def flush(self):
            writes.append(self.getvalue())

    console = Console()
    monkeypatch.setattr(sys, "stdout", console)
    assert main("sample", "--ckpt", run_copy, "--alpha", 0.3, "--start", "one day", "--max_new_tokens", 40,
                "--seed", 5) == 0
    assert len(set(writes)) > 40  # the prompt, then every token as it came
    model, tokenizer, _ = load_model(run_copy)
    idx = torch.tensor([tokenizer.encode("one day")])
    generated = generate(model, idx, Generation(0.3, Sampling(0.8, 200), 5, 40))
    expected = tokenizer.decode(generated[0].tolist())
    assert console.getvalue() == f"--- alpha 0.3\n{expected}\n"


def test_a_stream_gives_out_whole_characters_only():
    from abcgpt.data.tokenizer import TextStream

    class Bytes:  # a byte-level tokenizer: one token per byte, as a BPE can split a character
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    stream, text = TextStream(Bytes()), "a “quote” and 🙂"
    pieces = [stream.feed([b]) for b in text.encode()]
    assert "".join(pieces) + stream.flush() == text and "\ufffd" not in "".join(pieces)
    broken = list(b"\xc3\xc3\xc3\xc3\xc3\xa9 ok \xf0\x9f\x99 \xe2\x80\x9c") * 3  # invalid bytes among valid ones
    stream = TextStream(Bytes())
    assert "".join(stream.feed([b]) for b in broken) + stream.flush() == Bytes().decode(broken)


def test_report_reuses_the_evaluation_and_the_calibration_of_the_same_checkpoint(run_copy, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from abcgpt.measuring import report

    (run_copy.parent / "best.pt").unlink()  # its corners are swept of their own: here only the reuse is watched
    assert main("evaluate", "--ckpt", run_copy, "--max_windows", 4) == 0
    assert main("calibrate", "--ckpt", run_copy, "--samples", 3, "--max_new_tokens", 8) == 0
    monkeypatch.setattr(report, "sweep", lambda *a, **k: pytest.fail("swept again"))
    measured = []
    measure = report.measure
    monkeypatch.setattr(report, "measure", lambda *a, **k: measured.append(a[3]) or measure(*a, **k))
    flags = ["--ckpt", run_copy, "--samples", 3, "--max_new_tokens", 8, "--max_windows", 4]
    assert main("report", *flags, "--out_dir", tmp_path / "r1") == 0
    written = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert written["losses"] == json.loads((run_copy.parent / "eval.json").read_text())["losses"]
    assert written["calibration"]["from"] == "calibrate.py" and len(measured) == 1  # only the mixes, sampled fresh
    monkeypatch.setattr(report, "sweep", importlib.import_module("abcgpt.measuring.loss").sweep)
    assert main("report", *flags[:-1], 8, "--out_dir", tmp_path / "r2") == 0  # other windows: swept again


def test_inspect_shows_the_calibrated_map(run_copy, capsys):
    assert main("abcgpt.tools.inspect", run_copy) == 0
    assert "calibrated dial: none (python calibrate.py makes one" in capsys.readouterr().out
    assert main("calibrate", "--ckpt", run_copy, "--samples", 2, "--max_new_tokens", 8, "--grid", 3) == 0
    assert main("abcgpt.tools.inspect", run_copy) == 0
    assert "calibrated dial: mix -> alpha 0 -> " in capsys.readouterr().out


def test_a_cache_that_cannot_be_made_is_not_called_a_network_failure(tmp_path, monkeypatch):
    from abcgpt.data import corpus

    monkeypatch.setattr(corpus, "embedded_text", lambda name: None)  # a package without its own copies
    (tmp_path / "file").write_text("x")
    with pytest.raises(corpus.DataError, match="cannot make the cache folder .* give --cache_dir a folder you can"):
        corpus.read_text(corpus.SourceSpec("tinyshakespeare"), tmp_path / "file" / "cache")
