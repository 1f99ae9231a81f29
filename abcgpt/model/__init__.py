"""The gated GPT: attention with its caches, the forward, and drawing tokens from it."""
