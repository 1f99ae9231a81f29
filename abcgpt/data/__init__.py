"""Text in: tokenizers, sources, their split, the batches and the alpha each draws."""
