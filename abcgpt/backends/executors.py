"""What runs a forward's gated layers (docs/design.md, section 2), and how a gate backend declares itself.

The GPT forward (model/gpt.py) is written once; at each gated layer it calls an
executor, and the executors differ only there. An executor's methods take the
module whose layer they run and its input: qkv(attn, x), attn_proj(attn, y),
mlp(mlp, x), embed(x), add(x, out), lm_head(model, x). Here: Ungated (nanoGPT's
plain layers, gated=False) and Reference (the design's elementwise multiplies, for
any alpha: the oracle). Each gate backend is one module with its executor and a
Backend that declares it; registry.py lists them.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from abcgpt.gates.gate import Gates


@dataclass(frozen=True)
class Backend:
    """A gate backend as the registry (registry.py) knows it."""

    name: str
    build: Callable  # (model, gates, host_dial) -> executor; host_dial: the voice.Dial on the host, or None
    per_row: bool  # takes one alpha per sequence
    devices: tuple  # device types "auto" may choose it on
    auto_priority: int  # "auto" takes the highest that serves the device and the alphas
    unavailable: Callable = lambda device: None  # why it cannot run on a device, or None where it can


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, hs) head outputs side by side as (B, T, nh * hs)."""
    B, _, T, _ = y.shape
    return y.transpose(1, 2).reshape(B, T, -1)


class Ungated:
    """nanoGPT's GPT: no gate anywhere. The base of every executor."""

    def qkv(self, attn, x: torch.Tensor) -> torch.Tensor:
        return attn.c_attn(x)

    def attn_proj(self, attn, y: torch.Tensor) -> torch.Tensor:
        return attn.c_proj(merge_heads(y))

    def mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        return mlp.c_proj(mlp.gelu(mlp.c_fc(x)))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return x + out

    def lm_head(self, model, x: torch.Tensor) -> torch.Tensor:
        return model.lm_head(x)


def over_time(gate: torch.Tensor) -> torch.Tensor:
    """A gate (n,) as it is, or per-sequence gates (B, n) as (B, 1, n) to broadcast over positions."""
    return gate.unsqueeze(1) if gate.dim() == 2 else gate


class Reference(Ungated):
    """Elementwise multiplies where the design puts the gates; any alpha."""

    def __init__(self, gates: Gates):
        self.gates = gates
        self.embd = over_time(gates.embd)

    def attn_proj(self, attn, y):
        head_gate = self.gates.heads[attn.layer]  # (nh,) or (B, nh), over (B, nh, T, hs)
        return attn.c_proj(merge_heads(y * head_gate[..., None, None]))

    def mlp(self, mlp, x):
        hidden = over_time(self.gates.hidden[mlp.layer])
        return mlp.c_proj(mlp.gelu(mlp.c_fc(x)).mul_(hidden))  # in place: GELU keeps its input, not its output

    def embed(self, x):
        return x * self.embd

    def add(self, x, out):
        """The residual add with the channel gate on the sublayer's output: one pass (addcmul), not two."""
        return torch.addcmul(x, out, self.embd)

    def lm_head(self, model, x):
        return model.lm_head(x * self.embd)


REFERENCE = Backend("reference", lambda model, gates, host_dial: Reference(gates), per_row=True,
                    devices=("cpu", "cuda"), auto_priority=0)
