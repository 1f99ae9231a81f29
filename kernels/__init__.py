"""Triton kernels for the gated MLP (the fused up-projection, GELU and gate lands here)."""
