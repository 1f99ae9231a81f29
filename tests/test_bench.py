"""The benchmark scripts run and report every case they promise, with sane numbers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(module, *args, tmp_path, as_file=False):
    """Run a benchmark as python -m bench.NAME, or as the design card writes it, python bench/NAME.py."""
    out = tmp_path / "result.json"
    command = [str(Path(*module.split(".")).with_suffix(".py"))] if as_file else ["-m", module]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # found as installed, not through a path
    result = subprocess.run([sys.executable, *command, *args, "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def test_kernel_bench_quick(tmp_path):
    record, stdout = run_json("bench.kernel_bench", "--quick", "--no-compile", tmp_path=tmp_path)
    assert {"device", "date", "torch", "triton", "dtype"} <= set(record)
    cases = {(r["op"], r["alpha"], r["pass"], r["impl"]) for r in record["results"]}
    assert cases == {(op, a, p, impl) for op in ("up", "mlp") for a in ("scalar", "per-row")
                     for p in ("fwd", "fwd-train", "fwd+bwd") for impl in ("fused", "eager", "matmul")} | {
        ("up", a, "fwd", impl) for a in ("scalar", "per-row")  # forward only
        for impl in ("triton_matmul", "two_programs", "two_programs_one_per_sm", "triton_matmul_two_per_sm")} | {
        ("up", a, "fwd-train", "deferred_train") for a in ("scalar", "per-row")}  # the training forward only
    for r in record["results"]:
        assert r["error"] is None, r
        assert r["median_s"] > 0 and math.isfinite(r["median_s"]) and r["tflops"] > 0
        assert r["warmup_s"] > 0  # the first call is reported for every implementation
    assert "vs eager" in stdout and "vs two programs per SM" in stdout and "vs a deferred epilogue" in stdout


@pytest.mark.parametrize("as_file", [False, True], ids=["python -m bench.gate_throughput", "python bench/gate_throughput.py"])
def test_gate_throughput_quick(tmp_path, as_file):
    record, stdout = run_json("bench.gate_throughput", "--quick", tmp_path=tmp_path, as_file=as_file)
    assert {"device", "date", "torch", "triton", "threads"} <= set(record)
    results = record["results"]
    # promised: vanilla once, each CPU backend at each alpha; training and generation for each
    assert {(r["case"], r["alpha"], r["mode"]) for r in results} == (
        {("vanilla", None, m) for m in ("train", "generate")}
        | {(b, a, m) for b in ("reference", "folded") for a in (0.0, 0.5, 1.0) for m in ("train", "generate")}
        | {("reference", a, m) for a in ("seq", "point") for m in ("train", "generate")}  # folded: one per batch
    )
    for r in results:
        for key in ("tokens_per_s", "median_s", "ratio_to_vanilla"):
            assert r[key] > 0 and math.isfinite(r[key]), (key, r)
        assert r["iqr_s"] >= 0
    assert all(r["ratio_to_vanilla"] == 1 for r in results if r["case"] == "vanilla")
    assert "triton backend needs CUDA" in stdout and "vs vanilla" in stdout


def test_serve_throughput_quick(trained_checkpoint, tmp_path):
    record, stdout = run_json("bench.serve_throughput", "--ckpt", str(trained_checkpoint), "--quick",
                              tmp_path=tmp_path)
    assert [r["batch"] for r in record["decoder"]] == [r["requests"] for r in record["throughput"]] == [1, 4]
    for r in record["decoder"]:
        assert r["decoder_vs_vanilla"] > 0 and math.isfinite(r["decoder_vs_vanilla"])
    for r in record["throughput"]:
        for way in ("generate", "decoder", "http", "http_one_at_a_time"):
            runs = r["tokens_per_s"][way]
            assert 0 < runs["min"] <= runs["median"] <= runs["max"]
        assert r["ratios"]["http_vs_generate"] == r["tokens_per_s"]["http"]["median"] / r["tokens_per_s"][
            "generate"]["median"]
    assert record["throughput"][1]["largest_batch"] >= 2  # four clients at once shared decoding steps
    assert record["info"]["probes"] >= 1 and 0 < record["info"]["p50_ms"] <= record["info"]["p95_ms"]
    assert record["flood"]["ratio"] > 0 and record["flood"]["flood_refused_429"] > 0  # 10 at once, 4 queued at most
    assert record["starvation"]["status"] == 200 and record["starvation"]["tokens"] == 16
    fair = record["short_beside_long"]
    assert 0 < fair["short_busy_p50_s"] <= fair["short_busy_p95_s"] and fair["short_idle_p50_s"] > 0
    for line in ("requests of 32 tokens", "/api/info with 4 streams", "flood:", "starvation:", "short beside long:"):
        assert line in stdout


def test_graph_replays_refuse_a_cpu():
    from bench.timing import time_graph_replays

    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        time_graph_replays(lambda: None, [()], device="cpu")


def test_a_cpu_result_names_the_cpu_model(tmp_path):
    """Host times depend on the CPU (18 us and 41 us a fused call on two development machines): a result file
    says which, and where the system says nothing, its architecture."""
    from bench.timing import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n\nprocessor\t: 1\n")
    assert cpu_model(info) == "AMD EPYC 9B14"
    info.write_text("processor\t: 0\nmodel name\t: \n")
    assert cpu_model(info).endswith(" CPU") and cpu_model(tmp_path / "absent").endswith(" CPU")


def test_the_results_tables_are_current():
    from bench.results_table import TABLES, current

    for marker in TABLES:
        page, text, fresh = current(marker)
        assert text.count(f"<!-- {marker}:start -->") == 1, f"{page} lost its {marker} table"
        assert fresh == text, "run: python -m bench.results_table --write"


def test_gpu_suite_runs_its_cpu_form(tmp_path):
    """On a machine without CUDA the suite runs what makes sense there, and summarises every step. The budget is
    one no step can reach on a busy machine either: this checks the steps and the summary, not how fast this
    machine is (test_gpu_suite.py checks the budget's arithmetic)."""
    command = [sys.executable, "-m", "bench.gpu_suite", "--quick", "--budget", "100000", "--out_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    for step in ("tests", "kernel_bench", "gate_throughput", "smoke_train", "smoke_sample", "smoke_evaluate",
                 "smoke_report"):
        assert f"| {step} | pass |" in summary
        assert (tmp_path / f"{step}.log").exists()
    assert "## Kernel" in summary and "## End to end" in summary
    assert (tmp_path / "smoke" / "report" / "report.md").exists()


def test_the_voices_judge_applies_the_criteria_and_reuses_its_runs(tmp_path):
    """bench.voices on three small sources: its verdicts follow from its own losses, and a second run trains
    nothing."""
    from conftest import play_text, story_text, word_text

    texts = {"stories": story_text(300), "plays": play_text(300), "words": word_text(300)}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
    sources = ",".join(f"{name}={tmp_path / name}.txt" for name in texts)
    command = [sys.executable, "-m", "bench.voices", "--sources", sources, "--runs", str(tmp_path / "runs"),
               "--out_dir", str(tmp_path / "out"), "--designs", "pool,line@uniform_share=0", "--steps", "3",
               "--windows", "4", "--samples", "4", "--max_new_tokens", "12"]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "out" / "voices.json").read_text())
    names = record["names"]
    assert names == list(texts) and set(record["designs"]) == {"pool", "line@uniform_share=0"}
    for design in record["designs"].values():
        assert list(design["grid"]) == names + ["all"]
        for k, (name, s) in enumerate(design["per_source"].items()):
            assert s["source_mode"] == design["grid"][name][name]
            assert s["vs_ungated"] == pytest.approx(s["source_mode"] / record["ungated"][name] - 1)
            assert s["below_ungated"] == (s["source_mode"] < record["ungated"][name])
            assert s["confusion_diagonal"] == design["confusion"][k][k]
        assert all(sum(row) == pytest.approx(1) for row in design["confusion"])
        assert design["passes"]["uniform"] == (design["uniform_vs_ungated"] <= 0.05)
        assert design["passes"]["below_ungated"] == all(s["below_ungated"] for s in design["per_source"].values())
    checkpoints = sorted((tmp_path / "runs").glob("*/ckpt.pt"))
    assert len(checkpoints) == 2 + 1 + 3  # two designs, the union, one per source
    written = [p.stat().st_mtime_ns for p in checkpoints]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr
    assert [p.stat().st_mtime_ns for p in checkpoints] == written  # every run reused
    assert "## pool" in (tmp_path / "out" / "voices.md").read_text()


def test_the_voices_judge_refuses_an_unknown_design_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.voices", "--sources", "a=x,b=y", "--runs", str(tmp_path),
                             "--out_dir", str(tmp_path), "--designs", "pool,cube"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: --designs: unknown cube")
    assert len(result.stderr.strip().splitlines()) == 1
