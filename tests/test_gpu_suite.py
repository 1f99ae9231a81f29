"""The GPU suite fits its time budget: step limits add up, later steps shrink or are skipped, and a
suite cut short keeps a summary of what it had."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_suite

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("quick", [False, True])
@pytest.mark.parametrize("cuda", [False, True])
def test_the_step_limits_fit_the_budget(quick, cuda, tmp_path):
    plan = gpu_suite.fit_to_budget(gpu_suite.steps(tmp_path, quick, cuda), gpu_suite.BUDGET[quick])
    assert sum(step.share for step in plan) + gpu_suite.RESERVE <= gpu_suite.BUDGET[quick] + 1e-6
    assert gpu_suite.BUDGET[False] <= 8 * 60 and gpu_suite.BUDGET[True] <= 4 * 60  # the promise
    assert [s.name for s in plan][:3] == ["kernel_bench", "tests", "gate_throughput"]  # in order of value
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
    monkeypatch.setattr(gpu_suite, "run_step", lambda step, limit, out: pytest.fail("killed") if step.name == "hangs"
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
