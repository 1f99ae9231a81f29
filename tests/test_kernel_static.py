"""The H100 static check (bench.kernel_static): every launch the ops plan for an H100, compiled for sm_90a
here, has no spill, fits in shared memory and uses wgmma; and the check itself trips on a launch that
breaks each rule. The compiler cannot run inside this process (conftest puts Triton in interpreter
mode), so each check runs in a fresh one."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import triton

from abcgpt_kernels import ops

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("triton.backends.nvidia", reason="needs Triton's CUDA backend (its compiler runs without a GPU)")


def run_python(code, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ABCGPT_NO_TMA")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def static_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "kernel_static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.kernel_static", "--check", "--out", str(out)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1800)
    return result, json.loads(out.read_text()) if out.exists() else None


def test_every_h100_launch_passes_the_check(static_check):
    result, record = static_check
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    kinds = {(c["kernel"], c["path"], c["gate"]) for c in record["cases"]}
    for kernel in ("up", "up-train"):  # every launch kind the ops make on an H100
        assert {(kernel, p, g) for p in ("tma", "pointer") for g in ("vector", "table")} <= kinds
    assert {("down-grad", "tma", "-"), ("down-grad", "pointer", "-")} <= kinds
    for case in record["cases"]:
        assert case["stack_bytes"] == 0 and case["local_ops"] == 0, case
        assert case["smem_bytes"] <= 232448, case
        assert case["hgmma"] > 0, case
        assert case["problems"] == []


def test_the_model_is_calibrated_on_cublas_as_measured(static_check):
    """One latency per tile, fitted to cuBLAS's measured H100 times, reproduces each of them within 15%; each
    case at a measured shape gets a predicted ratio to cuBLAS, and a shape cuBLAS was not measured at none."""
    result = run_python("""
        import bench.kernel_static as ks
        bm, bn = ks.CALIBRATION_TILE
        for (M, K, N), us in ks.CUBLAS_H100_US.items():
            tiles_per_sm = -(-(-(-M // bm) * -(-N // bn)) // ks.H100.sms)
            model_us = tiles_per_sm * (ks.mma_cycles(bm, bn, K) + ks.TILE_LATENCY_CYCLES) / ks.CLOCK_HZ * 1e6
            assert abs(model_us / us - 1) < 0.15, ((M, K, N), model_us, us)
        print("calibrated")
    """)
    assert result.returncode == 0 and "calibrated" in result.stdout, result.stdout + result.stderr
    _, record = static_check
    for case in record["cases"]:
        if case["kernel"] in ("up", "up-train", "down-grad") and case["shape"][0] > 64:
            measured = tuple(case["shape"]) in {(16384, 384, 1536), (16384, 768, 3072), (65536, 384, 1536),
                                                (65536, 768, 3072)}
            assert (case["predicted_vs_cublas"] is not None) == measured, case


@pytest.mark.skipif(ops._version(triton.__version__) < (3, 9), reason=(
    "holds for Triton 3.9's register allocation; 3.6's gives the pointer path with a table 171 registers "
    "against the vector's 134 (issue 30)"))
def test_the_table_gates_cost_what_the_vector_costs(static_check):
    """A per-sequence table whose sequences fill whole tiles reads one gate row per tile: no more shared
    memory than one gate vector, and no fewer programs fit an SM, at every width. (A register or two more
    is the allocator's, on the pointer path's one program per SM: no cost there.)"""
    _, record = static_check
    by_case = {(c["kernel"], c["path"], c["gate"], tuple(c["shape"])): c for c in record["cases"]}
    for (kernel, path, gate, shape), case in by_case.items():
        if gate == "table" and shape[0] > 64:
            vector = by_case[(kernel, path, "vector", shape)]
            assert case["config"]["GATE"] == "tile"
            assert case["smem_bytes"] <= vector["smem_bytes"] and case["fit_per_sm"] >= vector["fit_per_sm"], (
                case, vector)
            if path == "tma":  # two programs per SM, or the deferred forward's: registers held to the vector's
                assert case["regs"] <= vector["regs"], (case, vector)


def test_the_training_forward_stores_only_h_through_tma(static_check):
    """TMA stores share one staging buffer and each waits for the last to be read out of it; the slope goes
    out through pointers, so the training forward's TMA stores are h's four chunks per tile, as the
    forward's are its two halves, and no slope store waits on an h store or the reverse."""
    _, record = static_check
    for case in record["cases"]:
        if case["path"] == "tma" and case["kernel"] in ("up-train", "up-two-programs"):
            chunks = 4 if case["kernel"] == "up-train" else 2
            # a flattened nest keeps the unflattened one too, for a K loop of no steps: the epilogue twice
            copies = 2 if case["regions"]["loads_ahead_of_epilogue"] else 1
            assert case["tma_stores"] == chunks * copies, case


def test_the_deferred_epilogue_runs_under_a_wgmma_and_the_tile_loop_is_found(static_check):
    """The deferred forward finishes its kept tile while a K step's wgmma is in flight; every other kernel
    waits for its last wgmma first. The deferred forward's tile loop is its real one, whose own work is
    counted, not a barrier's retry detour (which once made it negative)."""
    _, record = static_check
    deferred = [c for c in record["cases"] if c["function"] == "gated_up_deferred_kernel"]
    # the forward where TMA serves, and the benchmark's rival of the training forward
    assert {(c["kernel"], c["path"]) for c in deferred} == {("up", "tma"), ("up-train-deferred", "tma")}
    for case in record["cases"]:
        if case["regions"] is None:
            continue
        assert case["regions"]["wgmma_in_flight"] == (1 if case in deferred else 0), case
        if case in deferred:
            assert case["regions"]["tile"] > 0, case


def test_the_flattened_kernels_load_the_next_tile_under_the_epilogue(static_check):
    """Every TMA matmul but the deferred forward runs one flattened loop over all its K steps, so the loads it
    issues ahead (num_stages - 1 steps: at a tile's end, the next tile's first) are in flight while the
    epilogue, inside that loop, runs: no tile loop and no refill per tile. The deferred forward keeps its
    nest, as a flattened loop would wait for every wgmma (docs/design.md, Overlap)."""
    _, record = static_check
    for case in record["cases"]:
        if case["regions"] is None or case["path"] != "tma":
            continue
        ahead = case["regions"]["loads_ahead_of_epilogue"]
        if case["function"] == "gated_up_deferred_kernel":
            assert ahead == 0, case
        elif case["shape"][0] > 64:  # decoding rows: one tile per program, nothing to prefetch for
            assert case["regions"]["tile"] == 0 and ahead >= case["config"]["num_stages"] - 1, case
    # the count trips on a nest: the backward's pointer path keeps its loop nest (flatten=USE_TMA)
    nested = [c for c in record["cases"] if c["kernel"] == "down-grad" and c["path"] == "pointer" and c["regions"]]
    assert nested and all(c["regions"]["loads_ahead_of_epilogue"] == 0 and c["regions"]["tile"] > 0 for c in nested)


def test_the_deferred_forward_loads_its_gates_before_the_k_loop():
    """A gate vector, or a table read one row per tile, is loaded at the tile's start and used in the next
    tile's K loop, so no chunk under a wgmma waits for a global load; a row-by-row table (sequences shorter
    than a tile) still loads in each chunk, which is what the count trips on."""
    result = run_python("""
        import torch
        import bench.kernel_static as ks
        from abcgpt_kernels.ops import up_launch
        m = lambda *s: torch.empty(s, dtype=torch.bfloat16, device="meta")
        loads = {}
        for kind, rows in (("vector", 256), ("table", 256), ("table", 64)):
            launch = up_launch(m(16384, 768), m(3072, 768), None, ks.gate_of(kind, 16384, 3072, rows),
                               m(16384, 3072), m(0), False, ks.H100)
            assert launch.kernel.__name__ == "gated_up_deferred_kernel"
            loads[launch.kwargs["GATE"]] = ks.Compiler().binary(launch)["regions"]["global_loads_in_loop"]
        assert loads["vector"] == loads["tile"] == 0 and loads["row"] > 0, loads
        print("gates ahead")
    """)
    assert result.returncode == 0 and "gates ahead" in result.stdout, result.stdout + result.stderr


def test_the_deferred_epilogue_keeps_its_math_in_the_k_loop():
    """Without its opaque move, the compiler hoists each chunk's loop-invariant math out of the K loop,
    where no wgmma runs under it, and keeps the results live across the loop in registers."""
    result = run_python("""
        import torch
        import bench.kernel_static as ks
        from abcgpt_kernels.ops import up_launch
        m = lambda *s: torch.empty(s, dtype=torch.bfloat16, device="meta")
        built = {}
        for in_loop in (True, False):
            launch = up_launch(m(16384, 768), m(3072, 768), None, ks.gate_of("vector", 16384, 3072),
                               m(16384, 3072), m(0), False, ks.H100)
            built[in_loop] = ks.Compiler().binary(launch.with_settings(IN_LOOP=in_loop))
        kept, hoisted = built[True], built[False]
        assert kept["regions"]["epilogue"] > hoisted["regions"]["epilogue"] + 200, (kept, hoisted)
        assert kept["regs"] < hoisted["regs"], (kept["regs"], hoisted["regs"])
        print("kept in the loop")
    """)
    assert result.returncode == 0 and "kept in the loop" in result.stdout, result.stdout + result.stderr


def test_the_check_trips_on_a_spill_too_much_shared_memory_and_no_wgmma():
    result = run_python("""
        import torch
        import bench.kernel_static as ks
        from abcgpt_kernels.ops import up_launch
        def case(dtype=torch.bfloat16, deferred=False, **settings):
            M, K, N = 16384, 768, 3072
            m = lambda *s: torch.empty(s, dtype=dtype, device="meta")
            launch = up_launch(m(M, K), m(N, K), None, ks.gate_of("vector", M, N), m(M, N), m(0), False, ks.H100,
                               deferred=deferred).with_settings(**settings)
            c = ks.Case("up", "tma", "vector", (M, K, N), launch, 0)
            c.binary = ks.Compiler().binary(launch)
            return ks.problems(c)
        assert case() == [] and case(deferred=True) == [], (case(), case(deferred=True))
        # four warps hold the 128x128 accumulator in 128 registers a thread: capped at 128, much spills (a cap
        # just under the kernel's 127 registers spilled 8 bytes here and nothing on the CI machine)
        assert any("spills" in p for p in case(num_warps=4)), case(num_warps=4)
        assert any("shared memory" in p for p in case(num_stages=8)), case(num_stages=8)
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 in IEEE precision: no tensor-core path
        assert any("wgmma" in p for p in case(torch.float32)), case(torch.float32)
        # the deferred forward unpipelined: each K step waits for its own wgmma, so no chunk runs under one
        unpipelined = case(deferred=True, num_stages=1)
        assert any("nothing runs under it" in p for p in unpipelined), unpipelined
        print("tripped")
    """)
    assert result.returncode == 0 and "tripped" in result.stdout, result.stdout + result.stderr


def test_small_batches_share_one_binary_whatever_their_grid():
    """Decoding launches a few rows at a time: every row count and grid up to 64 rows is the same binary."""
    result = run_python("""
        import torch
        import bench.kernel_static as ks
        from abcgpt_kernels.ops import up_launch
        compiler = ks.Compiler()
        keys = set()
        for M in (1, 3, 8, 17, 40, 64):
            for gate in ("vector", "table"):
                m = lambda *s: torch.empty(s, dtype=torch.bfloat16, device="meta")
                launch = up_launch(m(M, 768), m(3072, 768), None, ks.gate_of(gate, M, 3072, 1), m(M, 3072), m(0),
                                   False, ks.H100)
                keys.add((gate, compiler.specialize(launch)[0]))
        assert len(keys) == 2, len(keys)  # one binary for the vector, one for the per-row table
        print("one binary each")
    """)
    assert result.returncode == 0 and "one binary each" in result.stdout, result.stdout + result.stderr


def test_one_program_per_sm_is_the_same_binary_on_half_the_grid():
    """The kernel benchmark's overlap experiment: one program per SM against two must change the grid and
    nothing else, or its timing difference would not be the overlap's. The forward the other way runs two by
    default, our plain matmul one."""
    result = run_python("""
        import torch
        import bench.kernel_static as ks
        from bench.plain_matmul import plain_matmul_launch
        from abcgpt_kernels.ops import up_launch
        m = lambda *s: torch.empty(s, dtype=torch.bfloat16, device="meta")
        M, K, N = 16384, 768, 3072
        compiler = ks.Compiler()
        for plan in (lambda per_sm: up_launch(m(M, K), m(N, K), None, ks.gate_of("vector", M, N), m(M, N), m(0),
                                               False, ks.H100, deferred=False, programs_per_sm=per_sm),
                     lambda per_sm: plain_matmul_launch(m(M, K), m(N, K), m(M, N), ks.H100, programs_per_sm=per_sm)):
            two, one = plan(2), plan(1)
            assert two.grid == (2 * ks.H100.sms,) and one.grid == (ks.H100.sms,), (two.grid, one.grid)
            assert compiler.specialize(two)[0] == compiler.specialize(one)[0]
            assert plan(None).grid in (two.grid, one.grid)
        print("same binaries")
    """)
    assert result.returncode == 0 and "same binaries" in result.stdout, result.stdout + result.stderr
