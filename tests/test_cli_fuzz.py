"""A fuzzer for the command line: hypothesis draws flags for every tool (wrong types, extreme numbers, special
paths, odd names, duplicated and contradictory flags) and runs each draw in a scratch workspace, asserting
that the tool

- exits 0, 1 or 2, with no traceback and, when it fails, one line of error;
- changes no file outside the output it was named (hashes before and after);
- ends within a bound (a server that is up and listening counts as ended well).

Draws run in children of a fork server that imported the tools once, so a draw costs its own work only.
CI runs a fixed seed and a bounded number of draws; run it longer by hand:

    ABCGPT_FUZZ_DRAWS=2000 ABCGPT_FUZZ_SEED=7 pytest tests/test_cli_fuzz.py -s
"""
import hashlib
import importlib
import multiprocessing
import os
import shutil
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
DRAWS = int(os.environ.get("ABCGPT_FUZZ_DRAWS", "150"))
SEED = int(os.environ.get("ABCGPT_FUZZ_SEED", "28"))
HANG_S = 120  # no draw takes this long on a busy 2-core machine; one that does is stuck
MODULES = {name: f"abcgpt.tools.{name}"
           for name in ("train", "sample", "evaluate", "calibrate", "report", "serve", "inspect", "permute")}

# values, by what a flag takes
NUMBERS = ["0", "-1", "1", "0.5", "1e300", "-1e300", "nan", "inf", "-inf", "1e-300", str(10**30), str(2**63),
           str(2**64), "abc", "", "0x10", "1_0", "\u0663", " 1", "1e999"]
WORK = ["0", "-1", "1", "2", "abc", "", "1.5", "nan", str(10**30), str(2**63)]  # sizes: only small ones are valid
PATHS = ["run/ckpt.pt", "missing/none.pt", "folder", "fifo", "/dev/null", "/dev/zero", "loop-a", "victim-link",
         "notes.txt", "text.pt", "", "/", "run", "/proc/self/mem", "folder/new.json", "a\nb", "-", "~", "."]
NAMES = ["stories", "plays", "../x", "a b", "\u00e9", "x" * 65, ".", "..", "", "all", "stories=1,plays=-1",
         "stories=nan", "stories=1e400", "plays=0", "stories,plays", "stories=1,stories=2"]
SOURCES = ["stories=stories.txt,plays=plays.txt", "stories=fifo,plays=plays.txt", "a=/dev/zero,b=plays.txt",
           "../x=stories.txt,b=plays.txt", "stories", "a=loop-a,b=plays.txt", "a=stories.txt", "", ",",
           "a=stories.txt,a=plays.txt", "a=folder,b=plays.txt", "a=notes.txt,b=run/ckpt.pt", "a=,b=plays.txt",
           "stories=stories.txt,plays=plays.txt,third=third.txt"]
TEXTS = ["", "one day", "FILE:fifo", "FILE:/dev/zero", "FILE:folder", "FILE:missing", "FILE:stories.txt",
         "FILE:loop-a", "\u20ac\u20ac", "\x00", "ROMEO:"]
CHOICES = ["cpu", "auto", "cuda", "cuda:7", "tpu", "", "line", "pool", "simplex", "tent", "ring", "batch",
           "sequence", "char", "true", "false", "2", "float16", "none"]
KINDS = {"number": NUMBERS, "work": WORK, "path": PATHS, "name": NAMES, "sources": SOURCES, "text": TEXTS,
         "choice": CHOICES}
