"""Checks made before long work: memory for what is about to be allocated, disk for what is about to be
saved. The estimates are rough (float32, the largest terms only); they refuse what cannot fit, with the
sizes in the message, rather than let an allocator fail minutes in with a traceback."""
import os
import resource
import shutil
from pathlib import Path

import torch

from .errors import SettingsError

FLOAT = 4  # bytes: the estimates count float32 throughout


def size(n: float) -> str:
    """n bytes for a person: GiB, MiB or KiB, never "0.0 GiB"."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{max(n, 0) / 2**10:.1f} KiB"


def parameters(config) -> int:
    """About how many parameters a GPT of this config has (the blocks, the tied embedding, positions)."""
    c = config.n_embd
    return 12 * config.n_layer * c * c + (config.vocab_size + config.block_size) * c


def training_bytes(config, batch_size: int) -> int:
    """Weights, gradients and two Adam moments, and one micro-batch's activations (about 34 values per
    token, channel and layer plus the attention scores, after Korthikanti et al., 2022) and logits."""
    tokens = batch_size * config.block_size
    per_layer = tokens * (34 * config.n_embd + 5 * config.n_head * config.block_size)
    return FLOAT * (4 * parameters(config) + config.n_layer * per_layer + 2 * tokens * config.vocab_size)


def forward_bytes(config, rows: int) -> int:
    """Weights, and a no-grad forward over rows full windows: a layer's activations at a time, and logits."""
    tokens = rows * config.block_size
    layer = tokens * (4 * config.n_embd + config.n_head * config.block_size)
    return FLOAT * (parameters(config) + layer + tokens * config.vocab_size)


def generation_bytes(config, rows: int) -> int:
    """Weights, and decoding rows sequences at once: their key/value caches and one step's logits."""
    cache = 2 * config.n_layer * config.block_size * config.n_embd
    return FLOAT * rows * (cache + config.vocab_size) + forward_bytes(config, rows)


def checkpoint_bytes(config) -> int:
    """A training checkpoint: weights and two Adam moments, and the scores."""
    return FLOAT * 3 * parameters(config)


def available_memory(device) -> int:
    """Memory this process may still allocate on device, in bytes; None where it cannot be read. On the CPU
    the least of what the machine has free, what the address-space limit (ulimit -v) leaves and what the
    cgroup's limit (a container's) leaves."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    limits = [_meminfo_available(), _address_space_left(), _cgroup_left()]
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def _meminfo_available():
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _address_space_left():
    """RLIMIT_AS less what this process already maps, None where there is no limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration, ValueError):
        mapped = 0
    return max(0, soft - mapped)


def _cgroup_left():
    """The cgroup's memory limit less its use (cgroup v2, else v1), None where there is no limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 writes "no limit" as a huge number
            return max(0, int(limit) - usage)
    return None


def check_memory(needed: int, device, what: str) -> None:
    have = available_memory(device)
    if have is not None and needed > have:
        raise SettingsError(f"{what} needs about {size(needed)} of memory and {device} has {size(have)} free "
                            "(counting ulimit -v and container limits): make it smaller")


def check_disk(folder, needed: int, what: str) -> None:
    """Enough free space where folder is (or will be) for needed new bytes."""
    probe = Path(os.path.abspath(folder))
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise SettingsError(f"{what} needs about {size(needed)} more of disk in {folder} and {size(free)} is free")


def checkpoint_writes(folder, estimate: int) -> int:
    """The new bytes a run's checkpoints need on disk at their peak: each is written beside the file it
    replaces, then renamed over it, so a run whose ckpt.pt and best.pt exist needs room for one more copy;
    one whose files are missing, a copy for each. The size is the last checkpoint's, where there is one."""
    files = [folder.checkpoint, folder.best]
    each = folder.checkpoint.stat().st_size if folder.checkpoint.is_file() else estimate
    return each * max(1, sum(not f.exists() for f in files))
