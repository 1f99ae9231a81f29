"""Checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values: model and optimizer
state (the frozen scores are buffers in the model state), model and training
configs, tokenizer, step and seed. Training reseeds its random generators from
(seed, step, micro-batch) for every micro-batch, so seed and step are the whole
RNG state: a resumed run draws the batches and dropout masks it would have drawn.
"""
import os
from pathlib import Path

import torch

from .model import GPT, GPTConfig
from .tokenizer import tokenizer_from_dict

FORMAT = "abcgpt-checkpoint-v1"


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state, path):
    """Write state to path through a temporary file, so path is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a damaged file can fail inside the unpickler in many ways
        reason = f"{type(e).__name__}: {str(e).strip().split('. ')[0]}"
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an abcGPT checkpoint")
    return state


def load_model(path, device="cpu", backend="auto"):
    """The model and tokenizer stored in a checkpoint, ready for inference with the given gate backend."""
    state = load_checkpoint(path)
    try:
        model = GPT(GPTConfig.from_dict(state["model_config"]), backend)
        model.load_state_dict(state["model"])
        tokenizer = tokenizer_from_dict(state["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = " ".join(line.strip() for line in str(e).strip().splitlines())
        raise CheckpointError(f"{path} does not hold a usable model: {reason}") from None
    return model.to(device).eval(), tokenizer, state