RUNTIME = {"--threads": "work", "--device": "choice"}
FLAGS = {  # each tool's flags and what they take ("switch": no value)
    "sample": {"--ckpt": "path", "--alpha": "number", "--voice": "name", "--mix": "number", "--start": "text",
               "--samples": "work", "--max_new_tokens": "work", "--temperature": "number", "--top_k": "number",
               "--seed": "number", "--force": "switch", **RUNTIME},
    "evaluate": {"--ckpt": "path", "--sources": "sources", "--cache_dir": "path", "--batch_size": "work",
                 "--max_windows": "work", "--out": "path", **RUNTIME},
    "calibrate": {"--ckpt": "path", "--sources": "sources", "--samples": "work", "--max_new_tokens": "work",
                  "--grid": "work", "--seed": "number", **RUNTIME},
    "report": {"--ckpt": "path", "--out_dir": "path", "--title": "text", "--sources": "sources", "--samples": "work",
               "--max_new_tokens": "work", "--max_windows": "work", "--seed": "number", **RUNTIME},
    "train": {"--sources": "sources", "--out_dir": "path", "--resume": "switch", "--overwrite": "switch",
              "--baselines": "switch", "--new_sources": "switch", "--seed": "number", "--mask_seed": "number",
              "--learning_rate": "number", "--dropout": "number", "--geometry": "choice", "--shared": "number",
              "--uniform_share": "number", "--dial_beta": "number", "--alpha_mode": "choice",
              "--val_fraction": "number", "--n_head": "work", "--only_source": "name", "--gated": "choice",
              "--max_iters": "work", "--batch_size": "work", "--block_size": "work", "--narrowness": "number",
              "--grad_clip": "number", "--cache_dir": "path", "--dtype": "choice", "--preset": "choice",
              "--threads": "work"},
    "serve": {"--ckpt": "path", "--port": "work", "--host": "choice", "--max_batch": "work",
              "--max_new_tokens": "work", "--timeout": "number", "--header_timeout": "number",
              "--max_queue": "work", "--max_connections": "work", "--token": "text", **RUNTIME},
    "inspect": {"": "path"},
    "permute": {"": "path", " ": "path", "--in_place": "switch"},
}
BASE = {  # what every draw of a tool starts from; drawn flags come after, and so win
    "train": ["--sources", "stories=stories.txt,plays=plays.txt", "--n_layer", "1", "--n_head", "2", "--n_embd", "16",
              "--block_size", "8", "--batch_size", "4", "--max_iters", "2", "--eval_interval", "2", "--eval_iters",
              "1", "--log_interval", "1", "--device", "cpu", "--threads", "1"],
    "sample": ["--ckpt", "run/ckpt.pt", "--max_new_tokens", "8", "--threads", "1"],
    "evaluate": ["--ckpt", "run/ckpt.pt", "--max_windows", "4", "--threads", "1"],
    "calibrate": ["--ckpt", "run/ckpt.pt", "--samples", "2", "--max_new_tokens", "8", "--grid", "3", "--threads", "1"],
    "report": ["--ckpt", "run/ckpt.pt", "--out_dir", "rep", "--samples", "2", "--max_new_tokens", "8",
               "--max_windows", "4", "--threads", "1"],
    "serve": ["--ckpt", "run/ckpt.pt", "--port", "0", "--threads", "1"],
    "inspect": [],
    "permute": [],
}


def outputs(tool, argv):
    """The paths a draw names as what it writes (in the workspace): what it may change."""
    def last(flag, default=None):
        values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]
        return values[-1] if values else default

    positional = [a for i, a in enumerate(argv) if not a.startswith("--") and (i == 0 or not argv[i - 1].startswith("--")
                                                                              or argv[i - 1] == "--in_place")]
    ckpt = last("--ckpt", "out/ckpt.pt")
    named = {"train": [last("--out_dir", "out")], "evaluate": [last("--out") or str(Path(ckpt).parent / "eval.json")],
             "report": [last("--out_dir")], "calibrate": [ckpt],
             "permute": positional[:1] if "--in_place" in argv else positional[1:2]}.get(tool, [])
    return [n for n in named if n]


def make_template(root, trained_checkpoint, corpus_files):
    stories, plays = corpus_files
    shutil.copytree(trained_checkpoint.parent, root / "run")
    for name, source in (("stories.txt", stories), ("plays.txt", plays)):
        shutil.copy(source, root / name)
    (root / "third.txt").write_text(" ".join(["alpha beta gamma delta"] * 300))
    (root / "folder").mkdir()
    (root / "notes.txt").write_text("notes\n")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "victim.txt").write_text("someone else's file\n" * 50)
    os.symlink("victim.txt", root / "victim-link")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")


