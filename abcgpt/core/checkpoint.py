"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values: model and optimizer
state (the frozen scores are buffers in the model state), model and training
configs, tokenizer, step and seed. Its fields are run.py's Run; this module
only writes and reads the file. Training reseeds its random generators from
(seed, step, micro-batch) for every micro-batch, so seed and step are the whole
RNG state: a resumed run draws the batches and dropout masks it would have drawn.

Every checkpoint carries a sha256 of each tensor and of everything else in it
(configs, tokenizer, names, counters), checked on every load: a flipped byte,
which torch.load itself would not notice, is refused with the part it hit.
"""
import hashlib
import shutil
from pathlib import Path

import torch

from .atomic import write_atomically
from .errors import UserError

FORMAT = "abcgpt-checkpoint-v2"  # v1: the same without checksums, still read
OLD_FORMATS = ("abcgpt-checkpoint-v1",)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing, damaged, or not what the tool needs."""


def _tensor_digest(t):
    t = t.detach().cpu().contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
    digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _split(value, path, tensors):
    """value with each tensor replaced by its path (collected in tensors), for hashing the rest."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return f"<tensor {path}>"
    if isinstance(value, dict):
        return {repr(k): _split(v, f"{path}/{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    return value


def checksums(state):
    """{"tensors": {path: sha256}, "rest": sha256 of every non-tensor value} of a checkpoint's content."""
    tensors = {}
    rest = _split({k: v for k, v in state.items() if k not in ("format", "checksums")}, "", tensors)
    return {"tensors": {path: _tensor_digest(t) for path, t in tensors.items()},
            "rest": hashlib.sha256(repr(rest).encode()).hexdigest()}


def _verify(state, path):
    if state["format"] in OLD_FORMATS:
        return
    recorded = state.get("checksums")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path} has no checksums: it is damaged")
    actual = checksums(state)
    changed = [p for p, d in actual["tensors"].items() if recorded.get("tensors", {}).get(p) != d]
    if set(actual["tensors"]) != set(recorded.get("tensors", {})):
        changed.append("the list of tensors")
    if actual["rest"] != recorded.get("rest"):
        changed.append("its settings (configs, tokenizer, names or counters)")
    if changed:
        raise CheckpointError(f"{path} failed its checksum: {changed[0].lstrip('/')} changed after it was "
                              f"written{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; "
                              "the file is corrupt, restore it from a copy")


def save_checkpoint(state, path):
    """Write state to path through a temporary file, so path is never half-written, and only once the
    temporary file reads back as a checkpoint: what cannot be loaded never replaces what could."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state, "checksums": checksums(state)}, f)
        load_checkpoint(tmp)

    _replace(path, write)


def copy_checkpoint(source, path):
    """Copy a checkpoint that save_checkpoint wrote (and so read back) to path, byte for byte, as safely."""
    def write(tmp):
        shutil.copyfile(source, tmp)

    _replace(path, write)


def _replace(path, write):
    """Fill a temporary file beside path with write(tmp), then swap it in: path is whole or untouched."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, write, CheckpointError)


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a checkpoint file (a folder, a pipe or a device)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file can fail inside the unpickler in many ways
        reason = f"{type(e).__name__}: {str(e).strip().split('. ')[0]}"
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") not in (FORMAT, *OLD_FORMATS):
        raise CheckpointError(f"{path} is not an abcGPT checkpoint")
    _verify(state, path)
    return state
