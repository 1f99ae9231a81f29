"""abcGPT: a GPT whose voice is dialled at inference time by alpha in [0, 1]."""
from .gates.gate import sample_scores, tent_gate
from .model.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "sample_scores", "tent_gate"]