def fingerprint(root, allowed):
    """sha256 of every file in root (links as their targets' names, pipes as pipes), except under allowed."""
    allowed = [Path(os.path.normpath(root / a)) for a in allowed]
    prints = {}
    for path in sorted(root.rglob("*")):
        if any(path == a or a in path.parents for a in allowed) or path.name == ".lock":
            continue
        if path.is_dir() and not path.is_symlink() and any(path in a.parents for a in allowed):
            continue  # a folder made to hold the output
        if path.is_symlink():
            prints[str(path)] = "link to " + os.readlink(path)
        elif path.is_file():
            prints[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            prints[str(path)] = "folder" if path.is_dir() else "special"
    victim = root / "victim.txt"  # never named as an output, whatever link leads to it
    prints["victim"] = hashlib.sha256(victim.read_bytes()).hexdigest() if victim.exists() else "gone"
    return prints


def run_draw(tool, argv, cwd, log):
    """In a fork server's child: the tool's command line, its output into log's .out and .err files."""
    os.chdir(cwd)
    for fd, suffix in ((1, ".out"), (2, ".err")):
        os.dup2(os.open(Path(log).with_suffix(suffix), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [tool, *argv]
    from abcgpt.tools.cli import run_tool

    module = importlib.import_module(MODULES[tool])
    code = 0
    try:
        run_tool(lambda: module.main(argv))
    except SystemExit as e:
        code = e.code
        if isinstance(code, str):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 3
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code or 0)  # through multiprocessing's own exit, which lets go of what the tool's imports registered


@pytest.fixture(scope="module")
def fork_server():
    """A fork-server context whose server has imported every tool (and torch) once."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "abcgpt.tools.cli", *MODULES.values()])
    return context


def test_no_draw_of_flags_gets_a_traceback_touches_other_files_or_hangs(fork_server, trained_checkpoint,
                                                                        corpus_files, tmp_path_factory):
    template = tmp_path_factory.mktemp("fuzz-template")
    make_template(template, trained_checkpoint, corpus_files)
    scratch = tmp_path_factory.mktemp("fuzz")
    seen, failures = set(), []

    @seed(SEED)
    @settings(max_examples=DRAWS, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def draw(data):
        tool = data.draw(st.sampled_from(sorted(FLAGS)), label="tool")
        flags = FLAGS[tool]
        argv = list(BASE[tool])
        for _ in range(data.draw(st.integers(1 if tool in ("inspect", "permute") else 0, 4), label="flags")):
            flag = data.draw(st.sampled_from(sorted(flags)), label="flag")
            kind = flags[flag]
            if flag.strip():
                argv.append(flag)
            if kind != "switch":
                argv.append(data.draw(st.sampled_from(KINDS[kind]), label=kind))
        seen.add((tool, *argv))
        ws = scratch / f"draw{len(seen)}"
        shutil.copytree(template, ws, symlinks=True)
        os.mkfifo(ws / "fifo")
        allowed = outputs(tool, argv)
        before = fingerprint(ws, allowed)
        log = scratch / f"log{len(seen)}"
        for suffix in (".out", ".err"):
            log.with_suffix(suffix).touch()
        child = fork_server.Process(target=run_draw, args=(tool, argv, ws, log))
        child.start()
        served = False
        for _ in range(int(HANG_S / 0.1)):
            child.join(0.1)
            served = tool == "serve" and log.with_suffix(".out").read_text(errors="replace").startswith("serving ")
            if not child.is_alive() or served:  # a server that came up has done all a draw can check
                break
        err = log.with_suffix(".err").read_text(errors="replace")
        if child.is_alive():
            child.kill()
            child.join()
            if not served:
                failures.append((tool, argv, f"still running after {HANG_S} s", err[-300:]))
                return
        code = 0 if served else child.exitcode
        lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
        problem = None
        if code not in (0, 1, 2, -9):
            problem = f"exit code {code}"
        elif "Traceback" in err:
            problem = "a traceback"
        elif code in (1, 2) and not (lines and lines[-1].startswith("error: ")
                                     and sum(line.startswith("error") for line in lines) == 1):
            problem = "not one line of error"
        elif fingerprint(ws, allowed) != before:
            problem = "a file outside its output changed"
        if problem:
            failures.append((tool, argv, problem, err[-500:]))
        shutil.rmtree(ws, ignore_errors=True)

    draw()
    print(f"\nCLI fuzzer: {len(seen)} distinct draws, {len(failures)} failures")
    assert not failures, "\n\n".join(f"{tool} {' '.join(map(repr, argv))}: {problem}\n{err}"
                                     for tool, argv, problem, err in failures[:10])
    assert len(seen) >= 0.8 * DRAWS  # the draws are really many different command lines
