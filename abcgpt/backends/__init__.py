"""The ways a gated forward is computed: what an executor is, the folded and the Triton backends, and their registry."""
