"""The benchmark scripts run and report every case they promise, with sane numbers."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_json(script, *args, tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, script, *args, "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result.stdout


def test_kernel_bench_quick(tmp_path):
    record, stdout = run_json("bench/kernel_bench.py", "--quick", "--no-compile", tmp_path=tmp_path)
    assert {"device", "date", "torch", "triton", "dtype"} <= set(record)
    cases = {(r["op"], r["alpha"], r["pass"], r["impl"]) for r in record["results"]}
    assert cases == {(op, a, p, impl) for op in ("up", "mlp") for a in ("scalar", "per-row")
                     for p in ("fwd", "fwd+bwd") for impl in ("fused", "eager", "matmul")}
    for r in record["results"]:
        assert r["median_s"] > 0 and math.isfinite(r["median_s"]) and r["tflops"] > 0
    assert "vs eager" in stdout
