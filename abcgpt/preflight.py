"""Checks made before long work: memory for what is about to be allocated, disk for what is about to be
saved. The estimates are rough (float32, the largest terms only); they refuse what cannot fit, with the
sizes in the message, rather than let an allocator fail minutes in with a traceback."""
import shutil
from pathlib import Path

import torch

from .errors import SettingsError

FLOAT = 4  # bytes: the estimates count float32 throughout


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


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
    """Free memory on device, in bytes; None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_memory(needed: int, device, what: str) -> None:
    have = available_memory(device)
    if have is not None and needed > have:
        raise SettingsError(f"{what} needs about {gib(needed)} of memory and {device} has {gib(have)} free: "
                            "make it smaller")


def check_disk(folder, needed: int, what: str) -> None:
    """Enough free space where folder is (or will be) for needed bytes."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise SettingsError(f"{what} needs about {gib(needed)} of disk in {folder} and {gib(free)} is free")
