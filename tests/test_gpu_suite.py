"""The GPU suite fits its time budget: step limits add up, later steps shrink or are skipped, and a
suite cut short keeps a summary of what it had."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench import gpu_suite  # not bench.warm_kernels: it turns the interpreter off in this process

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("cuda", [False, True])
def test_the_step_limits_fit_the_budget(quick, cuda, tmp_path):
    plan = gpu_suite.fit_to_budget(gpu_suite.steps(tmp_path, quick, cuda), gpu_suite.BUDGET[quick])
    assert sum(step.share for step in plan) + gpu_suite.RESERVE <= gpu_suite.BUDGET[quick] + 1e-6
    assert gpu_suite.BUDGET[False] <= 6 * 60 and gpu_suite.BUDGET[True] <= 4 * 60  # the issues' promise
    names = [s.name for s in plan]
    assert names[:1] == (["warm_kernels"] if cuda else ["kernel_bench"])  # on a GPU the compiles come first
    assert [n for n in names if n != "warm_kernels"][:3] == ["kernel_bench", "tests", "gate_throughput"]  # by value
    assert all(step.share >= step.minimum for step in plan)  # the default budget runs every step


@pytest.mark.parametrize("budget", [100, 300, 1000])
def test_a_budget_scales_every_share(budget, tmp_path):
    plan = gpu_suite.fit_to_budget(gpu_suite.steps(tmp_path, False, True), budget)
    assert sum(step.share for step in plan) + gpu_suite.RESERVE == pytest.approx(budget)


def sleeper(name, seconds, share, minimum):
    return gpu_suite.Step(name, [sys.executable, "-c", f"import time; time.sleep({seconds})"], share, minimum)


def test_steps_past_the_budget_are_cut_short_or_skipped(tmp_path, monkeypatch):
    """A slow first step is stopped at its limit, and a step whose share of a small budget falls below its
    minimum is skipped."""
    plan = [sleeper("slow", 60, 10, 1), sleeper("quick", 0, 2, 1), sleeper("late", 0, 8, 7)]
    monkeypatch.setattr(gpu_suite, "steps", lambda out, quick, cuda: plan)
    monkeypatch.setattr(gpu_suite, "write_corpora", lambda folder: None)
    budget = gpu_suite.RESERVE + 10  # half the shares: slow 5 s, quick 1 s, late 4 s
    code = gpu_suite.main(["--out_dir", str(tmp_path), "--budget", str(budget)])
    record = json.loads((tmp_path / "summary.json").read_text())
    statuses = {s["step"]: s["status"] for s in record["steps"]}
    assert code == 1
    assert statuses["slow"].startswith("fail (over its")  # stopped at its own limit, not the budget's end
    assert statuses["quick"] == "pass"
    assert statuses["late"] == "skipped (out of budget)"  # 4 s is below its minimum
    assert "| late | skipped (out of budget) |" in (tmp_path / "summary.md").read_text()


def test_the_summary_is_written_before_a_step_ends(tmp_path, monkeypatch):
    """Killed in the middle of a step, the suite has already written what it had, naming the running step."""
    plan = [sleeper("first", 0, 5, 1), sleeper("hangs", 600, 500, 1)]
    monkeypatch.setattr(gpu_suite, "steps", lambda out, quick, cuda: plan)
    monkeypatch.setattr(gpu_suite, "write_corpora", lambda folder: None)
    monkeypatch.setattr(gpu_suite, "run_step", lambda step, limit, out, cache: pytest.fail("killed")
                        if step.name == "hangs"
                        else {"step": step.name, "status": "pass", "seconds": 0, "limit_s": 5, "log": "first.log"})
    with pytest.raises(pytest.fail.Exception):
        gpu_suite.main(["--out_dir", str(tmp_path)])
    steps = json.loads((tmp_path / "summary.json").read_text())["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("first", "pass"), ("hangs", "running")]


def test_a_budget_too_small_for_the_suite_is_refused(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--out_dir", str(tmp_path), "--budget", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--budget must be above" in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_suite_that_cannot_import_the_kernels_stops_before_any_step(tmp_path, monkeypatch, capsys):
    """Without abcgpt installed the kernels' import name is missing: one line saying how to install it, at once,
    rather than a lease spent on steps that each fail on it."""
    find_spec = gpu_suite.importlib.util.find_spec
    monkeypatch.setattr(gpu_suite.importlib.util, "find_spec",
                        lambda name, *a: None if name == "abcgpt_kernels" else find_spec(name, *a))
    with pytest.raises(SystemExit) as stopped:
        gpu_suite.main(["--out_dir", str(tmp_path / "suite")])
    assert stopped.value.code == 2 and "abcgpt is not installed" in capsys.readouterr().err
    assert not (tmp_path / "suite").exists()


def compiled_python(code):
    """Run code in a process of its own with Triton's real compiler, not the interpreter conftest sets."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ABCGPT_NO_TMA")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_gpu_steps_compile_few_binaries_within_the_warm_step_share(tmp_path):
    """Every binary the kernel benchmark and the GPU tests compile, counted from their planned launches
    (issue 30 found about 225), fits the warm step's share at the default budget, at the slowest compile
    seen here; and the tests step runs just the files whose launches are planned."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.warm_kernels", "--dry-run"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    total, bench_binaries, test_binaries, predicted = map(int, re.search(
        r"(\d+) distinct binaries \(kernel_bench (\d+), tests (\d+)\).* (\d+) s predicted", result.stdout).groups())
    assert max(bench_binaries, test_binaries) <= total <= 30, result.stdout
    plan = {s.name: s for s in gpu_suite.fit_to_budget(gpu_suite.steps(tmp_path, False, True), gpu_suite.BUDGET[False])}
    assert predicted <= plan["warm_kernels"].share, (result.stdout, plan["warm_kernels"].share)
    tests_step = plan["tests"].command
    assert [arg for arg in tests_step if arg.startswith("tests/")] == gpu_suite.GPU_TESTS


def test_the_count_is_of_binaries_not_launches():
    """The counter trips on what makes a new binary (a dtype, a gate layout) and not on what does not (the
    rows, which the kernels take unspecialized)."""
    result = compiled_python("""
        import os
        from dataclasses import replace
        from bench import gpu_cases, kernel_static, warm_kernels
        os.environ["TRITON_INTERPRET"] = "1"  # kernels stay compiled; the triton backend's CPU check passes
        import torch
        from abcgpt_kernels.ops import record_launches
        case = gpu_cases.CASES[0]
        def count(*cases):
            with record_launches(kernel_static.H100, run=False) as launches:
                for c in cases:
                    gpu_cases.fused(c, "cpu")
            return len(warm_kernels.binaries(launches, kernel_static.Compiler()))
        assert count(case) == 1
        assert count(case, replace(case, M=case.M + 77)) == 1, "rows made a binary"
        assert count(case, replace(case, dtype=torch.float16)) == 2, "a dtype made none"
        assert count(case, replace(case, rows_per_gate=case.M // 5)) == 2, "a gate table made none"
        print("counted")
    """)
    assert result.returncode == 0 and "counted" in result.stdout, result.stdout + result.stderr
