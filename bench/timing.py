"""Timing as docs/design.md, section 6 says: warm-up, rotating inputs, median of many repeats.

CUDA work is timed with CUDA events around each call, or around replays of a CUDA graph that holds the
calls (time_graph_replays: the device's time alone, no host cost between kernels); CPU work with
perf_counter. host_seconds is the other half: what the host spends issuing one call.
"""
import platform
import statistics
import time
from datetime import datetime, timezone

import torch


def time_calls(fn, inputs, repeats=50, warmup=10, device="cpu"):
    """Seconds per call of fn(*inputs[i % len(inputs)]); inputs rotate so caches do not flatter."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for i, (start, end) in enumerate(events):
            start.record()
            fn(*inputs[i % len(inputs)])
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    return host_seconds(fn, inputs, repeats)  # on a CPU the whole call is host time


def time_graph_replays(fn, inputs, repeats=50, warmup=10, device="cuda"):
    """Seconds per call of fn over the rotating inputs, from replays of one CUDA graph that captured a call
    on each input set: what the device spends, without the host's launch cost between calls."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture asks
        for i in range(max(warmup, len(inputs))):
            fn(*inputs[i % len(inputs)])
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 / len(inputs) for start, end in events]


def host_seconds(fn, inputs, repeats=50, device="cpu"):
    """Seconds the host spends in each call, with nothing waited for: a few dozen calls queue on a GPU
    without filling its launch queue. On a CPU the call's own work is in it too."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        fn(*inputs[i % len(inputs)])
        times.append(time.perf_counter() - start)
    if cuda:
        torch.cuda.synchronize(device)
    return times


def summary(times):
    """Median and spread (interquartile range) of a list of seconds."""
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_s": statistics.median(times), "iqr_s": q[2] - q[0], "min_s": min(times), "n": len(times)}


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name where the system gives one (Linux's cpuinfo), else its architecture: host times
    differ by twice between two development machines' CPUs."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"


def environment(device):
    """What a result file records about where it was measured."""
    import importlib.util

    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        import triton

        triton_version = triton.__version__
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
