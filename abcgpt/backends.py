"""Gate backends: how one forward executes its gated linear layers and MLPs (docs/design.md, section 2).

The GPT forward (model.py) is written once; at each gated layer it calls an
executor, and the executors differ only there:

- Ungated: nanoGPT's plain layers (gated=False);
- Reference: the design's elementwise multiplies, for any alpha (the oracle);
- Fused: Reference with the MLP in the fused Triton kernel (any alpha);
- Folded (folded.py): one alpha, gates folded into the weights, silent units cut.

An executor's methods take the module whose layer they run and its input:
qkv(attn, x), attn_proj(attn, y), mlp(mlp, x), add(x, out), lm_head(model, x).
"""
import importlib.util
import os

import torch

from .errors import SettingsError

if importlib.util.find_spec("triton") is not None:
    from kernels.ops import gated_mlp
else:  # no triton on this platform: the other backends serve
    gated_mlp = None

# auto: folded for one alpha; for per-sequence alphas triton on CUDA, else reference.
BACKENDS = ("auto", "reference", "folded", "triton")


def check_backend(name):
    if name not in BACKENDS:
        raise SettingsError(f"gate_backend must be one of {BACKENDS}, got {name!r}")
    return name


def choose_backend(name, device, per_row):
    """The backend a forward on device runs with, for one alpha or one per sequence (per_row)."""
    if name == "auto":
        if not per_row:
            return "folded"
        return "triton" if device.type == "cuda" and gated_mlp is not None else "reference"
    if name == "folded" and per_row:
        raise SettingsError("gate_backend='folded' takes one alpha per batch; per-sequence alphas need "
                         "'reference', 'triton' or 'auto'")
    if name == "triton":
        if gated_mlp is None:
            raise SettingsError("gate_backend='triton' needs the triton package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise SettingsError("gate_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU "
                             "interpreter)")
    return name


def merge_heads(y):
    """(B, nh, T, hs) head outputs side by side as (B, T, nh * hs)."""
    B, _, T, _ = y.shape
    return y.transpose(1, 2).reshape(B, T, -1)


class Ungated:
    """nanoGPT's GPT: no gate anywhere."""

    def qkv(self, attn, x):
        return attn.c_attn(x)

    def attn_proj(self, attn, y):
        return attn.c_proj(merge_heads(y))

    def mlp(self, mlp, x):
        return mlp.c_proj(mlp.gelu(mlp.c_fc(x)))

    def embed(self, x):
        return x

    def add(self, x, out):
        return x + out

    def lm_head(self, model, x):
        return model.lm_head(x)


def over_time(gate):
    """A gate (n,) as it is, or per-sequence gates (B, n) as (B, 1, n) to broadcast over positions."""
    return gate.unsqueeze(1) if gate.dim() == 2 else gate


class Reference(Ungated):
    """Elementwise multiplies where the design puts the gates; any alpha."""

    def __init__(self, gates):
        self.gates = gates
        self.embd = over_time(gates.embd)

    def attn_proj(self, attn, y):
        head_gate = self.gates.heads[attn.layer]  # (nh,) or (B, nh), over (B, nh, T, hs)
        return attn.c_proj(merge_heads(y * head_gate[..., None, None])) * self.embd

    def mlp(self, mlp, x):
        hidden = over_time(self.gates.hidden[mlp.layer])
        return mlp.c_proj(mlp.gelu(mlp.c_fc(x)) * hidden) * self.embd

    def embed(self, x):
        return x * self.embd

    def lm_head(self, model, x):
        return model.lm_head(x * self.embd)


class Fused(Reference):
    """Reference, with the MLP's up-projection, GELU and gate in one Triton kernel."""

    def mlp(self, mlp, x):
        B, T, C = x.shape
        params = (x, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias)
        if torch.is_autocast_enabled(x.device.type):  # a custom op is not autocast: cast as F.linear would
            dtype = torch.get_autocast_dtype(x.device.type)
            params = tuple(p.to(dtype) if p is not None else None for p in params)
        # per-sequence gates are a (B, N) table: the kernel reads row r's gates at r // T
        out = gated_mlp(params[0].reshape(B * T, C), *params[1:], self.gates.hidden[mlp.layer])
        return out.view(B, T, -1) * self.embd
