"""The triton backend: the reference's gates, with the MLP's up-projection, GELU and gate in one Triton
kernel (kernels/), for any alpha, one per sequence included."""
import importlib.util
import os

import torch

from .executors import Backend, Reference

if importlib.util.find_spec("triton") is not None:
    from abcgpt_kernels.ops import gated_mlp
else:  # no triton on this platform: the other backends serve
    gated_mlp = None


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
        return out.view(B, T, -1)  # the channel gate is applied in add()


def _unavailable(device):
    if gated_mlp is None:
        return "gate_backend='triton' needs the triton package"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "gate_backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
    return None


TRITON = Backend("triton", lambda model, gates, host_dial: Fused(gates), per_row=True, devices=("cuda",),
                 auto_priority=1, unavailable=_unavailable)
